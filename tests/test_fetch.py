"""``avcl fetch avdigits``: download + sha256 verification into a data root, tested against a
local HTTP server on 127.0.0.1 (never the internet), a local mirror folder and a local data root."""
import functools
import gzip
import hashlib
import http.server
import io
import struct
import tarfile
import threading
import wave
from pathlib import Path

import numpy as np
import pytest

from avcl.cli import main
from avcl.data import fetch
from avcl.data.sources import locate_fsdd, locate_mnist
from conftest import DATA_DIR, needs_data

SPEAKERS = ["ann", "bob", "cat", "dan", "eve", "fay"]


def _wav(seed: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes(np.random.default_rng(seed).integers(-3000, 3000, 40).astype("<i2").tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """A folder laid out as the official downloads (fake content), plus its content digests."""
    root = tmp_path_factory.mktemp("mirror")
    recordings = root / "unpacked"
    recordings.mkdir()
    with tarfile.open(root / "v1.0.10.tar.gz", "w:gz") as tar:
        for i, (digit, speaker, take) in enumerate((d, s, t) for d in range(10) for s in SPEAKERS for t in range(50)):
            name, data = f"{digit}_{speaker}_{take}.wav", _wav(i)
            (recordings / name).write_bytes(data)
            info = tarfile.TarInfo(f"free-spoken-digit-dataset-1.0.10/recordings/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    images = struct.pack(">IIII", 0x803, 10000, 28, 28) + bytes(10000 * 28 * 28)
    labels = struct.pack(">II", 0x801, 10000) + bytes(np.arange(10000, dtype=np.uint8) % 10)
    for name, raw in ((fetch.MNIST_IMAGES, images), (fetch.MNIST_LABELS, labels)):
        (root / name).write_bytes(gzip.compress(raw))
    digests = {"fsdd": fetch.fsdd_digest(recordings),
               "mnist": {fetch.MNIST_IMAGES: hashlib.sha256(images).hexdigest(),
                         fetch.MNIST_LABELS: hashlib.sha256(labels).hexdigest()}}
    return root, digests


@pytest.fixture
def server(mirror):
    """http.server on 127.0.0.1 serving the mirror folder, in a thread; yields (base URL, request log)."""
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(mirror[0])))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def pinned(mirror, monkeypatch):
    """The CLI checks the fake mirror's digests instead of the real data's."""
    monkeypatch.setattr(fetch, "FSDD_RECORDINGS_SHA256", mirror[1]["fsdd"])
    monkeypatch.setattr(fetch, "MNIST_IDX_SHA256", mirror[1]["mnist"])


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("avcl: error:")]
    assert len(lines) == 1
    return lines[0]


def test_fetch_from_a_local_http_server_fills_a_data_root_that_runs_offline(server, pinned, tmp_path, capsys):
    url, requests = server
    to = tmp_path / "data"
    assert main(["fetch", "avdigits", "--to", str(to), "--from", url]) == 0
    assert sorted(requests) == ["/t10k-images-idx3-ubyte.gz", "/t10k-labels-idx1-ubyte.gz", "/v1.0.10.tar.gz"]
    err = capsys.readouterr().err
    assert "verified" in err and f"--data-root {to}" in err
    # exactly where avcl run looks, with downloads off
    assert locate_fsdd(to, download=False) == to / "fsdd" / "recordings"
    assert locate_mnist(to, download=False) == to / "mnist"
    manifest = (to / "avdigits.sha256").read_text().splitlines()
    assert len(manifest) == 3002
    digest, name = manifest[0].split("  ")
    assert hashlib.sha256((to / name).read_bytes()).hexdigest() == digest
    assert not list(to.glob(".avcl-tmp-*"))  # scratch removed
    # a second call verifies what is there and downloads nothing
    assert main(["fetch", "avdigits", "--to", str(to), "--from", url]) == 0
    assert len(requests) == 3 and "already there" in capsys.readouterr().err


def test_a_tampered_download_is_refused_and_nothing_is_kept(server, pinned, mirror, monkeypatch, tmp_path, capsys):
    url, _ = server
    monkeypatch.setattr(fetch, "FSDD_RECORDINGS_SHA256", "0" * 64)  # the served archive is not the pinned one
    to = tmp_path / "data"
    assert main(["fetch", "avdigits", "--to", str(to), "--from", url]) == 2
    line = _one_error_line(capsys)
    assert "sha256" in line and "FSDD v1.0.10" in line
    assert not (to / "fsdd").exists() and not list(to.glob(".avcl-tmp-*"))
    monkeypatch.setattr(fetch, "FSDD_RECORDINGS_SHA256", mirror[1]["fsdd"])
    monkeypatch.setattr(fetch, "MNIST_IDX_SHA256", {**mirror[1]["mnist"], fetch.MNIST_LABELS: "1" * 64})
    assert main(["fetch", "avdigits", "--to", str(to), "--from", url]) == 2
    assert fetch.MNIST_LABELS in _one_error_line(capsys)
    assert not (to / "mnist" / fetch.MNIST_LABELS).exists()


def test_a_missing_file_on_the_server_is_one_clear_error(tmp_path, pinned, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(empty)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/"
        assert main(["fetch", "avdigits", "--to", str(tmp_path / "d"), "--from", url]) == 2
        line = _one_error_line(capsys)
        assert "v1.0.10.tar.gz" in line and "404" in line
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_from_a_local_folder_of_archives(mirror, pinned, tmp_path):
    to = tmp_path / "data"
    assert main(["fetch", "avdigits", "--to", str(to), "--from", str(mirror[0]), "--quiet"]) == 0
    assert locate_fsdd(to, download=False) and locate_mnist(to, download=False)


def test_unknown_dataset_or_source_is_refused(tmp_path, capsys):
    assert main(["fetch", "ave", "--to", str(tmp_path / "d")]) == 2
    assert "avdigits" in _one_error_line(capsys)
    assert main(["fetch", "avdigits", "--to", str(tmp_path / "d"), "--from", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in _one_error_line(capsys)


@needs_data
def test_the_pinned_digests_are_the_real_data_and_a_data_root_can_be_copied(tmp_path):
    root = Path(DATA_DIR)
    assert fetch.fsdd_digest(root / "fsdd" / "recordings") == fetch.FSDD_RECORDINGS_SHA256
    for name, digest in fetch.MNIST_IDX_SHA256.items():
        assert fetch.idx_digest(root / "mnist" / name) == digest
    to = tmp_path / "copy"
    assert main(["fetch", "avdigits", "--to", str(to), "--from", str(root), "--quiet"]) == 0
    assert locate_fsdd(to, download=False) == to / "fsdd" / "recordings"
