"""Continual pre-training through the one runner: retrieval/probe metrics, the init stage, labels kept
from the learner, kill + resume, and bad input refused before anything is written."""
import json

import pytest
import torch

from avcl.config import load_config
from avcl.engine import runner
from avcl.engine.runner import execute
from avcl.methods import METHODS
from conftest import run_cli

RECIPE = "pretrain/synthetic"
ALL = ["finetune", "er", "derpp", "lump", "mir", "clser", "gmed", "multitask", "stella", "stella-plus"]
MEASURED = {"train_seconds", "task_seconds", "peak_memory_mib"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain")
    cfg = load_config(RECIPE, [f"methods=[{','.join(ALL)}]"])
    return run_dir, execute(cfg, run_dir, show_progress=False)


def test_every_method_writes_the_retrieval_metrics(reference):
    run_dir, results = reference
    for name in ALL:
        m = results[name]
        assert m["complete"] and m["protocol"] == "retrieval", name
        for key in ("a2v_average", "v2a_average", "a2v_forgetting", "v2a_forgetting", "a2v_forgetting_textbook",
                    "probe_accuracy", "train_seconds", "peak_memory_mib"):
            assert key in m, (name, key)
        rows = 1 if name == "multitask" else 3  # multitask: one task made of all tasks
        for direction in ("a2v", "v2a"):
            for metric in ("R@1", "R@5", "R@10", "median_rank"):
                matrix = m["retrieval_matrices"][direction][metric]
                assert [len(r) for r in matrix] == [3] * rows, (name, direction, metric)
        assert 0 <= m["a2v_average"] <= 1 and 0 <= m["probe_accuracy"] <= 1
        assert m["peak_memory_mib"] > 0
        assert (run_dir / name / "retrieval_matrix.png").stat().st_size > 1000
    assert results["multitask"]["a2v_forgetting"] is None  # a single evaluation: no forgetting
    assert (run_dir / "retrieval.png").stat().st_size > 1000


def test_init_stage_runs_once_and_every_method_starts_from_it(reference):
    run_dir, results = reference
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "init_start" for e in events) == 1
    init = json.loads((run_dir / "init" / "metrics.json").read_text())
    assert init["method"] == "init" and len(init["retrieval_matrices"]["a2v"]["R@1"]) == 1
    saved = torch.load(run_dir / "init" / "model.pt", weights_only=True)["model"]
    cfg = load_config(RECIPE, ["methods=[finetune]"])
    scenario = runner.make_scenario(cfg)
    method = runner.build_method("finetune", cfg, scenario.tasks[0].train)
    fresh = {k: v.clone() for k, v in method.model.state_dict().items()}
    assert any(not torch.equal(fresh[k], saved[k]) for k in saved), "the init stage changed no weight"
    # a second run in the same directory loads init/model.pt instead of training again
    execute(cfg, run_dir, show_progress=False)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "init_start" for e in events) == 1
    from avcl.report.tables import report
    table = report(run_dir)
    assert table.splitlines()[2].startswith("| init")  # the reference row comes first


def test_label_free_methods_never_see_labels(tmp_path, monkeypatch):
    seen = []
    for name in ("finetune", "stella"):
        cls = METHODS[name]
        original = cls.training_loss

        def spy(self, batch, original=original):
            seen.append(set(batch))
            return original(self, batch)
        monkeypatch.setattr(cls, "training_loss", spy)
    execute(load_config(RECIPE, ["methods=[finetune,stella]", "init.epochs=0", "init.avm_epochs=0"]), tmp_path,
            show_progress=False)
    assert seen and all("label" not in keys and {"audio", "video"} <= keys for keys in seen)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_metrics(reference, tmp_path, monkeypatch):
    _, want = reference
    cfg = load_config(RECIPE, [f"methods=[{','.join(ALL)}]"])
    log_call = runner.EventLog.__call__

    def kill_in_task_2(self, event, **fields):  # dies as every method starts its second task
        log_call(self, event, **fields)
        if event == "task_start" and fields["task"] == 1 and fields["method"] not in killed:
            killed.add(fields["method"])
            raise Killed
    killed = set()
    monkeypatch.setattr(runner.EventLog, "__call__", kill_in_task_2)
    for _ in range(len(ALL) - 1):  # each run dies in the next method's second task
        with pytest.raises(Killed):
            execute(cfg, tmp_path, show_progress=False)
    assert killed == set(ALL) - {"multitask"}  # multitask has a single task
    got = execute(cfg, tmp_path, show_progress=False)
    for name in ALL:
        strip = lambda m: {k: v for k, v in m.items() if k not in MEASURED}  # noqa: E731
        assert strip(got[name]) == strip(want[name]), name


@pytest.mark.parametrize("override, message", [
    (["eval.retrieval_per_class=1", "eval.recall_at=[1,5,10,50]"], "fewer than k=50"),
    (["memory.size=5000"], "larger than the whole stream"),
    (["eval.retrieval_per_class=20"], "fewer than eval.retrieval_per_class=20"),
    (["init.checkpoint=/nonexistent/model.pt"], "init.checkpoint: file not found"),
    (["data.held_out_per_class=0"], "need clips kept out of the stream"),
])
def test_bad_input_is_one_message_and_writes_nothing(tmp_path, override, message):
    out = tmp_path / "run"
    result = run_cli("run", RECIPE, *override, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (out / "config.yaml").exists()


def test_init_checkpoint_of_another_size_is_refused(tmp_path, reference):
    run_dir, _ = reference
    result = run_cli("run", RECIPE, "model.vit.width=48", f"init.checkpoint={run_dir / 'init' / 'model.pt'}",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "does not match model" in result.stderr, result.stderr


def test_a_store_without_raw_frames_is_refused(tmp_path):
    """Pre-training reads frames and spectrograms: a store of encoder features is refused, naming it."""
    from avcl.data.store import create_store
    store = tmp_path / "feats.h5"
    n = 12
    with create_store(store, [f"clip{i}" for i in range(n)], {"audio": ((8,), "float16"), "video": ((8,), "float16")},
                      labels=[i % 2 for i in range(n)], splits=["test" if i % 3 == 0 else "train" for i in range(n)],
                      class_names=["class0", "class1"]) as writer:
        writer.write(list(range(n)), {"audio": torch.randn(n, 8).numpy(), "video": torch.randn(n, 8).numpy()})
        writer.finalize()
    import yaml
    from avcl.config import recipes_dir
    recipe = yaml.safe_load((recipes_dir() / f"{RECIPE}.yaml").read_text())
    recipe.update(data={"name": "features", "store": str(store)}, scenario={"num_tasks": 1})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(tmp_path / "recipe.yaml"), "init.epochs=0", "init.avm_epochs=0",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "no raw frames" in result.stderr and str(store) in result.stderr, result.stderr
