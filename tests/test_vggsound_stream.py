"""The VGGSound pre-training stream: a VGGSound list + stat.csv + a raw store of the user's videos."""
import csv

import numpy as np
import pytest
import torch

import avcl.apps.extract as ex
from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.scenario import class_incremental
from avcl.data.store import create_store
from avcl.core.errors import AvclError
from avcl.media.encode import write_clip
from avcl.media.manifests import read_dataset
from tests.conftest import DATA_DIR, needs_data

STAT = [("bird chirping, tweeting", 50, "animals"), ("dog barking", 40, "animals"), ("cat meowing", 30, "animals"),
        ("playing drums", 50, "music"), ("playing piano", 45, "music"), ("hammering", 20, "tools")]
# class -> (train clips, test clips); dog barking has no test clip, so it is not usable for the stream
CLIPS = {"bird chirping, tweeting": (3, 1), "dog barking": (2, 0), "cat meowing": (2, 1), "playing drums": (2, 1),
         "playing piano": (2, 1), "hammering": (2, 0)}
SMALL = ["data.tasks=[animals,music]", "data.classes_per_task=2", "data.max_train_per_class=2"]


def write_stat(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle, lineterminator="\r\n").writerows(rows)  # the released file has CRLF line ends


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A data root in the documented layout, its videos extracted with avcl extract --output raw."""
    root = tmp_path_factory.mktemp("vggsound")
    write_stat(root / "meta/vggsound/stat.csv", STAT)
    rows, k = [], 0
    for name, (train, test) in CLIPS.items():
        for split, count in (("train", train), ("test", test)):
            for _ in range(count):
                youtube_id, start = f"v-{k}_x{k % 3}", 10 * k  # ids with '-' and '_', as YouTube's
                tone = 0.2 * np.sin(2 * np.pi * (300 + 40 * k) * np.arange(8000) / 16000).astype(np.float32)
                write_clip(root / "videos" / f"{youtube_id}_{start:06d}.mp4",
                           np.full((5, 32, 32), 20 + 10 * k, np.uint8), 10, tone, 16000)
                rows.append((youtube_id, start, name, split))
                k += 1
    write_clip(root / "videos/mute_000007.mp4", np.full((5, 32, 32), 250, np.uint8), 10)  # no audio track
    rows += [("mute", 7, "cat meowing", "train"), ("gone", 3, "playing piano", "train")]  # "gone": no file
    write_stat(root / "meta/vggsound/vggsound.csv", rows)
    data = read_dataset(root / "meta/vggsound/vggsound.csv", video_dir=root / "videos")
    config = ex.make_config("cav", ["decode.frames=4", "decode.size=16", "audio.target_frames=100"], output="raw")
    summary = ex.extract(data, root / "vggsound/raw.h5", config, report=lambda line: None)
    assert (summary.written, summary.failed) == (len(rows) - 1, 1)
    return root


def brightness(clip_id: str) -> float:
    """The grey level clip ``v-<k>_...`` was drawn with."""
    return 20.0 + 10 * int(clip_id.split("-")[1].split("_")[0])


def build(root, *overrides, seed=0):
    cfg = load_config("synthetic", ["data.name=vggsound_stream", *SMALL, *overrides])
    return build_dataset(cfg.data, str(root), seed)


def test_stream_tasks_splits_and_held_out(root):
    dataset = build(root)  # csv, stat and store at their default paths under the data root
    assert dataset.class_names == ["bird chirping, tweeting", "cat meowing", "playing drums", "playing piano"]
    assert dataset.info["tasks"] == [
        {"name": "animals", "categories": ["animals"], "classes": ["bird chirping, tweeting", "cat meowing"],
         "usable_classes": 2},
        {"name": "music", "categories": ["music"], "classes": ["playing drums", "playing piano"], "usable_classes": 2}]
    # bird: 3 train clips capped to 2; cat's mute clip and piano's missing file are left out
    assert dataset.info["counts"] == {"train": 8, "val": 0, "test": 4, "held_out": 4}
    assert dataset.info["held_out_classes"] == ["dog barking", "hammering"]
    for split in (dataset.train, dataset.test, dataset.held_out):
        n = len(split["label"])
        assert split["video"].shape == (n, 4, 16, 16, 3) and split["video"].dtype == torch.uint8
        assert split["audio"].shape == (n, 100, 128) and split["audio"].dtype == torch.float16
    assert dataset.train["label"].bincount().tolist() == [2, 2, 2, 2]
    assert dataset.test["label"].tolist() == [0, 1, 2, 3]
    assert dataset.held_out["label"].bincount().tolist() == [2, 2]
    ids = dataset.info["video_ids"]
    assert not set(ids["held_out"]) & set(ids["train"] + ids["test"]) and "mute_000007" not in ids["train"]
    # every row holds the frames of its own clip (each clip was drawn at its own brightness)
    for split in ("train", "test", "held_out"):
        measured = getattr(dataset, split)["video"].float().mean(dim=(1, 2, 3, 4))
        expected = torch.tensor([brightness(i) for i in ids[split]])
        assert (measured - expected).abs().max() < 3, split
    # the recipe's scenario: tasks in the order of data.tasks
    scenario = class_incremental(dataset, num_tasks=2, shuffle_classes=False)
    assert [[scenario.class_names[c] for c in t.classes] for t in scenario.tasks] == [
        ["bird chirping, tweeting", "cat meowing"], ["playing drums", "playing piano"]]
    assert len(scenario.tasks[0].train["label"]) == 4 and len(scenario.tasks[1].test["label"]) == 2


def test_options_cap_choose_and_refuse(root):
    capped = build(root, "data.max_held_out=3", "data.val_fraction=0.5")
    assert capped.info["counts"] == {"train": 4, "val": 4, "test": 4, "held_out": 3}
    assert len(build(root, "data.max_held_out=0").held_out) == 0
    # dog barking becomes usable without a test clip; tools is a category of its own
    loose = build(root, "data.min_test_per_class=0", "data.tasks=[animals,tools]", "data.classes_per_task=1")
    assert loose.class_names == ["bird chirping, tweeting", "hammering"]
    parts = build(root, "data.min_test_per_class=0", "data.tasks=[animals_part1,animals_part2]",
                  "data.classes_per_task=1")
    assert [t["classes"] for t in parts.info["tasks"]] == [["bird chirping, tweeting"], ["cat meowing"]]  # halves
    seeded = {tuple(build(root, "data.class_selection=seeded", "data.min_test_per_class=0",
                          "data.classes_per_task=1", seed=s).class_names) for s in range(8)}
    assert len(seeded) > 1 and all(len(c) == 2 for c in seeded)
    with pytest.raises(AvclError, match=r"task 'animals' \(categories \['animals'\]\) has 2 usable classes .* of 3 in "
                                        r"stat.csv; data.classes_per_task=3 needs 3 \(or set data.allow_fewer=true\)"):
        build(root, "data.classes_per_task=3")
    fewer = build(root, "data.classes_per_task=3", "data.allow_fewer=true")
    assert fewer.info["classes_per_task"] == 2 and len(fewer.class_names) == 4
    with pytest.raises(AvclError, match=r"'spam' names unknown category \['spam'\]"):
        build(root, "data.tasks=[animals,spam]")
    with pytest.raises(AvclError, match="data.csv: file not found: nowhere.csv"):
        build(root, "data.csv=nowhere.csv")


def test_refuses_a_store_of_features(root, tmp_path):
    ids = [f"{row[0]}_{int(row[1]):06d}" for row in csv.reader(open(root / "meta/vggsound/vggsound.csv"))]
    fields = {"audio": ((16,), "float16"), "video": ((4, 16, 16), "float16")}
    with create_store(tmp_path / "feats.h5", ids, fields) as writer:
        writer.write(np.arange(len(ids)), {"audio": np.zeros((len(ids), 16)), "video": np.zeros((len(ids), 4, 16, 16))})
        writer.finalize()
    with pytest.raises(AvclError, match=r"feats.h5: no raw frames \(field 'video' is float features \(float16\) of "
                                        r"shape \(4, 16, 16\) per clip.*: extract with --output raw"):
        build(root, f"data.store={tmp_path / 'feats.h5'}")


def test_released_test_list_is_read_but_has_no_training_clips(root, tmp_path):
    rows = [(f"{r[0]}_{int(r[1]):06d}.mp4", r[2]) for r in csv.reader(open(root / "meta/vggsound/vggsound.csv"))
            if r[3] == "test"]
    write_stat(tmp_path / "test.csv", rows)  # the released test.csv's format: file,label
    with pytest.raises(AvclError, match=r"test.csv: no training clips of the chosen classes in .*raw.h5 \(splits in "
                                        r"the list: \['test'\]"):
        build(root, f"data.csv={tmp_path / 'test.csv'}", "data.min_train_per_class=0")


def test_bad_stat_file(root, tmp_path):
    write_stat(tmp_path / "stat.csv", [("dog barking", 40, "animals"), ("cat meowing", "many", "animals")])
    with pytest.raises(AvclError, match=r"stat.csv:2: clip count is not a number: 'many'"):
        build(root, f"data.stat={tmp_path / 'stat.csv'}")


@needs_data
def test_default_tasks_on_the_released_stat_csv(tmp_path):
    """The spec's 8 tasks x 20 classes from the real stat.csv (309 classes), on a tiny stand-in store."""
    stat = [row for row in csv.reader(open(f"{DATA_DIR}/meta/vggsound/stat.csv", newline="")) if row]
    rows = [(f"id{i}-{s}", 0, name, s) for i, (name, _, _) in enumerate(stat) for s in ("train", "test")]
    write_stat(tmp_path / "vggsound.csv", rows)
    ids = [f"{r[0]}_000000" for r in rows]
    fields = {"audio": ((8, 4), "float16"), "video": ((2, 4, 4, 3), "uint8")}
    with create_store(tmp_path / "raw.h5", ids, fields) as writer:
        writer.write(np.arange(len(ids)), {"audio": np.zeros((len(ids), 8, 4)),
                                           "video": np.zeros((len(ids), 2, 4, 4, 3))})
        writer.finalize()
    cfg = load_config("synthetic", ["data.name=vggsound_stream", f"data.csv={tmp_path / 'vggsound.csv'}",
                                    f"data.store={tmp_path / 'raw.h5'}"])
    dataset = build_dataset(cfg.data, DATA_DIR, 0)  # stat.csv: meta/vggsound/stat.csv under the data root
    category = {name: cat for name, _, cat in stat}
    tasks = dataset.info["tasks"]
    assert [t["name"] for t in tasks] == ["sports", "music", "vehicle", "people", "animals", "home_nature",
                                          "others_part1", "others_part2"]
    assert len(dataset.class_names) == 160 and len(set(dataset.class_names)) == 160
    assert dataset.class_names == [c for t in tasks for c in t["classes"]]
    assert tasks[0]["classes"] == [name for name, _, cat in stat if cat == "sports"][:20]  # stat.csv order
    for task, allowed in zip(tasks, [{"sports"}, {"music"}, {"vehicle"}, {"people"}, {"animals"},
                                     {"home", "nature"}, {"others", "tools"}, {"others", "tools"}]):
        assert len(task["classes"]) == 20 and {category[c] for c in task["classes"]} <= allowed
    others = [name for name, _, cat in stat if cat in ("others", "tools")]  # 45: halves of 23 and 22
    assert tasks[6]["classes"] == others[:20] and tasks[7]["classes"] == others[23:43]
    assert {category[c] for c in tasks[5]["classes"]} == {"home", "nature"}
    assert dataset.info["counts"] == {"train": 160, "val": 0, "test": 160, "held_out": 149}
    assert len(dataset.info["held_out_classes"]) == 149
    assert not set(dataset.info["held_out_classes"]) & set(dataset.class_names)


