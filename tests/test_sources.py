"""Tests for avcl.data.sources: lookup order, verified atomic downloads (from a local server), readers."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import socket
import struct
import tarfile
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from avcl.data import sources
from avcl.core.errors import AvclError

REAL_DATA = os.environ.get("AVCL_DATA_DIR")
SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]
FSDD_NAMES = [f"{d}_{s}_{i}.wav" for d in range(10) for s in SPEAKERS for i in range(50)]


def wav_bytes(samples: np.ndarray, channels: int = 1, width: int = 2, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return buf.getvalue()


def idx_gz(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return gzip.compress(header + array.tobytes(), compresslevel=1)  # level 1: random data, keep it fast


def fsdd_tar_gz(names: list[str]) -> bytes:
    """A tag-archive look-alike: wavs under <top>/recordings/ plus files that must be ignored."""
    wav = wav_bytes((np.arange(80, dtype="<i2") - 40) * 800)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        members = {f"free-spoken-digit-dataset-1.0.10/recordings/{n}": wav for n in names}
        members["free-spoken-digit-dataset-1.0.10/README.md"] = b"# FSDD"
        members["free-spoken-digit-dataset-1.0.10/other/9_evil_1.wav"] = wav
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> Path:
    """The files the local server offers: good and corrupt FSDD archives and MNIST files."""
    root = tmp_path_factory.mktemp("served")
    rng = np.random.default_rng(0)
    good = fsdd_tar_gz(FSDD_NAMES)
    images = rng.integers(0, 256, (10000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 10000, dtype=np.uint8)
    files = {
        "fsdd.tar.gz": good,
        "truncated.tar.gz": good[: len(good) // 10],
        "short.tar.gz": fsdd_tar_gz(FSDD_NAMES[:300]),
        "page.html": b"<!DOCTYPE html><html><body>Not Found</body></html>",
        sources.MNIST_IMAGES: idx_gz(images, 0x803),
        sources.MNIST_LABELS: idx_gz(labels, 0x801),
        "labels-9999.gz": idx_gz(labels[:9999], 0x801),
        "labels-range.gz": idx_gz(labels + 1, 0x801),
        "images-badmagic.gz": idx_gz(images[:10], 0x802),  # small: the header alone is checked
        "images-truncated.gz": gzip.compress(gzip.decompress(idx_gz(images[:10], 0x803))[:-5]),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture
def server(served):
    """A local HTTP server over ``served``; ``.url(name)`` and ``.requests`` (paths asked for)."""
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = lambda name: f"http://127.0.0.1:{httpd.server_address[1]}/{name}"
    httpd.requests = requests
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def hermetic_env(monkeypatch, tmp_path):
    """Never find the real data or touch ~/.cache unless a test asks for it."""
    monkeypatch.delenv("AVCL_DATA_DIR", raising=False)
    monkeypatch.setenv("AVCL_CACHE_DIR", str(tmp_path / "env-cache"))


def mnist_urls(server, images=sources.MNIST_IMAGES, labels=sources.MNIST_LABELS) -> dict[str, str]:
    return {sources.MNIST_IMAGES: server.url(images), sources.MNIST_LABELS: server.url(labels)}


def contents(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/fsdd.tar.gz"


def test_default_cache_dir(monkeypatch, tmp_path):
    assert sources.default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("AVCL_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path / ".cache" / "avcl"


def test_fsdd_download_then_cache(server, served, tmp_path):
    cache = tmp_path / "cache"
    sha = hashlib.sha256((served / "fsdd.tar.gz").read_bytes()).hexdigest()
    got = sources.locate_fsdd(cache_dir=cache, url=server.url("fsdd.tar.gz"), sha256=sha.upper(), progress=True)
    assert got == cache / "fsdd" / "recordings"
    assert sorted(os.listdir(got)) == sorted(FSDD_NAMES)  # README and other/ were not extracted
    assert contents(cache) == ["fsdd", "fsdd/recordings", *sorted(f"fsdd/recordings/{n}" for n in FSDD_NAMES)]
    assert len(server.requests) == 1
    assert sources.locate_fsdd(cache_dir=cache, url=server.url("fsdd.tar.gz")) == got
    assert len(server.requests) == 1  # the second call used the cache
    entries = sources.list_fsdd(got)
    assert len(entries) == 3000 and entries[0][1:] == (0, "george", 0) and entries[-1][1:] == (9, "yweweler", 49)


def test_mnist_download_then_cache(server, tmp_path):
    cache = tmp_path / "cache"
    got = sources.locate_mnist(cache_dir=cache, urls=mnist_urls(server), progress=False)
    assert got == cache / "mnist"
    assert contents(cache) == ["mnist", f"mnist/{sources.MNIST_IMAGES}", f"mnist/{sources.MNIST_LABELS}"]
    images, labels = sources.load_mnist_test(got)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64 and labels.max() <= 9
    assert sources.locate_mnist(cache_dir=cache, urls=mnist_urls(server)) == got
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "name, problem",
    [("truncated.tar.gz", "not a valid FSDD"), ("page.html", "not a valid FSDD"), ("short.tar.gz", "holds 300 ")],
)
def test_fsdd_corrupt_download_leaves_nothing(server, tmp_path, name, problem):
    cache = tmp_path / "cache"
    with pytest.raises(AvclError, match=problem) as err:
        sources.locate_fsdd(cache_dir=cache, url=server.url(name), progress=False)
    assert server.url(name) in str(err.value)
    assert contents(cache) == []


def test_fsdd_wrong_sha256(server, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(AvclError, match="sha256") as err:
        sources.locate_fsdd(cache_dir=cache, url=server.url("fsdd.tar.gz"), sha256="0" * 64, progress=False)
    assert server.url("fsdd.tar.gz") in str(err.value)
    assert contents(cache) == []


@pytest.mark.parametrize(
    "images, labels, bad, problem",
    [
        (sources.MNIST_IMAGES, "labels-9999.gz", "labels-9999.gz", r"shape \(9999,\)"),
        (sources.MNIST_IMAGES, "labels-range.gz", "labels-range.gz", "label 10"),
        ("images-badmagic.gz", sources.MNIST_LABELS, "images-badmagic.gz", "bad header"),
        ("images-truncated.gz", sources.MNIST_LABELS, "images-truncated.gz", "truncated"),
        ("page.html", sources.MNIST_LABELS, "page.html", "bad header"),
        (sources.MNIST_IMAGES, "truncated.tar.gz", "truncated.tar.gz", "decompress"),
    ],
)
def test_mnist_corrupt_download_leaves_nothing(server, tmp_path, images, labels, bad, problem):
    cache = tmp_path / "cache"
    with pytest.raises(AvclError, match=problem) as err:
        sources.locate_mnist(cache_dir=cache, urls=mnist_urls(server, images, labels), progress=False)
    assert server.url(bad) in str(err.value)
    assert contents(cache) == []


def test_offline_and_no_download_name_the_paths(tmp_path):
    cache = tmp_path / "cache"
    url = closed_port_url()
    with pytest.raises(AvclError) as err:
        sources.locate_fsdd(cache_dir=cache, url=url, progress=False)
    msg = str(err.value)
    assert "<root>/fsdd/recordings/" in msg and str(cache / "fsdd" / "recordings") in msg
    assert url in msg and "failed" in msg
    assert contents(cache) == []

    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(AvclError) as err:
        sources.locate_fsdd(data_root=root, cache_dir=cache, download=False)
    assert f"{root / 'fsdd' / 'recordings'}/" in str(err.value) and sources.FSDD_URL in str(err.value)

    urls = {sources.MNIST_IMAGES: url, sources.MNIST_LABELS: url}
    for download in (True, False):
        with pytest.raises(AvclError) as err:
            sources.locate_mnist(data_root=root, cache_dir=cache, urls=urls, download=download, progress=False)
        msg = str(err.value)
        assert sources.MNIST_IMAGES in msg and sources.MNIST_LABELS in msg
        assert f"{root / 'mnist'}/" in msg and str(cache / "mnist") in msg
    assert contents(cache) == []


@pytest.fixture(scope="session")
def empty_recordings(tmp_path_factory) -> Path:
    """3,000 empty files with FSDD names, made once: creating files is slow on some filesystems."""
    directory = tmp_path_factory.mktemp("recordings")
    for name in FSDD_NAMES:
        (directory / name).touch()
    return directory


def fake_copy(base: Path, recordings: Path | None = None) -> None:
    """Name-only stand-ins (lookup checks names, not content): MNIST, and FSDD linked to ``recordings``."""
    if recordings:
        (base / "fsdd").mkdir(parents=True)
        (base / "fsdd" / "recordings").symlink_to(recordings, target_is_directory=True)
    (base / "mnist").mkdir(parents=True)
    for name in sources.MNIST_URLS:
        (base / "mnist" / name).touch()


def test_search_order(server, empty_recordings, monkeypatch, tmp_path):
    root, other, cache = tmp_path / "root", tmp_path / "other", tmp_path / "cache"
    fake_copy(root, empty_recordings)
    fake_copy(cache, empty_recordings)
    fake_copy(other)
    kw = dict(cache_dir=cache, download=False)
    assert sources.locate_fsdd(data_root=root, **kw) == root / "fsdd" / "recordings"
    assert sources.locate_mnist(data_root=str(root), **kw) == root / "mnist"
    assert sources.locate_fsdd(**kw) == cache / "fsdd" / "recordings"  # no root: the cache
    monkeypatch.setenv("AVCL_DATA_DIR", str(other))
    assert sources.data_roots(None) == [other]
    assert sources.locate_mnist(**kw) == other / "mnist"
    assert sources.locate_fsdd(data_root=root, **kw) == root / "fsdd" / "recordings"  # argument beats env
    (root / "fsdd" / "recordings").unlink()  # an incomplete root copy: fall back to the cache
    (root / "fsdd" / "recordings").mkdir()
    for name in FSDD_NAMES[:10]:
        (root / "fsdd" / "recordings" / name).touch()
    assert sources.locate_fsdd(data_root=root, **kw) == cache / "fsdd" / "recordings"
    with pytest.raises(AvclError, match="nowhere"):
        sources.locate_fsdd(data_root=tmp_path / "nowhere", **kw)
    monkeypatch.setenv("AVCL_DATA_DIR", str(tmp_path / "gone"))  # env root missing: just skipped
    assert sources.locate_mnist(**kw) == cache / "mnist"
    assert server.requests == []


def test_fsdd_copy_finished_by_another_process_is_used(server, empty_recordings, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    extract = sources._extract_fsdd

    def racing_extract(*args):
        staged = extract(*args)
        fake_copy(cache, empty_recordings)  # another process finishes while ours is being verified
        return staged

    monkeypatch.setattr(sources, "_extract_fsdd", racing_extract)
    monkeypatch.setattr(sources, "FSDD_COUNT", 300)  # a small archive keeps the test fast
    got = sources.locate_fsdd(cache_dir=cache, url=server.url("short.tar.gz"), progress=False)
    assert got == cache / "fsdd" / "recordings"
    assert all(p.stat().st_size == 0 for p in got.iterdir())  # the other process's (empty) files
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # scratch removed


def test_read_idx_raw_and_errors(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    raw = tmp_path / "labels.idx"
    raw.write_bytes(gzip.decompress(idx_gz(labels, 0x801)))
    np.testing.assert_array_equal(sources.read_idx(raw), labels)
    raw.write_bytes(raw.read_bytes()[:-1])
    with pytest.raises(AvclError, match="labels.idx.*truncated"):
        sources.read_idx(raw)
    with pytest.raises(AvclError, match="missing.gz"):
        sources.read_idx(tmp_path / "missing.gz")
    bad = tmp_path / "bad.gz"
    bad.write_bytes(idx_gz(labels, 0x801)[:-10])
    with pytest.raises(AvclError, match="bad.gz"):
        sources.read_idx(bad)
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    (mnist / sources.MNIST_IMAGES).write_bytes(idx_gz(np.zeros((10, 28, 28), np.uint8), 0x803))
    (mnist / sources.MNIST_LABELS).write_bytes(idx_gz(labels, 0x801))
    with pytest.raises(AvclError, match=sources.MNIST_IMAGES):
        sources.load_mnist_test(mnist)


def test_read_wav(tmp_path):
    stereo = tmp_path / "stereo.wav"
    stereo.write_bytes(wav_bytes(np.array([[-32768, 32767], [1000, 3000]], dtype="<i2"), channels=2, rate=16000))
    x, rate = sources.read_wav(stereo)
    assert rate == 16000 and x.dtype == np.float32
    np.testing.assert_allclose(x, [-0.5 / 32768, 2000 / 32768])
    eight_bit = tmp_path / "8bit.wav"
    eight_bit.write_bytes(wav_bytes(np.zeros(4, np.uint8), width=1))
    with pytest.raises(AvclError, match="8bit.wav.*8-bit"):
        sources.read_wav(eight_bit)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"<html></html>")
    with pytest.raises(AvclError, match="junk.wav"):
        sources.read_wav(junk)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav_bytes(np.zeros(100, "<i2"))[:-20])
    with pytest.raises(AvclError, match="cut.wav.*truncated"):
        sources.read_wav(cut)


def test_list_fsdd_skips_other_names(tmp_path):
    for name in ["1_theo_10.wav", "1_theo_2.wav", "0_lucas_3.wav", "README.md", "x_theo_1.wav", "1_Theo_1.wav"]:
        (tmp_path / name).touch()
    assert [e[1:] for e in sources.list_fsdd(tmp_path)] == [(0, "lucas", 3), (1, "theo", 2), (1, "theo", 10)]
    with pytest.raises(AvclError, match="nowhere"):
        sources.list_fsdd(tmp_path / "nowhere")


@pytest.mark.skipif(not REAL_DATA, reason="set AVCL_DATA_DIR to the real data to run")
def test_real_data(tmp_path):
    recordings = sources.locate_fsdd(data_root=REAL_DATA, cache_dir=tmp_path, download=False)
    assert recordings == Path(REAL_DATA) / "fsdd" / "recordings"
    entries = sources.list_fsdd(recordings)
    assert len(entries) == 3000
    assert len({e[2] for e in entries}) == 6 and {e[3] for e in entries} == set(range(50))
    x, rate = sources.read_wav(entries[0][0])
    assert rate == 8000 and x.dtype == np.float32 and x.size > 0 and np.abs(x).max() <= 1.0
    images, labels = sources.load_mnist_test(sources.locate_mnist(data_root=REAL_DATA, cache_dir=tmp_path, download=False))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert list(tmp_path.iterdir()) == []
