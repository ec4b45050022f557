"""Scenarios users of Avalanche, Mammoth, PyCIL and FACIL expect (issue 12): task-aware accuracy
beside class-incremental, a base task plus increments, a blurry pre-training stream."""
import contextlib
import json

import pytest
import torch

from avcl.data.scenario import Task
from avcl.eval.evaluator import accuracies_tag_taw, task_bounds
from avcl.cli import main
from conftest import TINY, error_lines

FAST = TINY + ["train.epochs=5", "train.num_threads=1"]


def _task(index, classes, labels):
    labels = torch.tensor(labels)
    test = {"audio": torch.zeros(len(labels), 1), "label": labels}
    return Task(index, classes, test, test, test)


def test_task_aware_accuracy_restricts_scores_to_the_clips_own_task():
    tasks = [_task(0, [0, 1], [0, 1]), _task(1, [2, 3], [2, 3])]
    # every clip's highest score is on class 3 (wrong for 3 clips without a task id); within the
    # clip's own task, the second column of the task wins: right for labels 1 and 3 only
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9], [0.1, 0.5, 0.2, 0.9], [0.1, 0.5, 0.2, 0.9], [0.1, 0.5, 0.2, 0.9]])
    predict = lambda batch: scores[: len(batch["label"])]  # noqa: E731
    both = accuracies_tag_taw(predict, tasks, "test", 8, "cpu", contextlib.nullcontext)
    assert both["tag"] == ([0.0, 0.5], 0.25)
    assert both["taw"] == ([0.5, 0.5], 0.5)
    assert task_bounds(tasks).tolist() == [[0, 2], [0, 2], [2, 4], [2, 4]]


def test_run_reports_taw_matrix_beside_the_class_incremental_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "synthetic", *FAST, "methods=[finetune,icarl]", "--out", str(out), "--quiet"]) == 0
    stdout = capsys.readouterr().out
    assert "TAw last acc" in stdout and "TAw = task-aware" in stdout
    for method in ("finetune", "icarl"):
        m = json.loads((out / method / "metrics.json").read_text())
        heads = [m] + list(m["heads"].values())  # icarl: its FC head too
        for h in heads:
            assert [len(r) for r in h["taw_accuracy_matrix"]] == [1, 2, 3]
            for tag_row, taw_row in zip(h["accuracy_matrix"], h["taw_accuracy_matrix"]):
                # a task id can only help: the right class is still among the task's classes
                assert all(taw >= tag - 1e-9 for tag, taw in zip(tag_row, taw_row))
            assert h["taw_last_accuracy"] == pytest.approx(h["taw_step_accuracy"][-1])
            for key in ("taw_average_incremental_accuracy", "taw_forgetting", "taw_bwt"):
                assert isinstance(h[key], float)
    finetune = json.loads((out / "finetune" / "metrics.json").read_text())
    # finetune forgets old classes without a task id; with it, old tasks stay far above that
    assert finetune["taw_last_accuracy"] > finetune["last_accuracy"] + 0.2


# --- a base task plus increments: scenario.first_task_classes --------------------------------------

def _scenario(*overrides, recipe="synthetic"):
    from avcl.config import load_config
    from avcl.engine.runner import make_scenario
    return make_scenario(load_config(recipe, [*TINY, *overrides]))


def test_first_task_classes_gives_a_base_task_then_equal_increments():
    scenario = _scenario("scenario.first_task_classes=4")  # 6 classes, 3 tasks -> 4 + 1 + 1
    assert [len(t.classes) for t in scenario.tasks] == [4, 1, 1]
    assert [t.classes for t in scenario.tasks] == [[0, 1, 2, 3], [4], [5]]
    assert set(scenario.tasks[0].test["label"].tolist()) == {0, 1, 2, 3}
    # the older name of the key still loads (configs of earlier runs), and means the same
    assert [len(t.classes) for t in _scenario("scenario.initial_classes=4").tasks] == [4, 1, 1]