TINY_RUN = [  # the recipe at a few clips' scale: 2 tasks x 2 classes, a tiny backbone, one epoch
    "data.tasks=[animals,music]", "scenario.num_tasks=2", "data.classes_per_task=2", "data.max_train_per_class=2",
    "data.min_test_per_class=1",
    "model.vit.size=tiny", "model.vit.width=32", "model.vit.depth=1", "model.vit.fusion_depth=1", "model.vit.heads=2",
    "model.vit.decoder_width=32", "model.vit.decoder_depth=1", "model.vit.decoder_heads=2", "model.vit.video_patch=8",
    "model.vit.audio_patch=[10,16]", "model.vit.audio_frames=100", "model.vit.frames=2", "model.vit.video_window=4",
    "train.epochs=1", "train.batch_size=2", "train.replay_batch_size=2", "train.device=cpu", "memory.size=4",
    "init.epochs=1", "init.avm_epochs=1", "init.batch_size=2", "eval.retrieval_per_class=1", "eval.recall_at=[1,2]",
    "eval.probe_epochs=2", "eval.probe_warmup_epochs=1"]


def test_pretrain_vggsound_recipe_runs_end_to_end(root, tmp_path):
    import json

    from conftest import run_cli
    out = tmp_path / "run"
    result = run_cli("run", "pretrain/vggsound", *TINY_RUN, "--data-root", str(root), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    dataset = json.loads((out / "dataset.json").read_text())  # which classes the stream was built from
    assert [t["classes"] for t in dataset["info"]["tasks"]] == [["bird chirping, tweeting", "cat meowing"],
                                                                ["playing drums", "playing piano"]]
    for method in ("init", "finetune", "stella", "stella-plus", "multitask"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert metrics["complete"], method
        assert len(metrics["retrieval_matrices"]["a2v"]["R@1"][-1]) == 2  # both tasks evaluated
        assert 0 <= metrics["probe_accuracy"] <= 1
    assert "| stella-plus" in result.stdout and "A→V R@1" in result.stdout
