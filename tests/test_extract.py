"""``avcl extract``: files -> store, bad files reported, interrupted runs resumed, training on the result."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import avcl.apps.extract as ex
from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.features import require_raw
from avcl.data.store import FAILED, WRITTEN, open_store
from avcl.core.errors import AvclError
from avcl.media.decode import decode_clip
from avcl.media.encode import write_clip
from avcl.media.frontend import audio_features
from avcl.media.manifests import read_dataset
from avcl.models.encoders import AudioConv1d, FrameConv
from tests.conftest import DATA_DIR, REPO, needs_data, run_cli

CLIPS = Path(DATA_DIR or "/nonexistent") / "clips"
SMALL = ["decode.frames=4", "decode.size=32", "audio.num_bins=32", "audio.target_frames=200", "encoder.dim=16"]


def make_clips(folder: Path, count: int, seconds: float = 1.0) -> Path:
    """``count`` distinct small clips (two classes) and a manifest listing them."""
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    for i in range(count):
        frames = rng.integers(0, 256, (int(10 * seconds), 32, 32), dtype=np.uint8)
        tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(int(16000 * seconds)) / 16000)
        write_clip(folder / f"c{i}.mp4", frames, 10, tone.astype(np.float32), 16000)
        rows.append(f"c{i}.mp4,{'ab'[i % 2]},{'test' if i % 4 == 3 else 'train'}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return make_clips(tmp_path_factory.mktemp("clips"), 8)


def crash_on_clip(monkeypatch, n: int) -> list:
    """Make ``avcl extract`` raise while preparing its n-th clip; returns the list of clips prepared."""
    real_prepare, decoded = ex.prepare, []

    def crashing(job, decode, frontend):
        decoded.append(job[0])
        if len(decoded) == n:
            raise RuntimeError("injected crash")
        return real_prepare(job, decode, frontend)

    monkeypatch.setattr(ex, "prepare", crashing)
    return decoded


def test_outputs_shapes_and_determinism(clips, tmp_path):
    data = read_dataset(clips)
    shapes = {}
    for output in ("clip", "tokens", "snippets", "avcil"):
        config = ex.make_config("builtin", SMALL, output=output, snippets=3, batch_size=3)
        summary = ex.extract(data, tmp_path / f"{output}.h5", config, report=lambda line: None)
        assert (summary.written, summary.failed, summary.computed) == (8, 0, 8)
        store = open_store(tmp_path / f"{output}.h5")
        assert store.complete and (store.status == WRITTEN).all()
        shapes[output] = {name: shape for name, (shape, _) in store.fields.items()}
        assert store.manifest["settings"]["output"] == output and len(store.manifest["weights_sha256"]) == 64
    assert shapes["clip"] == {"audio": (16,), "video": (16,)}
    assert shapes["tokens"] == {"audio": (50, 16), "video": (4, 16, 16)}  # 200 fbank frames / 4; 4 frames x 4x4
    assert shapes["snippets"] == {"audio": (3, 16), "video": (3, 16)}
    assert shapes["avcil"] == {"audio": (16,), "video": (4, 16, 16)}
    clip, tokens = open_store(tmp_path / "clip.h5"), open_store(tmp_path / "tokens.h5")
    np.testing.assert_allclose(clip.load("video"), tokens.load("video").mean(dim=(1, 2)), atol=2e-2)
    assert clip.load("audio").std(dim=0).mean() > 0  # different clips, different features
    again = ex.extract(data, tmp_path / "again.h5", ex.make_config("builtin", SMALL, batch_size=5), report=print)
    assert again.written == 8
    assert (open_store(tmp_path / "again.h5").load("audio") == clip.load("audio")).all()  # seeded: reproducible


def test_bad_files_reported_once_and_exit_zero(clips, tmp_path):
    folder = clips.parent
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    # seeded noise: os.urandom's bytes now and then parse as a container without a video stream (a flaky reason)
    (tmp_path / "noise.webm").write_bytes(np.random.default_rng(0).bytes(5000))
    data = (folder / "c0.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    write_clip(tmp_path / "mute.mp4", np.zeros((10, 32, 32), np.uint8), 10)
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(data)
    locked.chmod(0)
    rows = [f"{folder / 'c0.mp4'},a,train", f"{folder / 'c1.mp4'},b,test", "text.mp4,a,train", "noise.webm,b,train",
            "cut.mp4,a,train", "mute.mp4,b,train", "locked.mp4,a,test", "gone.mp4,b,test"]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    result = run_cli("extract", str(tmp_path / "m.csv"), *SMALL, "decode.missing_audio=skip",
                     "--out", str(tmp_path / "s.h5"), "--workers", "2")
    assert result.returncode == 0, result.stderr
    store = open_store(tmp_path / "s.h5")
    errors = {store.ids[row]: reason for row, reason in store.errors.items()}
    expected = {"text.mp4": "not a video", "noise.webm": "not a video", "cut.mp4": "truncated",
                "mute.mp4": "no audio stream", "gone.mp4": "file not found"}
    if os.geteuid() != 0:
        expected["locked.mp4"] = "permission denied"
    for name, reason in expected.items():
        assert reason in errors[name], (name, errors)
        assert result.stderr.count(f"{name}:") == 1  # reported once, with the file
    assert store.complete and (store.status == WRITTEN).sum() == len(rows) - len(errors)
    assert f"{len(rows) - len(errors)} of {len(rows)} clips written, {len(errors)} failed" in result.stdout
    assert store.manifest["summary"]["failed"] == len(errors)


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "invalid choice"),
    (["decode.frames=many"], "decode.frames"),
    (["decode.colour=red"], "unknown key 'decode.colour'"),
    (["frames=3"], "must be decode.KEY=VALUE"),
    (["decode.sampling=random"], "sampling must be one of"),
    (["--encoder", "videomae"], "unknown encoder 'videomae'"),
    (["--video-dir", "/tmp"], "--video-dir applies to benchmark lists"),
    (["--weights", "/nonexistent.pt"], "encoder weights not found"),
])
def test_bad_arguments_exit_two(clips, tmp_path, args, message):
    result = run_cli("extract", str(clips), *args, "--out", str(tmp_path / "s.h5"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_dataset_and_changed_settings_on_resume(clips, tmp_path, monkeypatch):
    result = run_cli("extract", str(tmp_path / "none.csv"), "--out", str(tmp_path / "s.h5"))
    assert result.returncode == 2 and "dataset not found" in result.stderr
    def crash(job, decode, frontend):
        raise KeyboardInterrupt  # the user pressing Ctrl-C before the first clip is done

    monkeypatch.setattr(ex, "prepare", crash)
    with pytest.raises(KeyboardInterrupt):
        ex.extract(read_dataset(clips), tmp_path / "s.h5", ex.make_config("builtin", SMALL), report=print)
    assert not open_store(tmp_path / "s.h5").complete
    result = run_cli("extract", str(clips), *SMALL, "decode.frames=5", "--out", str(tmp_path / "s.h5"))
    assert result.returncode == 2 and "other settings" in result.stderr


def test_injected_failure_then_resume_recomputes_only_pending(clips, tmp_path, monkeypatch):
    data = read_dataset(clips)
    config = ex.make_config("builtin", SMALL, batch_size=3)
    real_prepare = ex.prepare
    decoded = crash_on_clip(monkeypatch, 7)  # dies while preparing the 7th clip: two batches of 3 are written
    with pytest.raises(RuntimeError, match="injected crash"):
        ex.extract(data, tmp_path / "s.h5", config, report=print)
    partial = open_store(tmp_path / "s.h5")
    assert not partial.complete and (partial.status == WRITTEN).sum() == 6
    decoded.clear()
    monkeypatch.setattr(ex, "prepare", lambda job, d, f: (decoded.append(job[0]), real_prepare(job, d, f))[1])
    summary = ex.extract(data, tmp_path / "s.h5", config, report=print)
    assert sorted(decoded) == [6, 7] and summary.computed == 2 and summary.written == 8
    fresh = ex.extract(data, tmp_path / "fresh.h5", config, report=print)
    assert fresh.computed == 8
    for field in ("audio", "video"):
        assert (open_store(tmp_path / "s.h5").load(field) == open_store(tmp_path / "fresh.h5").load(field)).all()


def test_sigkill_midway_then_resume(tmp_path):
    manifest = make_clips(tmp_path, 4, seconds=2.0)
    lines = manifest.read_text().splitlines()
    many = [lines[0]] + [f"{p.split(',')[0]}?{k},{p.split(',', 1)[1]}" for k in range(10) for p in lines[1:]]
    for k in range(10):  # 40 rows over 4 files (distinct paths: links)
        for i in range(4):
            os.link(tmp_path / f"c{i}.mp4", tmp_path / f"c{i}.mp4?{k}")
    manifest.write_text("\n".join(many) + "\n")
    store = tmp_path / "s.h5"
    args = [sys.executable, "-m", "avcl", "extract", str(manifest), *SMALL, "--out", str(store), "--batch-size", "1"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    written, deadline = 0, time.time() + 120
    while written < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with h5py.File(store, "r", locking=False) as h5:
                written = int((h5["status"][:] == WRITTEN).sum())
        except (OSError, KeyError):
            continue
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = open_store(store)
    done = int((killed.status == WRITTEN).sum())
    assert not killed.complete and 5 <= done < 40, done
    result = run_cli("extract", str(manifest), *SMALL, "--out", str(store), "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert f"{40 - done} computed by this run" in result.stdout
    final = open_store(store)
    assert final.complete and (final.status == WRITTEN).all() and not (final.status == FAILED).any()
    video = final.load("video")
    for k in range(1, 10):  # the same file gives the same features, before and after the kill
        assert (video[4 * k:4 * k + 4] - video[:4]).abs().max() < 1e-3


@needs_data
def test_real_clips_extract_and_train(tmp_path):
    clips = sorted(CLIPS.iterdir())
    rows = [f"{p},{'ab'[i % 2]},{'test' if i >= 6 else 'train'}" for i, p in enumerate(clips)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    result = run_cli("extract", str(tmp_path / "m.csv"), "decode.frames=8", "decode.size=64", "encoder.dim=32",
                     "--out", str(tmp_path / "real.h5"), "--workers", "2", "--output", "avcil")
    assert result.returncode == 0, result.stderr
    assert "10 of 10 clips written, 0 failed" in result.stdout
    store = open_store(tmp_path / "real.h5")
    assert store.fields["video"][0] == (8, 64, 32) and store.fields["audio"][0] == (32,)
    no_audio = {store.ids[i] for i in np.flatnonzero(~store.mask("audio"))}
    assert {Path(p).name for p in no_audio} == {"mmaction2_test.mp4", "mmaction2_demo.mp4"}
    assert store.manifest["versions"]["av"] and store.manifest["dataset"]["clips"] == 10
    run = run_cli("run", "files/avdigits", f"data.store={tmp_path / 'real.h5'}", "data.val_fraction=0",
                  "model.visual_grid=[8,64]", "scenario.num_tasks=1", "methods=[finetune]", "train.epochs=1",
                  "memory.size=4", "--out", str(tmp_path / "run"), "--quiet")
    assert run.returncode == 0, run.stderr
    assert "| finetune" in run.stdout


def test_weights_from_an_avcl_checkpoint(clips, tmp_path):
    torch.manual_seed(123)
    state = {f"encoders.audio.{k}": v for k, v in AudioConv1d((200, 32), 16).state_dict().items()}
    state.update({f"encoders.video.{k}": v for k, v in FrameConv((4, 32, 32), 16).state_dict().items()})
    torch.save({"task": 0, "model": state}, tmp_path / "ckpt.pt")
    data = read_dataset(clips)
    seeded = ex.extract(data, tmp_path / "seeded.h5", ex.make_config("builtin", SMALL), report=print)
    loaded = ex.extract(data, tmp_path / "loaded.h5",
                        ex.make_config("builtin", SMALL + [f"encoder.weights={tmp_path / 'ckpt.pt'}"]), report=print)
    assert seeded.written == loaded.written == 8
    manifest = open_store(tmp_path / "loaded.h5").manifest
    assert manifest["weights_sha256"] == hashlib.sha256((tmp_path / "ckpt.pt").read_bytes()).hexdigest()
    assert not torch.equal(open_store(tmp_path / "seeded.h5").load("audio"),
                           open_store(tmp_path / "loaded.h5").load("audio"))
    wrong = run_cli("extract", str(clips), *SMALL, "encoder.dim=8", "--weights", str(tmp_path / "ckpt.pt"),
                    "--out", str(tmp_path / "wrong.h5"))
    assert wrong.returncode == 2 and "do not fit encoder.dim=8" in wrong.stderr, wrong.stderr


# ---------------------------------------------------------------- --output raw

RAW = ["decode.frames=4", "decode.size=32", "audio.target_frames=120"]  # preset cav, small frames


def test_raw_output_stores_the_decoded_inputs(clips, tmp_path):
    data = read_dataset(clips)
    config = ex.make_config("cav", RAW, output="raw", batch_size=3)
    summary = ex.extract(data, tmp_path / "raw.h5", config, report=print)
    assert (summary.written, summary.failed) == (8, 0)
    store = open_store(tmp_path / "raw.h5")
    assert store.fields == {"video": ((4, 32, 32, 3), "uint8"), "audio": ((120, 128), "float16")}
    assert store.manifest["settings"]["encoder"] is None and store.manifest["weights_sha256"] is None
    video, audio = store.load("video", dtype=None), store.load("audio", dtype=None)
    assert video.dtype == torch.uint8 and audio.dtype == torch.float16
    # exactly what decoding and the front-end give for that file (fbank rounded to float16)
    clip = decode_clip(data.items[5].path, config.decode)
    assert torch.equal(video[5], torch.from_numpy(clip.video))
    expected = audio_features(clip.audio, 16000, config.audio).astype(np.float16)
    assert np.array_equal(audio[5].numpy(), expected)
    assert audio.float().std(dim=0).mean() > 0.1 and video.float().std(dim=0).mean() > 10  # distinct clips
    gray = ex.extract(data, tmp_path / "gray.h5", ex.make_config("cav", RAW + ["decode.gray=true"], output="raw"),
                      report=print)
    assert gray.written == 8 and open_store(tmp_path / "gray.h5").fields["video"] == ((4, 32, 32), "uint8")


def test_features_dataset_keeps_raw_dtypes_and_require_raw(clips, tmp_path):
    data = read_dataset(clips)
    ex.extract(data, tmp_path / "raw.h5", ex.make_config("cav", RAW, output="raw"), report=print)
    ex.extract(data, tmp_path / "feat.h5", ex.make_config("builtin", SMALL, output="avcil"), report=print)
    for dtype, audio_dtype in (("float16", torch.float16), ("float32", torch.float32)):
        cfg = load_config("synthetic", ["data.name=features", f"data.store={tmp_path / 'raw.h5'}",
                                        f"data.dtype={dtype}", "data.val_fraction=0"])
        dataset = build_dataset(cfg.data, None, 0)
        for split in (dataset.train, dataset.test):
            assert split["video"].dtype == torch.uint8 and split["video"].shape[1:] == (4, 32, 32, 3)
            assert split["audio"].dtype == audio_dtype and split["audio"].shape[1:] == (120, 128)
        require_raw(dataset)
        require_raw(dataset.test)
    require_raw(open_store(tmp_path / "raw.h5"))
    cfg = load_config("synthetic", ["data.name=features", f"data.store={tmp_path / 'feat.h5'}"])
    features = build_dataset(cfg.data, None, 0)
    message = (f"{tmp_path / 'feat.h5'}: no raw frames (field 'video' is float features (float32) of shape "
               "(4, 16, 16) per clip; need uint8 (T, H, W) or (T, H, W, 3) frames): extract with --output raw")
    with pytest.raises(AvclError) as caught:
        require_raw(features)
    assert str(caught.value) == message
    with pytest.raises(AvclError, match=r"feat.h5: no raw frames \(field 'video' is float features \(float16\)"):
        require_raw(open_store(tmp_path / "feat.h5"))
    samples = {"video": torch.zeros(2, 4, 8, 8, dtype=torch.uint8), "audio": torch.zeros(2, 16)}
    with pytest.raises(AvclError, match=r"samples: no raw audio \(field 'audio' is float features \(float32\) "
                                        r"of shape \(16,\) per clip"):
        require_raw(samples)
    with pytest.raises(AvclError, match=r"no raw frames \(no field 'video'; fields: \['audio'\]"):
        require_raw({"audio": torch.zeros(2, 16, 8)})


def test_raw_extraction_resumes_after_a_crash(clips, tmp_path, monkeypatch):
    data = read_dataset(clips)
    config = ex.make_config("cav", RAW, output="raw", batch_size=2)
    real_prepare = ex.prepare
    crash_on_clip(monkeypatch, 6)  # dies on the 6th clip: two batches of 2 are written
    with pytest.raises(RuntimeError, match="injected crash"):
        ex.extract(data, tmp_path / "s.h5", config, report=print)
    partial = open_store(tmp_path / "s.h5")
    assert not partial.complete and (partial.status == WRITTEN).sum() == 4
    monkeypatch.setattr(ex, "prepare", real_prepare)
    with pytest.raises(AvclError, match="other settings"):  # never mixes frames of other settings
        ex.extract(data, tmp_path / "s.h5", ex.make_config("cav", RAW + ["decode.size=16"], output="raw"))
    summary = ex.extract(data, tmp_path / "s.h5", config, report=print)
    assert summary.computed == 4 and summary.written == 8 and open_store(tmp_path / "s.h5").complete
    ex.extract(data, tmp_path / "fresh.h5", config, report=print)
    for field in ("audio", "video"):
        assert torch.equal(open_store(tmp_path / "s.h5").load(field, dtype=None),
                           open_store(tmp_path / "fresh.h5").load(field, dtype=None))


def test_raw_bad_files_and_arguments(clips, tmp_path):
    folder = clips.parent
    (tmp_path / "text.mp4").write_text("not a video\n" * 50)
    write_clip(tmp_path / "mute.mp4", np.full((10, 32, 32), 90, np.uint8), 10)
    rows = [f"{folder / 'c0.mp4'},a,train", "text.mp4,a,train", "mute.mp4,b,test", "gone.mp4,b,test"]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    reported = []
    summary = ex.extract(read_dataset(tmp_path / "m.csv"), tmp_path / "s.h5",
                         ex.make_config("cav", RAW, output="raw"), report=reported.append)
    assert (summary.written, summary.failed) == (2, 2) and len(reported) == 2
    store = open_store(tmp_path / "s.h5")
    assert {store.ids[r]: e.split(":")[0] for r, e in store.errors.items()} == {
        "text.mp4": "not a video file, or corrupt (FFmpeg found no valid data)", "gone.mp4": "file not found"}
    assert store.mask("audio").tolist() == [True, False, False, False]  # mute.mp4: no audio track -> zeros, masked
    assert (store.load("audio", rows=[2], dtype=None) == 0).all() and (store.load("video", rows=[2]) > 80).all()
    bad = run_cli("extract", str(clips), "--preset", "cav", "--weights", str(tmp_path / "m.csv"), "--output", "raw",
                  "--out", str(tmp_path / "b.h5"))
    assert bad.returncode == 2 and "--output raw runs no encoder" in bad.stderr and "Traceback" not in bad.stderr
    assert "extracting" not in bad.stderr  # refused before any work
    for args, message in ((["decode.sampling=fps", "decode.frames=0"], "set decode.frames > 0"),
                          (["audio.target_frames=0"], "set audio.target_frames > 0")):
        with pytest.raises(AvclError, match=message):
            ex.make_config("cav", args, output="raw")


@needs_data
def test_raw_real_clips(tmp_path):
    names = ["openl3_bento.mp4", "moviepy_fire2.mp4", "mmaction2_test.mp4", "moviepy_big_buck_bunny_432_433.webm"]
    rows = [f"{CLIPS / name},{'ab'[i % 2]},{'test' if i == 3 else 'train'}" for i, name in enumerate(names)]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    result = run_cli("extract", str(tmp_path / "m.csv"), "decode.size=64", "--preset", "cav", "--output", "raw",
                     "--out", str(tmp_path / "real.h5"), "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "4 of 4 clips written, 0 failed" in result.stdout and "no encoder, output 'raw'" in result.stderr
    store = open_store(tmp_path / "real.h5")
    assert store.fields == {"video": ((10, 64, 64, 3), "uint8"), "audio": ((1024, 128), "float16")}
    video, audio = store.load("video", dtype=None), store.load("audio", dtype=None).float()
    assert store.mask("audio").tolist() == [True, True, False, True]  # mmaction2_test.mp4 has no audio track
    assert (audio[2] == 0).all()
    for row in (0, 1, 3):  # real sound: 10 ms frames up to the clip's end, then zero padding
        seconds = {0: 1.1, 1: 2.4, 3: 1.0}[row]
        voiced = audio[row, :int(seconds * 100) - 5]
        assert voiced.std(dim=0).mean() > 0.5 and voiced.max() > 0 and (audio[row, int(seconds * 100) + 5:] == 0).all()
    assert (video[1, 0].float() - video[1, -1].float()).abs().mean() > 5  # the fire moves
    assert video.float().std() > 20  # not blank frames
    data = read_dataset(tmp_path / "m.csv")
    clip = decode_clip(data.items[0].path, ex.make_config("cav", ["decode.size=64"]).decode)
    assert torch.equal(video[0], torch.from_numpy(clip.video))  # portrait clip: centre crop of 64 x 64
