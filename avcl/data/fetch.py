"""Prepare a data root ahead of time, for a machine without network (``avcl fetch``).

``fetch_avdigits(to)`` fills ``to`` with what AV-Digits reads, in the layout every lookup of
avcl/data/sources.py searches (so ``--data-root TO`` or ``AVCL_DATA_DIR=TO`` then finds it)::

    TO/fsdd/recordings/*.wav       the 3,000 recordings of FSDD v1.0.10
    TO/mnist/t10k-*-ubyte.gz       the two MNIST test files
    TO/avdigits.sha256             sha256 of every file above (``cd TO && sha256sum -c avdigits.sha256``)

Verification is by sha256 of the *content*, pinned below, because the archives' bytes are not
stable (GitHub regenerates tag archives; MNIST mirrors gzip differently):

* FSDD: the sha256 of the ``sha256sum`` listing of the 3,000 wavs sorted by name, i.e.
  ``cd recordings && LC_ALL=C ls *.wav | LC_ALL=C sort | xargs sha256sum | sha256sum``;
* MNIST: the sha256 of each decompressed IDX file (the values published with MNIST mirrors).

Sources (``source``): None = the URLs AV-Digits downloads from (``data.fsdd_url`` ...); a URL
(``http://``, ``https://``, ``file://``) = a mirror holding the three archives under their
official names (``v1.0.10.tar.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``);
a local directory = either such a mirror (the FSDD archive may also be named
``free-spoken-digit-dataset-1.0.10.tar.gz``, as a browser saves it, or be unpacked there) or a
data root holding ``fsdd/recordings/`` and ``mnist/`` (another machine's copy, or its ``~/.cache/avcl``).

Everything is staged in a scratch directory inside ``to``, verified, and only then moved into
place (os.replace), so ``to`` never holds an unverified copy; data already there is verified and
kept (a second call downloads nothing).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import sys
import urllib.parse
from pathlib import Path, PurePosixPath

from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_text, file_sha256
from avcl.data.sources import (_WAV_RE, FSDD_COUNT, FSDD_URL, MNIST_IMAGES, MNIST_LABELS, MNIST_URLS, _check_mnist,
                               _count_fsdd, _extract_fsdd, _fetch, _read_idx, _scratch)


FSDD_RECORDINGS_SHA256 = "1801eae019c063377d98f831d3f93574f259475df7332bb0e3d1b080fb5e6959"
MNIST_IDX_SHA256 = {
    MNIST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    MNIST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FSDD_ARCHIVE_NAMES = ("v1.0.10.tar.gz", "free-spoken-digit-dataset-1.0.10.tar.gz")
MANIFEST = "avdigits.sha256"


def fsdd_digest(recordings: Path) -> str:
    """sha256 of the ``sha256sum`` listing of the FSDD-named wavs in ``recordings``, sorted by name."""
    names = sorted(name for name in os.listdir(recordings) if _WAV_RE.match(name))
    listing = "".join(f"{file_sha256(recordings / name)}  {name}\n" for name in names)
    return hashlib.sha256(listing.encode()).hexdigest()


def idx_digest(path: Path) -> str:
    """sha256 of an IDX file's content, decompressed if it is gzipped."""
    data = path.read_bytes()
    return hashlib.sha256(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"avcl fetch: {message}", file=sys.stderr, flush=True)


def _sources(source: str | None) -> dict:
    """Where each part comes from: {"fsdd": url | recordings dir, "mnist": {name: url | file}}."""
    if source is None:
        return {"fsdd": FSDD_URL, "mnist": dict(MNIST_URLS)}
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        base = source.rstrip("/") + "/"
        return {"fsdd": base + FSDD_ARCHIVE_NAMES[0], "mnist": {n: base + n for n in MNIST_URLS}}
    root = Path(source).expanduser()
    if not root.is_dir():
        raise AvclError(f"--from {source}: not a URL (http://, https://, file://) nor an existing directory")
    unpacked = ("fsdd/recordings", "recordings", "free-spoken-digit-dataset-1.0.10/recordings")
    fsdd = next((root / d for d in unpacked if _count_fsdd(root / d) >= FSDD_COUNT), None)
    if fsdd is None:
        archive = next((root / n for n in FSDD_ARCHIVE_NAMES if (root / n).is_file()), None)
        fsdd = archive.resolve().as_uri() if archive else None
    mnist = {}
    for name in MNIST_URLS:
        found = next((root / d / name for d in ("mnist", ".") if (root / d / name).is_file()), None)
        mnist[name] = found
    missing = ([f"FSDD ({' or '.join(FSDD_ARCHIVE_NAMES)}, or fsdd/recordings/ with {FSDD_COUNT:,} wavs)"]
               if fsdd is None else []) + [name for name, found in mnist.items() if found is None]
    if missing:
        raise AvclError(f"--from {root}: not found there: {'; '.join(missing)}")
    return {"fsdd": fsdd, "mnist": mnist}


