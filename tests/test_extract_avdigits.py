"""Files -> decode -> extract -> train on AV-Digits written as MP4 clips (real speech and handwriting)."""
import numpy as np

from avcl.data.store import WRITTEN, open_store
from avcl.media.decode import DecodeOptions, decode_clip
from tests.conftest import DATA_DIR, needs_data, run_cli


@needs_data
def test_avdigits_videos_extract_and_train(tmp_path):
    out = tmp_path / "videos"
    made = run_cli("make-avdigits-videos", str(out), "--per-class", "4", "--data-root", DATA_DIR)
    assert made.returncode == 0, made.stderr
    rows = (out / "manifest.csv").read_text().splitlines()
    assert rows[0] == "path,label,split" and len(rows) - 1 == 10 * (4 + 2)  # 4 train + 4 // 4 + 1 test per digit
    assert {r.split(",")[2] for r in rows[1:]} == {"train", "test"}
    first = out / rows[1].split(",")[0]
    clip = decode_clip(first, DecodeOptions(frames=8, size=64, gray=True))
    assert clip.ok and clip.info["video_codec"] == "h264" and clip.info["audio_codec"] == "aac"
    assert clip.video.max() > 200 and np.abs(clip.audio).max() > 0.05  # a digit is drawn, someone speaks

    store = tmp_path / "features.h5"
    extracted = run_cli("extract", str(out / "manifest.csv"), "encoder.dim=32", "--out", str(store),
                        "--preset", "avdigits", "--output", "avcil", "--workers", "2")
    assert extracted.returncode == 0, extracted.stderr
    assert "60 of 60 clips written, 0 failed" in extracted.stdout
    features = open_store(store)
    assert features.complete and (features.status == WRITTEN).all() and features.class_names == [str(d) for d in range(10)]
    assert features.fields["video"][0] == (8, 64, 32) and features.fields["audio"][0] == (32,)

    run = run_cli("run", "files/avdigits", f"data.store={store}", "methods=[finetune,icarl]", "scenario.num_tasks=2",
                  "train.epochs=2", "memory.size=20", "--out", str(tmp_path / "run"), "--quiet")
    assert run.returncode == 0, run.stderr
    assert "| finetune" in run.stdout and "| icarl" in run.stdout
