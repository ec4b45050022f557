"""avcl tune (issue 13): a search on validation data only finds a planted best value, resumes a killed search
without repeating finished trials, never lets a test clip reach a model or an evaluator, refuses bad search
spaces with one message before writing anything; key=@FILE overrides read a YAML mapping."""
import csv
import dataclasses
import json

import pytest
import torch

from conftest import TINY, error_lines, run_cli

optuna = pytest.importorskip("optuna", reason="avcl tune needs the [tune] extra (in [test] too)")

from avcl.cli import main  # noqa: E402
from avcl.config import load_config  # noqa: E402
from avcl.core.errors import AvclError# noqa: E402

FAST = [*TINY, "train.epochs=2", "train.num_threads=1"]
# lr=1e-9 learns nothing (chance), 3e-3 learns the synthetic classes: the planted best value
PLANTED = {"finetune": {"lr": {"choices": [1.0e-9, 0.003]}}}


def recipe(tmp_path, search, **extra) -> str:
    import yaml
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": "synthetic", "methods": ["finetune"], "search": search, **extra}))
    return str(path)


def rows(folder):
    with open(folder / "trials.csv") as handle:
        return list(csv.DictReader(handle))


def test_search_finds_the_planted_best_value_and_writes_the_study(tmp_path, one_thread, capsys):
    out = tmp_path / "tune"
    rc = main(["tune", recipe(tmp_path, PLANTED), "method=finetune", "trials=3", *FAST, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    trials = rows(out)
    assert len(trials) == 3 and {t["state"] for t in trials} == {"COMPLETE"}
    by_lr = {float(t["lr"]): float(t["average_incremental_accuracy"]) for t in trials}
    assert set(by_lr) == {1e-9, 0.003}  # both values were tried, so the choice below is a real one
    assert by_lr[0.003] > by_lr[1e-9] + 0.2
    best = (out / "best.yaml").read_text()
    assert best.startswith("# tuned: avcl tune ") and "objective validation average_incremental_accuracy" in best
    assert "on the first 2 of 3 tasks" in best
    cfg = load_config("synthetic", [f"method_args.finetune=@{out / 'best.yaml'}"])  # the result, used as a run
    assert cfg.method_args.finetune.lr == 0.003
    study = optuna.load_study(study_name="synthetic:finetune", storage=f"sqlite:///{out / 'study.db'}")
    assert study.best_trial.params == {"lr": 0.003} and len(study.trials) == 3
    assert (out / "objective.png").stat().st_size > 1000
    trial = json.loads((out / "trials" / "000" / "finetune" / "metrics.json").read_text())
    assert trial["num_tasks"] == 2  # tune.tasks=2 of the 3-task stream
    assert "use: avcl run" in capsys.readouterr().out


NAN = float("nan")


def poisoned_synthetic(monkeypatch):
    """The synthetic dataset with NaN audio in every test clip; returns the list the spy fills with every NaN input
    any module (model, encoder, head, evaluator's forward) receives."""
    from avcl.data import DATASETS
    entry = DATASETS["synthetic"]

    def build(opts, data_root, seed):
        dataset = entry.build(opts, data_root, seed)
        dataset.test = {**dataset.test, "audio": torch.full_like(dataset.test["audio"], NAN)}  # video: uint8
        return dataset

    monkeypatch.setitem(DATASETS, "synthetic", dataclasses.replace(entry, build=build))
    hits = []

    def has_nan(value):
        if isinstance(value, torch.Tensor):
            return value.is_floating_point() and bool(torch.isnan(value).any())
        if isinstance(value, dict):
            return any(has_nan(v) for v in value.values())
        return isinstance(value, (list, tuple)) and any(has_nan(v) for v in value)

    def spy(module, args):
        if has_nan(args):
            hits.append(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(spy)
    return hits, handle


def test_the_search_never_lets_a_test_clip_reach_a_model(tmp_path, one_thread, monkeypatch, capsys):
    from avcl.engine.runner import execute
    hits, handle = poisoned_synthetic(monkeypatch)
    try:
        execute(load_config("synthetic", [*FAST, "methods=finetune"]), tmp_path / "run", show_progress=False)
        assert hits, "the spy must see test clips in an ordinary run (else it proves nothing)"
        hits.clear()
        out = tmp_path / "tune"
        rc = main(["tune", recipe(tmp_path, PLANTED), "method=finetune", "trials=2", *FAST, "--out", str(out)])
    finally:
        handle.remove()
    assert rc == 0, capsys.readouterr().err
    assert hits == [], f"test clips reached {sorted(set(hits))} during the search"
    assert {t["state"] for t in rows(out)} == {"COMPLETE"}


def test_validation_scenario_keeps_the_allowed_tasks_with_val_in_place_of_test():
    from avcl.data import build_dataset
    from avcl.data.scenario import from_config
    from avcl.apps.tune import validation_scenario
    cfg = load_config("synthetic", [*TINY])
    full = from_config(build_dataset(cfg.data, None, cfg.seed), cfg)
    first = validation_scenario(full, cfg)
    assert len(first.tasks) == 2 and all(t.test is t.val for t in first.tasks)
    assert all(torch.equal(t.test["label"], f.val["label"]) for t, f in zip(first.tasks, full.tasks))
    every = validation_scenario(full, load_config("synthetic", [*TINY, "tune.protocol=all_tasks"]))
    assert len(every.tasks) == 3 and all(t.test is t.val for t in every.tasks)
    with pytest.raises(AvclError, match="covers the whole stream"):
        validation_scenario(full, load_config("synthetic", [*TINY, "tune.tasks=3"]))


def test_a_killed_search_resumes_without_repeating_finished_trials(tmp_path, one_thread, monkeypatch, capsys):
    import avcl.engine.runner as runner
    real, ran = runner.execute, []

    def spy(cfg, run_dir, *args, **kwargs):
        ran.append(run_dir.name)
        if run_dir.name == "002" and kill:
            raise KeyboardInterrupt  # the search is killed during its 3rd trial
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(runner, "execute", spy)
    out = tmp_path / "tune"
    space = {"finetune": {"lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}}
    kill = True
    rc = main(["tune", recipe(tmp_path, space), "method=finetune", "trials=4", *FAST, "--out", str(out)])
    assert rc == 130 and f"avcl tune --resume {out}" in capsys.readouterr().err
    assert ran == ["000", "001", "002"]
    assert [t["state"] for t in rows(out)] == ["COMPLETE"] * 2  # written after each finished trial

    kill, ran[:] = False, []
    rc = main(["tune", "--resume", str(out), "trials=4"])
    assert rc == 0, capsys.readouterr().err
    assert ran == ["003", "004"]  # the killed trial's values again, then one new trial: 4 in all
    trials = {t["trial"]: t for t in rows(out)}
    assert [trials[n]["state"] for n in "01234"] == ["COMPLETE"] * 2 + ["FAIL"] + ["COMPLETE"] * 2
    assert "killed" in trials["2"]["note"] and trials["3"]["lr"] == trials["2"]["lr"]

    ran[:] = []
    assert main(["tune", "--resume", str(out), "trials=5"]) == 0  # raising the number of trials: one more
    assert ran == ["005"]


BAD = [
    ({"finetune": {"lr": {"low": 0.1, "high": 0.01}}}, [], "search.finetune.lr: empty range: low (0.1) must be below"),
    ({"finetune": {"lrate": {"low": 0.1, "high": 1}}}, [], "search.finetune.lrate: unknown key 'lrate'"),
    ({"finetune": {"train.lrate": {"low": 0.1, "high": 1}}}, [], "Key 'lrate' not in 'TrainConfig'"),
    ({"finetune": {"train": {"lrate": {"low": 0.1, "high": 1}}}}, [], "Key 'lrate' not in 'TrainConfig'"),
    ({"finetune": {"epochs": {"low": 1, "high": 5}}}, [], "could not be converted to Integer"),  # int without int: true
    ({"finetune": {"lr": {"choices": ["fast", "slow"]}}}, [], "the value 'fast' is refused"),
    ({"finetune": {"lr": {"low": "a", "high": 1}}}, [], "'low' must be a finite number"),
    ({"finetune": {"lr": {"low": 0, "high": 1, "log": True}}}, [], "a log scale needs low > 0"),
    ({"finetune": {"data.num_classes": {"low": 4, "high": 8, "int": True}}}, [], "'data' cannot be searched"),
    ({"finetune": {"lr": 0.1}}, [], "a spec is a mapping"),
    ({"er": {"lr": {"low": 0.001, "high": 0.01}}}, [], "no search space for 'finetune'"),
    (PLANTED, ["method=nope"], "unknown method 'nope'"),
    (PLANTED, ["trials=0"], "'tune.trials' must be >= 1"),
]


@pytest.mark.parametrize("search, extra, message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_search_spaces_are_one_message_and_nothing_written(tmp_path, search, extra, message, capsys):
    out = tmp_path / "tune"
    rc = main(["tune", recipe(tmp_path, search), "method=finetune", "trials=3", *TINY, *extra, "--out", str(out)])
    lines = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("avcl: error: ") and message in lines[0], lines
    assert not out.exists()


def test_bad_search_space_from_the_command_line(tmp_path):
    out = tmp_path / "tune"
    result = run_cli("tune", recipe(tmp_path, {"finetune": {"lr": {"low": 1, "high": 1}}}), "method=finetune",
                     *TINY, "--out", str(out))
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and lines == ["avcl: error: search.finetune.lr: empty range: low (1) must be "
                                                "below high (1)"], result.stderr
    assert not out.exists()


def test_a_search_is_not_started_twice_and_resume_takes_no_new_config(tmp_path, one_thread, capsys):
    out = tmp_path / "tune"
    args = ["tune", recipe(tmp_path, PLANTED), "method=finetune", "trials=1", *FAST, "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2 and "already holds a search: use --resume" in capsys.readouterr().err
    assert main(["tune", "--resume", str(out), "train.lr=0.1"]) == 2
    assert "give no recipe, --out or overrides" in capsys.readouterr().err
    assert main(["tune", "--resume", str(tmp_path)]) == 2 and "holds no search" in capsys.readouterr().err


@pytest.mark.slow  # ~20 s on a loaded 2-core machine: each spawned worker imports torch and builds its scenario
def test_jobs_share_one_study_and_run_exactly_the_trials_asked(tmp_path):
    out = tmp_path / "tune"
    result = run_cli("tune", recipe(tmp_path, PLANTED), "method=finetune", "trials=2", *FAST, "--jobs", "2",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    trials = rows(out)
    assert len(trials) == 2 and {t["state"] for t in trials} == {"COMPLETE"}
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["000", "001"]


def test_file_overrides(tmp_path):
    good = tmp_path / "best.yaml"
    good.write_text("# tuned: ...\nlr: 0.004\nepochs: 2\n")
    cfg = load_config("synthetic", [f"method_args.er=@{good}", "method_args.er.epochs=3"])
    assert cfg.method_args.er.lr == 0.004 and cfg.method_args.er.epochs == 3  # later overrides win
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    (tmp_path / "broken.yaml").write_text("lr: [1,\n")
    (tmp_path / "typo.yaml").write_text("lrr: 1\n")
    for name, message in (("missing.yaml", "not found"), ("list.yaml", "must hold a mapping"),
                          ("broken.yaml", "is not valid YAML"), ("typo.yaml", "Key 'lrr' not in")):
        with pytest.raises(AvclError, match=message):
            load_config("synthetic", [f"method_args.er=@{tmp_path / name}"])
    result = run_cli("run", "synthetic", f"method_args.er=@{tmp_path / 'missing.yaml'}", "--dry-run")
    assert result.returncode == 2 and error_lines(result.stderr) == [
        f"avcl: error: bad override 'method_args.er=@{tmp_path / 'missing.yaml'}': file "
        f"{tmp_path / 'missing.yaml'} not found"]


def test_objectives_of_each_protocol():
    from avcl.apps.tune import known_objectives, objective_name, objective_value
    retrieval = load_config("pretrain/synthetic", ["methods=er"])
    assert objective_name(retrieval) == "retrieval_average" and "a2v_R@1" in known_objectives(retrieval)
    assert objective_value({"a2v_average": 0.2, "v2a_average": 0.4}, "retrieval_average") == pytest.approx(0.3)
    assert objective_value({"forgetting": None}, "forgetting") is None  # undefined after one task: not reported
    accuracy = load_config("synthetic", ["tune.objective=last_accuracy"])
    assert objective_name(accuracy) == "last_accuracy" and "taw_last_accuracy" in known_objectives(accuracy)


def test_a_diverging_trial_fails_instead_of_scoring_its_partial_run(tmp_path, one_thread, capsys):
    """lr=1e8 makes the loss NaN at once: the trial is FAIL (train.on_nan), not a row scored on what it did."""
    out = tmp_path / "tune"
    search = {"finetune": {"lr": {"choices": [1.0e8, 0.003]}}}
    rc = main(["tune", recipe(tmp_path, search), "method=finetune", "trials=3", *FAST, "--out", str(out)])
    err = capsys.readouterr().err
    states = {float(t["lr"]): t["state"] for t in rows(out)}
    assert states == {1e8: "FAIL", 0.003: "COMPLETE"}, err
    assert "diverged: loss nan in task 1, epoch 1" in err and rc == 0
