"""The command-line contract: run / list / report, and one clear message for bad input."""
import json

import pytest
import yaml

from conftest import TINY, error_lines, run_cli


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("avcl: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_list_shows_recipes_methods_and_datasets():
    result = run_cli("list")
    assert result.returncode == 0
    for name in ("avdigits", "synthetic", "finetune", "joint", "lwf", "ewc", "icarl", "er", "ssil"):
        assert name in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["run", "no-such-recipe"], ["unknown recipe 'no-such-recipe'"]),
    (["run", "synthetic", "train.epochz=3"], ["epochz"]),
    (["run", "synthetic", "train.epochs=three"], ["train.epochs"]),
    (["run", "synthetic", "methods=[finetune,magic]"], ["magic"]),
    (["run", "synthetic", "model.fusion=product"], ["model.fusion"]),
    (["run", "synthetic", "notakeyvalue"], ["notakeyvalue"]),
    (["run", "avdigits", "--data-root", "/no/such/dir"], ["/no/such/dir"]),
    (["report", "/no/such/run"], ["/no/such/run"]),
    (["run", "--resume", "/no/such/run"], ["/no/such/run"]),
])
def test_bad_input_is_one_line_exit_2(args, fragments, tmp_path):
    assert_clean_error(run_cli(*args, "--out", str(tmp_path / "run")) if args[0] == "run" and "--resume" not in args
                       else run_cli(*args), *fragments)


def test_missing_data_offline_says_where_to_put_files(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = run_cli("run", "avdigits", "data.download=false", "--data-root", str(empty), "--out", str(tmp_path / "r"))
    assert_clean_error(result, "fsdd")


def test_run_writes_the_run_directory_and_report_reads_it(tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "synthetic", *TINY, "methods=[finetune,er]", "seed=3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| finetune" in result.stdout and "| er" in result.stdout
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["seed"] == 3 and config["train"]["epochs"] == 15 and config["methods"] == ["finetune", "er"]
    for method in ("finetune", "er"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        for key in ("accuracy_matrix", "average_incremental_accuracy", "last_accuracy", "forgetting", "bwt",
                    "train_seconds"):
            assert key in metrics
        assert metrics["complete"] and [len(r) for r in metrics["accuracy_matrix"]] == [1, 2, 3]
        assert not (out / method / "checkpoint.pt").exists()  # only resuming needs it (train.keep_checkpoints)
        assert not (out / method / "model.pt").exists()  # train.save_model: pre-training models only by default
        assert (out / method / "accuracy_matrix.png").stat().st_size > 1000
    assert (out / "accuracy.png").stat().st_size > 1000
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"
    assert sum(e["event"] == "task_end" for e in events) == 6
    report = run_cli("report", str(out))
    assert report.returncode == 0 and "| finetune" in report.stdout and "| er" in report.stdout
    again = run_cli("run", "synthetic", "--out", str(out))
    assert_clean_error(again, "--resume")


def test_recipe_path_and_base_inheritance(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: synthetic\nname: mine\nmethods: [finetune]\n")
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), *TINY, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "mine" and config["data"]["name"] == "synthetic"


def test_method_variants_for_ablations(tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "v.yaml"
    recipe.write_text("base: synthetic\nmethods: [lwf, lwf-hot, joint-audio]\nvariants:\n"
                      "  lwf-hot: {method: lwf, temperature: 4.0}\n"
                      "  joint-audio: {method: joint, model: {modalities: [audio]}}\n")
    result = run_cli("run", str(recipe), *TINY, "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "| lwf-hot" in result.stdout
    assert json.loads((out / "lwf-hot" / "metrics.json").read_text())["complete"]
    assert "| joint-audio" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: synthetic\nmethods: [x]\nvariants:\n  x: {method: lwf, temprature: 4.0}\n")
    assert_clean_error(run_cli("run", str(bad), "--out", str(tmp_path / "r2")), "temprature")