def _check_fsdd(recordings: Path, expected: str, origin: str) -> None:
    count = _count_fsdd(recordings)
    if count != FSDD_COUNT:
        raise AvclError(f"{origin}: {count:,} FSDD wav files, expected {FSDD_COUNT:,} (FSDD v1.0.10)")
    digest = fsdd_digest(recordings)
    if digest != expected:
        raise AvclError(f"{origin}: the {FSDD_COUNT:,} recordings do not match FSDD v1.0.10 (content sha256 "
                        f"{digest}, expected {expected}); not the expected data")


def _check_idx(path: Path, name: str, expected: str, origin: str) -> None:
    _check_mnist(name, _read_idx(path, origin), origin)  # a clear message for a truncated or foreign file
    digest = idx_digest(path)
    if digest != expected:
        raise AvclError(f"{origin}: decompressed sha256 {digest}, expected {expected} for the MNIST test "
                        f"file {name}; not the expected data")


def _fetch_fsdd(to: Path, origin, expected: str, progress: bool, quiet: bool) -> None:
    final = to / "fsdd" / "recordings"
    if final.exists():
        _check_fsdd(final, expected, str(final))
        _say(f"{final}: already there, {FSDD_COUNT:,} wav files verified", quiet)
        return
    with _scratch(to) as tmp:
        if isinstance(origin, Path):  # a local data root's recordings: copy, then verify the copy
            _say(f"copying {FSDD_COUNT:,} FSDD recordings from {origin}", quiet)
            staged = tmp / "recordings"
            staged.mkdir()
            for name in os.listdir(origin):
                if _WAV_RE.match(name):
                    shutil.copyfile(origin / name, staged / name)
        else:
            _say(f"downloading FSDD v1.0.10 from {origin}", quiet)
            hint = f"cannot fetch FSDD from {origin}"
            _fetch(origin, tmp / "fsdd.tar.gz", progress, hint)
            staged = _extract_fsdd(tmp / "fsdd.tar.gz", tmp / "recordings", origin)
        _check_fsdd(staged, expected, str(origin))
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)
    _say(f"{final}: {FSDD_COUNT:,} wav files, content sha256 verified", quiet)


def _fetch_mnist(to: Path, origins: dict, expected: dict, progress: bool, quiet: bool) -> None:
    final = to / "mnist"
    with _scratch(to) as tmp:
        for name, origin in origins.items():
            if (final / name).is_file():
                _check_idx(final / name, name, expected[name], str(final / name))
                _say(f"{final / name}: already there, verified", quiet)
                continue
            if isinstance(origin, Path):
                _say(f"copying {name} from {origin}", quiet)
                shutil.copyfile(origin, tmp / name)
            else:
                _say(f"downloading {name} from {origin}", quiet)
                _fetch(origin, tmp / name, progress, f"cannot fetch MNIST's {name} from {origin}")
            _check_idx(tmp / name, name, expected[name], str(origin))
            final.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, final / name)
            _say(f"{final / name}: sha256 of the content verified", quiet)


def _write_manifest(to: Path) -> Path:
    files = sorted((to / "fsdd" / "recordings").glob("*.wav")) + [to / "mnist" / n for n in MNIST_URLS]
    lines = "".join(f"{file_sha256(f)}  {PurePosixPath(f.relative_to(to).as_posix())}\n" for f in files)
    atomic_write_text(to / MANIFEST, lines)
    return to / MANIFEST


def fetch_avdigits(to: str | os.PathLike, source: str | None = None, fsdd_sha256: str = FSDD_RECORDINGS_SHA256,
                   mnist_sha256: dict | None = None, progress: bool = True, quiet: bool = False) -> Path:
    """Fill the data root ``to`` with FSDD and MNIST (module docstring); returns ``to``."""
    to = Path(to).expanduser()
    try:
        to.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AvclError(f"--to {to}: cannot create the directory ({err.strerror})") from None
    origins = _sources(source)
    _fetch_fsdd(to, origins["fsdd"], fsdd_sha256, progress, quiet)
    _fetch_mnist(to, origins["mnist"], mnist_sha256 or MNIST_IDX_SHA256, progress, quiet)
    manifest = _write_manifest(to)
    _say(f"done; sha256 of every file in {manifest}. Use it with: avcl run avdigits --data-root {to} "
         f"(or AVCL_DATA_DIR={to})", quiet)
    return to
