"""The three official AV-CIL recipes end to end on tiny synthetic features in the official layout,
and ``avcl convert-features`` (the recipes then read the store)."""
import h5py
import pytest
import torch

from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.avcil_official import STORE_FILE, AVCILOfficialOptions, write_synthetic_layout
from avcl.data.store import open_store
from avcl.engine.runner import execute
from avcl.report.tables import report
from conftest import run_cli


pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = {"avcil/ave": ("AVE", 28), "avcil/ksounds": ("ksounds", 30), "avcil/vggsound100": ("VGGSound_100", 100)}
BASELINES = ("ssil", "icarl", "afc", "lwf", "finetune", "joint")


def tiny(root, epochs=2):
    """Protocol kept (classes, steps, methods, selection); dimensions, epochs, batches made tiny
    (and a larger learning rate, since a few Adam steps at 1e-3 barely move the weights)."""
    return [f"data.root={root}", "data.dtype=float32", "model.visual_grid=[2,4]", "model.feature_dim=16",
            f"train.epochs={epochs}", "train.lr=0.01", "train.batch_size=32", "train.replay_batch_size=16", "eval.batch_size=64",
            "memory.size=200", *[f"method_args.{m}.epochs={epochs}" for m in BASELINES]]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_official_recipe_runs_end_to_end(tmp_path, recipe):
    dataset, classes = RECIPES[recipe]
    write_synthetic_layout(tmp_path / "data", dataset, num_classes=classes, per_class=(6, 2, 2),
                           audio_dim=8, tokens=8, video_dim=8, noise=0.5)
    cfg = load_config(recipe, tiny(tmp_path / "data", epochs=8 if recipe == "avcil/ave" else 2))
    results = execute(cfg, tmp_path / "run", show_progress=False)
    assert set(results) == set(cfg.methods)
    for name, m in results.items():
        assert m["complete"] and len(m["accuracy_matrix"]) == cfg.scenario.num_tasks, name
        assert m["forgetting_variant"] == "avcil"
    # AFC-LSC and AFC-NME, iCaRL-NME and iCaRL-FC: one run each, the second head as its own table row
    assert set(results["afc"]["heads"]) == {"nme"} and set(results["icarl"]["heads"]) == {"fc"}
    table = report(tmp_path / "run")
    assert "| afc [nme] " in table and "| icarl [fc] " in table
    if recipe == "avcil/ave":  # low noise: the first task is learned in a few epochs
        assert results["avcil"]["accuracy_matrix"][0][0] >= 0.5, results["avcil"]["accuracy_matrix"]


def test_convert_features_writes_a_store_the_recipes_read(tmp_path):
    folder = write_synthetic_layout(tmp_path, "ksounds", num_classes=4, per_class=(3, 1, 2), audio_dim=5,
                                    tokens=6, video_dim=3)
    options = AVCILOfficialOptions(dataset="ksounds", root=str(tmp_path), dtype="float32")
    direct = build_dataset(options, None, 0)
    done = run_cli("convert-features", "--dataset", "ksounds", "--root", str(tmp_path), "--quiet")
    assert done.returncode == 0, done.stderr
    store = open_store(folder / STORE_FILE)
    assert store.complete and store.fields == {"audio": ((5,), "float16"), "video": ((6, 3), "float16")}
    assert store.class_names == direct.class_names
    assert all(f.get("sha256") for f in store.manifest["files"].values())
    with h5py.File(folder / STORE_FILE) as h5:
        assert h5["features/video"].dtype == "float16"
    via_store = build_dataset(options, None, 0)  # the default store path is picked up
    assert via_store.info.get("store") == str(folder / STORE_FILE)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(via_store, split)["label"], getattr(direct, split)["label"])
        torch.testing.assert_close(getattr(via_store, split)["video"], getattr(direct, split)["video"],
                                   atol=1e-3, rtol=1e-3)  # float16 on disk
    again = run_cli("convert-features", "--dataset", "ksounds", "--root", str(tmp_path), "--quiet")
    assert again.returncode == 2 and "already a complete feature store" in again.stderr
