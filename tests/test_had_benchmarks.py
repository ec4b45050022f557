"""HAD's AVE and AVK recipes end to end on synthetic snippet features in the official layouts."""
import json

import numpy as np
import pytest

from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.store import create_store
from avcl.engine.runner import execute
from avcl.core.errors import AvclError

SNIPPETS, DA, DV = 10, 6, 8
FAST = ["train.epochs=25", "train.lr=0.003", "model.embed_dim=16", "model.feature_dim=16", "train.batch_size=16",
        "train.replay_batch_size=8"]


def write_store(path, ids, labels_for_signal, no_audio=()):
    """Snippet features whose class shows in both modalities, so a model can learn them."""
    rng = np.random.default_rng(0)
    n = len(ids)
    with create_store(path, ids, {"audio": ((SNIPPETS, DA), "float16"), "video": ((SNIPPETS, DV), "float16")},
                      manifest={"encoder": "synthetic"}) as writer:
        audio = rng.normal(size=(n, SNIPPETS, DA)) + np.eye(DA)[np.asarray(labels_for_signal) % DA][:, None] * 3
        video = rng.normal(size=(n, SNIPPETS, DV)) + np.eye(DV)[np.asarray(labels_for_signal) % DV][:, None] * 3
        masks = {"audio": np.array([i not in no_audio for i in range(n)])}
        writer.write(np.arange(n), {"audio": audio, "video": video}, masks=masks)
        writer.finalize()


def test_ave_recipe_runs_on_snippet_features(tmp_path):
    categories = [f"Event {c}" for c in range(8)]
    ids, labels, lines = [], [], []
    for c, name in enumerate(categories):
        for k in range(12):
            vid = f"vid{c:02d}{k:02d}xyz"
            ids.append(vid)
            labels.append(c)
            lines.append(f"{name}&{vid}&good&0&10")
    (tmp_path / "ave").mkdir()
    (tmp_path / "ave" / "Annotations.txt").write_text("\n".join(lines[:-1]) + "\n")  # one video lacks a line
    write_store(tmp_path / "ave" / "snippets.h5", ids, labels)
    cfg = load_config("had/ave", FAST + ["methods=[had,finetune]", "memory.size=40"])
    results = execute(cfg, tmp_path / "run", data_root=str(tmp_path), show_progress=False)
    assert [len(r) for r in results["had"]["accuracy_matrix"]] == [1, 2, 3, 4]
    assert results["had"]["average_incremental_accuracy"] > results["finetune"]["average_incremental_accuracy"]
    info = json.loads((tmp_path / "run" / "dataset.json").read_text())["info"]
    assert "ours" in info["split"]


@pytest.mark.parametrize("k", [100])
def test_avk_recipe_builds_and_runs(tmp_path, k):
    rows, ids, labels = ["youtube_id,time_start,time_end,label,split"], [], []
    for c in range(12):
        for j in range(10):
            vid = f"k{c:02d}v{j:02d}abcd"
            rows.append(f"{vid},{j},{j + 10},class {c},{'train' if j < 7 else 'validate'}")
            ids.append(f"{vid}_{j:06d}_{j + 10:06d}")
            labels.append(c)
    (tmp_path / "kinetics400").mkdir()
    (tmp_path / "kinetics400" / "annotations.csv").write_text("\n".join(rows) + "\n")
    write_store(tmp_path / "kinetics400" / "snippets.h5", ids, labels, no_audio={0, 1, 2})
    overrides = FAST + ["data.num_classes=10", "scenario.num_tasks=5", "memory.size=40", "methods=[had]"]
    cfg = load_config(f"had/avk{k}", overrides)
    dataset = build_dataset(cfg.data, str(tmp_path), cfg.seed)
    assert len(dataset.class_names) == 10
    kept = {v for split in dataset.info["video_ids"].values() for v in split}
    assert not kept & {ids[0], ids[1], ids[2]}, "videos without an audio track are dropped"
    results = execute(cfg, tmp_path / "run", data_root=str(tmp_path), show_progress=False)
    assert results["had"]["accuracy_matrix"][0][0] > 0.5
    saved = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert saved["info"]["classes"] == dataset.class_names and "video_ids" in saved["info"]
    with pytest.raises(AvclError, match="num_classes"):
        build_dataset(load_config(f"had/avk{k}", ["data.num_classes=50"]).data, str(tmp_path), 0)