@pytest.mark.parametrize("overrides, fragments", [
    (["scenario.first_task_classes=3"], ["first_task_classes=3", "num_tasks=3", "one of [2, 4]"]),
    (["scenario.first_task_classes=7"], ["first_task_classes=7", "below 6"]),
    (["scenario.first_task_classes=-1"], ["first_task_classes", ">= 0"]),
    (["scenario.first_task_classes=4", "scenario.initial_classes=2"], ["initial_classes", "one of them"]),
])
def test_first_task_classes_that_do_not_divide_are_refused_before_anything_is_written(
        overrides, fragments, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "synthetic", *TINY, *overrides, "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("avcl: error:")
    for fragment in fragments:
        assert fragment in err[0], err[0]
    assert not out.exists()


def test_first_task_classes_trains_end_to_end(tmp_path):
    from avcl.config import load_config
    from avcl.engine.runner import execute
    cfg = load_config("synthetic", [*FAST, "methods=[finetune]", "scenario.first_task_classes=4"])
    m = execute(cfg, tmp_path, show_progress=False)["finetune"]
    assert [len(r) for r in m["accuracy_matrix"]] == [1, 2, 3]
    assert m["taw_accuracy_matrix"][1][1] == 1.0  # a one-class task is always right with its task id
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert [len(t["classes"]) for t in dataset["tasks"]] == [4, 1, 1]


# --- a blurry pre-training stream: scenario.blurry -------------------------------------------------

def _ids(samples):
    """One id per clip (its audio bytes): clips are unique in the synthetic data."""
    return sorted(hash(a.numpy().tobytes()) for a in samples["audio"])


def test_blurry_moves_a_fraction_of_each_tasks_training_clips_to_other_tasks():
    from avcl.data.scenario import blur
    sharp = _scenario()
    blurry = blur(sharp, 0.25, seed=0)
    n = [len(t.train["label"]) for t in sharp.tasks]
    moved = blurry.info["blurry"]["moved_train_clips"]
    for t, (before, after) in enumerate(zip(sharp.tasks, blurry.tasks)):
        assert sum(moved[t]) == round(0.25 * n[t]) and moved[t][t] == 0
        labels = after.train["label"]
        own = (labels >= before.classes[0]) & (labels <= before.classes[-1])
        assert int(own.sum()) == n[t] - sum(moved[t])  # what stayed
        assert int((~own).sum()) == blurry.info["blurry"]["foreign_train_clips"][t] > 0  # what arrived
        assert after.classes == before.classes  # ownership, val and test unchanged
        assert torch.equal(after.test["label"], before.test["label"]) and torch.equal(after.val["audio"], before.val["audio"])
    # no clip lost or duplicated: the union of the training streams is the same
    assert _ids({"audio": torch.cat([t.train["audio"] for t in blurry.tasks])}) == \
        _ids({"audio": torch.cat([t.train["audio"] for t in sharp.tasks])})
    again = blur(sharp, 0.25, seed=0)
    assert all(torch.equal(a.train["label"], b.train["label"]) for a, b in zip(again.tasks, blurry.tasks))
    assert blur(sharp, 0.0) is sharp
    with pytest.raises(Exception, match="scenario.blurry"):
        blur(sharp, 1.0)


def test_blurry_is_refused_for_class_incremental_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "synthetic", *TINY, "scenario.blurry=0.2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "scenario.blurry" in err and "label-free" in err and not out.exists()


def test_blurry_online_pretraining_stream_runs_end_to_end(tmp_path):
    from avcl.config import load_config
    from avcl.engine.runner import execute
    cfg = load_config("pretrain/synthetic", ["methods=[er]", "scenario.blurry=0.25", "train.epochs=1",
                                              "init.epochs=0", "init.avm_epochs=0", "train.num_threads=1",
                                              "eval.probe=none"])
    m = execute(cfg, tmp_path, show_progress=False)["er"]
    assert m["complete"] and len(m["retrieval_matrices"]["a2v"]["R@1"]) == 3
    dataset = json.loads((tmp_path / "dataset.json").read_text())
    assert dataset["info"]["blurry"]["fraction"] == 0.25
    assert sum(t["train"] for t in dataset["tasks"]) == 6 * 16  # every clip still in the stream, once


def test_a_record_checkpointed_before_taw_resumes_without_wrong_taw_rows():
    from omegaconf import OmegaConf

    from avcl.eval.protocols import Accuracy
    tasks = [_task(0, [0, 1], [0, 1]), _task(1, [2, 3], [2, 3])]
    cfg = OmegaConf.create({"eval": {"batch_size": 8, "forgetting": "standard"}})
    protocol = Accuracy(cfg, None, "cpu", contextlib.nullcontext)

    class Method:
        predict = staticmethod(lambda batch: torch.nn.functional.one_hot(batch["label"], 4).float())

        def extra_heads(self):
            return {"nme": self.predict}
    old = {"matrix": [[1.0]], "step": [1.0], "val": [None], "heads": {"nme": {"matrix": [[1.0]], "step": [1.0]}}}
    protocol.after_task(Method(), tasks, old)
    m = protocol.metrics(old)
    assert m["accuracy_matrix"] == [[1.0], [1.0, 1.0]] and "taw_accuracy_matrix" not in m
    assert "taw_last_accuracy" not in m["heads"]["nme"]
    fresh = protocol.new_record()
    for t in (1, 2):
        protocol.after_task(Method(), tasks[:t], fresh)
    assert protocol.metrics(fresh)["taw_accuracy_matrix"] == [[1.0], [1.0, 1.0]]
