"""Find, download and verify the raw datasets: FSDD (spoken digits) and the MNIST test set.

Search order, for each dataset (the first location holding a complete copy wins):

1. the data root: the ``data_root`` argument (``--data-root``) if given, else ``$AVCL_DATA_DIR``
   if set; FSDD is looked for in ``<root>/fsdd/recordings/``, MNIST in ``<root>/mnist/``;
2. the cache: ``cache_dir`` if given, else ``$AVCL_CACHE_DIR``, else ``~/.cache/avcl``, with the
   same layout (``<cache>/fsdd/recordings/``, ``<cache>/mnist/``);
3. a download into the cache (unless ``download=False``).

Downloads are streamed into a scratch directory inside the cache, verified by content (and by
sha256 when one is given), and only then moved into place with ``os.replace``, so the cache never
holds a partial or unverified copy; the scratch directory is removed whatever happens.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import re
import shutil
import struct
import tarfile
import tempfile
import urllib.parse
import urllib.request
import wave
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
from tqdm import tqdm

from avcl.core.errors import AvclError


FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/v1.0.10.tar.gz"
MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
MNIST_URLS = {  # a public mirror of the MNIST test files
    MNIST_IMAGES: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
    MNIST_LABELS: "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-labels-idx1-ubyte.gz",
}
FSDD_COUNT = 3000
_MNIST_SHAPES = {MNIST_IMAGES: (10000, 28, 28), MNIST_LABELS: (10000,)}
_WAV_RE = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")
_TIMEOUT_S = 60
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$AVCL_CACHE_DIR`` if set, else ``~/.cache/avcl``."""
    env = os.environ.get("AVCL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "avcl"


def data_roots(data_root: str | os.PathLike | None) -> list[Path]:
    """The data roots to search: ``[data_root]`` if given, else ``[$AVCL_DATA_DIR]`` if set, else ``[]``.

    An explicit ``data_root`` must exist (a typo should not silently trigger a download);
    the environment variable's directory is only checked by the callers' lookups.
    """
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise AvclError(f"data root {root} does not exist or is not a directory; fix --data-root")
        return [root]
    env = os.environ.get("AVCL_DATA_DIR")
    return [Path(env).expanduser()] if env else []


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


# --- FSDD ------------------------------------------------------------------------------------

def _count_fsdd(directory: Path) -> int:
    """Number of FSDD-named wavs in ``directory`` (names only, so it stays fast); 0 if missing."""
    try:
        with os.scandir(directory) as entries:
            return sum(1 for e in entries if _WAV_RE.match(e.name))
    except OSError:
        return 0


def locate_fsdd(
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    url: str = FSDD_URL,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Return the FSDD ``recordings`` directory (>= 3,000 wavs), downloading it if allowed."""
    roots, cache = data_roots(data_root), _cache(cache_dir)
    final = cache / "fsdd" / "recordings"
    counts = {}
    for candidate in [r / "fsdd" / "recordings" for r in roots] + [final]:
        counts[candidate] = _count_fsdd(candidate)
        if counts[candidate] >= FSDD_COUNT:
            return candidate
    partial = max(counts, key=counts.get)
    status = (f"FSDD incomplete: {counts[partial]:,} of {FSDD_COUNT:,} wav files in {partial}" if counts[partial]
              else "FSDD not found")
    where = (
        f"{roots[0] / 'fsdd' / 'recordings'}/"
        if roots
        else "<root>/fsdd/recordings/ (and point --data-root or AVCL_DATA_DIR at <root>)"
    )
    hint = (
        f"{status}. Put the 3,000 wav files of free-spoken-digit-dataset v1.0.10 in {where}, "
        f"or allow the download of {url} into {final}"
    )
    if not download:
        raise AvclError(hint)
    with _scratch(cache) as tmp:
        digest = _fetch(url, tmp / "fsdd.tar.gz", progress, hint)
        if sha256 and digest != sha256.lower():
            raise AvclError(f"{url}: sha256 is {digest}, expected {sha256.lower()}; not the expected archive")
        staged = _extract_fsdd(tmp / "fsdd.tar.gz", tmp / "recordings", url)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, final)
        except OSError:
            # Another process may have finished the same download first: use its copy.
            if _count_fsdd(final) < FSDD_COUNT:
                raise AvclError(f"{final} exists but is not a complete FSDD copy; delete it and retry") from None
    return final


def _extract_fsdd(archive: Path, dest: Path, url: str) -> Path:
    """Extract the ``*/recordings/*.wav`` members of the archive flat into ``dest``, and verify them."""
    dest.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                path = PurePosixPath(member.name)
                if not (member.isfile() and path.parent.name == "recordings" and _WAV_RE.match(path.name)):
                    continue
                # Written under its regex-checked basename only: no archive path (absolute, "..",
                # links) ever reaches the filesystem, which is stricter than filter="data".
                with tar.extractfile(member) as src, open(dest / path.name, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise AvclError(f"{url}: not a valid FSDD .tar.gz archive ({e}); try again or place the files manually") from e
    names = sorted(n for n in os.listdir(dest) if _WAV_RE.match(n))
    if len(names) < FSDD_COUNT:
        raise AvclError(f"{url}: archive holds {len(names)} recordings/*.wav files, expected {FSDD_COUNT}")
    for name in (names[0], names[-1]):  # spot-check that the members are real audio
        try:
            read_wav(dest / name)
        except AvclError as e:
            raise AvclError(f"{url}: {name} in the archive is not a valid 16-bit PCM wav") from e
    return dest


def list_fsdd(recordings_dir: str | os.PathLike) -> list[tuple[Path, int, str, int]]:
    """``(path, digit, speaker, take index)`` of each FSDD wav, sorted by (digit, speaker, index).

    Files whose names do not follow ``{digit}_{speaker}_{index}.wav`` are skipped.
    """
    directory = Path(recordings_dir)
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise AvclError(f"cannot list FSDD recordings in {directory} ({e.strerror})") from e
    items = [(directory / n, int(m[1]), m[2], int(m[3])) for n in names if (m := _WAV_RE.match(n))]
    return sorted(items, key=lambda it: it[1:])


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a 16-bit PCM wav as float32 mono samples in [-1, 1] (channels averaged) and its rate."""
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, rate, frames = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            if width != 2:
                raise AvclError(f"{path}: {8 * width}-bit samples; only 16-bit PCM wav is supported")
            raw = w.readframes(frames)
    except (wave.Error, EOFError, OSError) as e:
        raise AvclError(f"{path}: cannot read as a 16-bit PCM wav file ({e})") from e
    if len(raw) != frames * channels * 2:
        raise AvclError(f"{path}: truncated wav ({len(raw) // (2 * channels)} of {frames} frames)")
    samples = np.frombuffer(raw, dtype="<i2").reshape(-1, channels).astype(np.float32)
    return samples.mean(axis=1) / np.float32(32768.0), rate


# --- MNIST -----------------------------------------------------------------------------------

def locate_mnist(
    data_root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    urls: dict[str, str] = MNIST_URLS,
    progress: bool = True,
) -> Path:
    """Return the directory holding both MNIST test files, downloading them if allowed."""
    roots, cache = data_roots(data_root), _cache(cache_dir)
    final = cache / "mnist"
    present = {}
    for candidate in [r / "mnist" for r in roots] + [final]:
        present[candidate] = [name for name in _MNIST_SHAPES if (candidate / name).is_file()]
        if len(present[candidate]) == len(_MNIST_SHAPES):
            return candidate
    partial = max(present, key=lambda c: len(present[c]))
    status = (f"MNIST incomplete: {len(present[partial])} of {len(_MNIST_SHAPES)} files in {partial} (no "
              f"{', '.join(n for n in _MNIST_SHAPES if n not in present[partial])})" if present[partial]
              else "MNIST not found")
    where = f"{roots[0] / 'mnist'}/" if roots else "<root>/mnist/ (and point --data-root or AVCL_DATA_DIR at <root>)"
    hint = (
        f"{status}. Put {MNIST_IMAGES} and {MNIST_LABELS} (the MNIST test set) in {where}, "
        f"or allow the download of {' and '.join(urls[n] for n in _MNIST_SHAPES)} into {final}/"
    )
    if not download:
        raise AvclError(hint)
    with _scratch(cache) as tmp:
        # The gzip bytes differ between mirrors, so verify the decompressed content, not a hash.
        for name in _MNIST_SHAPES:
            _fetch(urls[name], tmp / name, progress, hint)
            _check_mnist(name, _read_idx(tmp / name, urls[name]), urls[name])
        final.mkdir(parents=True, exist_ok=True)
        for name in _MNIST_SHAPES:
            os.replace(tmp / name, final / name)  # atomic; a concurrent writer's copy is identical
    return final


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzipped or raw): uint8 images ``(N, rows, cols)`` or labels ``(N,)``."""
    return _read_idx(Path(path), str(path))


def _read_idx(path: Path, name: str) -> np.ndarray:
    """``read_idx`` whose errors name ``name`` (a file or the URL it came from)."""
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":  # gzip magic
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise AvclError(f"{name}: cannot read or decompress ({e})") from e
    magic, count = struct.unpack(">II", data[:8]) if len(data) >= 8 else (None, 0)
    if magic == 0x00000801:
        shape, offset = (count,), 8
    elif magic == 0x00000803 and len(data) >= 16:
        shape, offset = (count, *struct.unpack(">II", data[8:16])), 16
    else:
        raise AvclError(f"{name}: not an MNIST IDX file (bad header; expected magic 0x00000801 or 0x00000803)")
    size, found = int(np.prod(shape)), len(data) - offset
    if found != size:
        raise AvclError(f"{name}: header promises {size} data bytes, {found} follow (truncated or corrupt)")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=offset).reshape(shape).copy()


def _check_mnist(name: str, array: np.ndarray, source: str) -> None:
    """Raise unless ``array`` is the content of the MNIST test file ``name``."""
    if array.shape != _MNIST_SHAPES[name]:
        raise AvclError(f"{source}: shape {array.shape}, expected {_MNIST_SHAPES[name]} for the MNIST test {name}")
    if name == MNIST_LABELS and array.max() > 9:
        raise AvclError(f"{source}: label {array.max()} found, MNIST labels are 0..9")


def load_mnist_test(mnist_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(10000, 28, 28)`` and labels int64 ``(10000,)`` of the MNIST test set."""
    arrays = {}
    for name in _MNIST_SHAPES:
        path = Path(mnist_dir) / name
        arrays[name] = read_idx(path)
        _check_mnist(name, arrays[name], str(path))
    return arrays[MNIST_IMAGES], arrays[MNIST_LABELS].astype(np.int64)


# --- Downloading -----------------------------------------------------------------------------

@contextlib.contextmanager
def _scratch(cache: Path) -> Iterator[Path]:
    """A temporary directory inside ``cache`` (same filesystem, so os.replace is atomic), always removed."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".avcl-tmp-", dir=cache))
    except OSError as e:
        raise AvclError(f"cannot create a scratch directory in the cache {cache} ({e}); set AVCL_CACHE_DIR") from e
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(url: str, dest: Path, progress: bool, hint: str) -> str:
    """Stream ``url`` into ``dest`` and return its sha256; network failures raise AvclError(hint)."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as resp, open(dest, "wb") as out:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            name = PurePosixPath(urllib.parse.urlparse(url).path).name
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                      disable=None if progress else True) as bar:
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise ConnectionError(f"connection closed after {out.tell()} of {total} bytes")
    except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, resets
        raise AvclError(f"{hint} (download of {url} failed: {e})") from e
    return digest.hexdigest()


def find_under_roots(path: str, data_root: str | None) -> Path:
    """``path`` itself if absolute, else the first ``<root>/path`` that exists (roots: data_roots);
    falls back to ``path`` relative to the working directory. Existence is the caller's check."""
    if Path(path).is_absolute():
        return Path(path)
    candidates = [root / path for root in data_roots(data_root)]
    return next((c for c in candidates if c.exists()), Path(path))
