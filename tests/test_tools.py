"""Issue 12, tools: start-up and progress lines, the run's progress bar, --dry-run, show, loggers,
report --html (checked in headless Chromium) and compare."""
import csv
import json
import re
import time

import pytest

from conftest import TINY, run_cli

FAST = [*TINY, "train.epochs=2", "methods=[finetune,lwf]", "train.num_threads=1"]


def test_startup_stages_and_heartbeat_lines_without_a_terminal(tmp_path):
    """Without a terminal: a line per start-up stage, then a progress line every log.progress_seconds."""
    result = run_cli("run", "synthetic", *FAST, "train.epochs=10", "log.progress_seconds=0.1",
                     "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    stages = ["loading data: dataset 'synthetic'", "building the scenario: 3 tasks", "checking the run",
              "training 2 method(s) x 3 task(s)"]
    positions = [err.find(s) for s in stages]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), err
    beats = re.findall(r"avcl: +(\d+)% \((\d+)/60 epochs\) (\S+) task (\d)/3", err)  # 2 methods x 3 tasks x 10
    assert beats, err
    assert {b[2] for b in beats} <= {"finetune", "lwf", "starting"}
    assert [int(b[1]) for b in beats] == sorted(int(b[1]) for b in beats)  # progress only moves forward
    assert any("left" in line for line in err.splitlines() if line.startswith("avcl: ") and "epochs)" in line)


def test_progress_lines_need_a_positive_interval(tmp_path, capsys):
    from avcl.cli import main
    assert main(["run", "synthetic", "log.progress_seconds=0", "--out", str(tmp_path / "run")]) == 2
    assert "log.progress_seconds" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_run_progress_bar_counts_every_epoch_with_time_left(capsys):
    from avcl.engine.progress import RunProgress
    with RunProgress(total=6, initial=2, interactive=True) as progress:
        progress.at("lwf", 1, 3, 0, 2)
        for _ in range(4):
            progress.advance()
    err = capsys.readouterr().err
    assert "6/6" in err and "lwf task 2/3" in err and "<" in err  # tqdm's "elapsed<left"


def test_heartbeat_thread_prints_where_the_run_is(capsys):
    from avcl.engine.progress import RunProgress
    progress = RunProgress(total=10, interactive=False, interval=0.02)
    progress.at("er", 0, 5, 3, 10)
    progress.advance(5)
    time.sleep(0.2)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(re.match(r"avcl:  50% \(5/10 epochs\) er task 1/5 epoch 4/10; 0:00 elapsed, ~0:00 left", l)
                         for l in lines), lines
    count = len(lines)
    time.sleep(0.1)
    assert len(capsys.readouterr().err.splitlines()) == 0 and count > 0  # closed: no more lines


def test_planned_epochs_counts_methods_tasks_and_a_resumed_run(tmp_path):
    from avcl.config import load_config
    from avcl.engine.runner import make_scenario, planned_epochs
    cfg = load_config("synthetic", [*TINY, "train.epochs=4", "methods=[finetune,multitask,lwf]",
                                    "method_args.lwf.epochs=2"])
    scenario = make_scenario(cfg)
    assert planned_epochs(cfg, scenario, tmp_path) == (3 * 4 + 1 * 4 + 3 * 2, 0)
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "metrics.json").write_text(json.dumps({"tasks_done": 2}))
    assert planned_epochs(cfg, scenario, tmp_path) == (22, 8)


def test_dry_run_validates_and_writes_nothing(tmp_path, capsys):
    from avcl.cli import main
    out = tmp_path / "run"
    assert main(["run", "synthetic", *FAST, "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "dry run" in printed.out and "valid" in printed.out and "['finetune', 'lwf']" in printed.out
    assert "checking the run" in printed.err
    assert not out.exists() and not list(tmp_path.iterdir())
    # what a run would refuse, a dry run refuses: bad override, missing data, data shapes vs the model
    for args, fragment in (([*FAST, "train.epochz=1"], "epochz"),
                           (["data.name=avdigits", "--data-root", str(tmp_path / "nothing")], "avdigits"),
                           ([*FAST, "model.name=cav"], "audio_patch")):
        assert main(["run", "synthetic", *args, "--dry-run", "--out", str(out)]) == 2, args
        assert fragment in capsys.readouterr().err, args
        assert not out.exists()


def test_show_prints_the_resolved_config_and_each_methods_hyperparameters(capsys, tmp_path):
    from avcl.cli import main
    assert main(["show", "synthetic", "methods=[lwf,ewc]", "method_args.lwf.alpha=2.5", "train.epochs=7"]) == 0
    out = capsys.readouterr().out
    import yaml
    resolved = yaml.safe_load(out.split("# methods:")[0])
    assert resolved["train"]["epochs"] == 7 and resolved["methods"] == ["lwf", "ewc"] and "method_args" not in resolved
    lines = {line.split(" = ")[0].strip(" *"): line for line in out.splitlines() if " = " in line}
    alpha = lines["method_args.lwf.alpha"]
    assert alpha.lstrip().startswith("*") and "= 2.5" in alpha and "(default 1.0)" in alpha and "distillation" in alpha
    assert "Fisher penalty" in lines["method_args.ewc.ewc_lambda"] and "(default" not in lines["method_args.ewc.ewc_lambda"]
    assert "overrides train.epochs" in lines["method_args.ewc.epochs"]
    assert "method_args.finetune.epochs" not in lines  # only the methods of the run
    assert main(["show", "pretrain/synthetic", "methods=[stella-plus]"]) == 0  # a variant: its own key path
    variant = [line for line in capsys.readouterr().out.splitlines() if ".store = " in line]
    assert variant == [variant[0]] and "* variants.stella-plus.store = patches" in variant[0] and "(default clip)" in variant[0]
    assert main(["show", "synthetic", "method_args.lwf.alfa=1"]) == 2  # the same validation as run
    assert "alfa" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_every_method_hyperparameter_has_a_one_line_description():
    import dataclasses
    from avcl.cli.show import field_descriptions
    from avcl.methods import METHODS
    missing = [f"{name}.{f.name}" for name, cls in sorted(METHODS.items())
               for f in dataclasses.fields(cls.Hparams) if not field_descriptions(cls.Hparams).get(f.name)]
    assert not missing, f"add a trailing '# description' to these Hparams fields: {missing}"


def test_field_descriptions_read_trailing_and_preceding_comments():
    from avcl.cli.show import field_descriptions
    from avcl.config import TrainConfig
    described = field_descriptions(TrainConfig)
    assert described["replay_batch_size"] == "memory samples added to each batch by replay methods"
    assert described["cpu_keep_heap"].startswith("CPU runs on Linux/glibc")  # the comment block above it
    assert "epochs" not in described  # no comment: no description


def test_loggers_write_each_loss_term_accuracies_and_times_per_epoch(tmp_path, capsys):
    from avcl.cli import main
    out = tmp_path / "run"
    assert main(["run", "synthetic", *FAST, "methods=[lwf]", "train.model_selection=best_val", "log.tensorboard=true",
                 "--out", str(out), "--quiet"]) == 0
    with open(out / "lwf" / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["task"]), int(r["epoch"])) for r in rows] == [(t, e) for t in range(3) for e in range(2)]
    assert list(rows[0])[:5] == ["task", "epoch", "loss", "loss/ce", "loss/kd"]
    for row in rows:
        assert float(row["seconds"]) > 0 and 0 <= float(row["val_accuracy"]) <= 1
        kd = float(row["loss/kd"]) if row["loss/kd"] else 0.0
        assert (row["loss/kd"] == "") == (row["task"] == "0")  # no distillation on the first task
        assert float(row["loss"]) == pytest.approx(float(row["loss/ce"]) + 1.0 * kd, rel=1e-4)  # alpha = 1
    metrics = json.loads((out / "lwf" / "metrics.json").read_text())
    with open(out / "lwf" / "tasks.csv", newline="") as handle:
        tasks = list(csv.DictReader(handle))
    assert [float(t["accuracy"]) for t in tasks] == pytest.approx(metrics["step_accuracy"])
    assert float(tasks[-1]["last_accuracy"]) == pytest.approx(metrics["last_accuracy"])
    # TensorBoard: the same numbers as scalars
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = event_accumulator.EventAccumulator(str(out / "tensorboard" / "lwf"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "loss/ce", "loss/kd", "val_accuracy", "epoch_seconds", "task/accuracy"} <= set(tags)
    assert [s.value for s in events.Scalars("task/accuracy")] == pytest.approx(metrics["step_accuracy"])
    assert [s.step for s in events.Scalars("loss")] == list(range(1, 7))


def test_csv_logs_drop_the_rows_a_resumed_method_trains_again(tmp_path):
    from avcl.engine.loggers import MethodLog
    logs = MethodLog(tmp_path, "er", 0, 2)
    for t in range(3):
        for e in range(2):
            logs.epoch(t, e, 1.0 + t, {"ce": 0.5} if t else {}, 0.1, 0.1 * (e + 1))
        logs.task(t, 0.2, {"step_accuracy": [0.5] * (t + 1), "last_accuracy": 0.5})
    logs.close()
    (tmp_path / "er" / "epochs.csv").open("a").write("2,1,9")  # a row torn by a kill
    logs = MethodLog(tmp_path, "er", 2, 2)  # resumed at task 3: tasks 1, 2 kept
    logs.epoch(2, 0, 7.0, {"ce": 3.0}, 0.1, 0.1)
    logs.close()
    with open(tmp_path / "er" / "epochs.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["task"], r["epoch"], r["loss"], r["loss/ce"]) for r in rows] == [
        ("0", "0", "1.0", ""), ("0", "1", "1.0", ""), ("1", "0", "2.0", "0.5"), ("1", "1", "2.0", "0.5"),
        ("2", "0", "7.0", "3.0")]
    with open(tmp_path / "er" / "tasks.csv", newline="") as handle:
        assert [r["task"] for r in csv.DictReader(handle)] == ["0", "1"]


def test_tensorboard_without_the_package_is_one_clear_message(tmp_path, capsys, monkeypatch):
    import sys
    from avcl.cli import main
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert main(["run", "synthetic", *FAST, "log.tensorboard=true", "--out", str(tmp_path / "run")]) == 2
    assert "pip install 'avcl[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----- HTML report and compare, checked in a real headless browser ----------------------------------------
def chromium_binary():
    import shutil
    return next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)


needs_chromium = pytest.mark.skipif(chromium_binary() is None, reason="Chromium not installed (Debian: apt-get install "
                                    "chromium; .ci/run installs it): the HTML report is checked in a headless browser")


def load_in_chromium(page, tmp_path):
    """(DOM after the load event, console messages) of ``page`` in headless Chromium."""
    import subprocess
    result = subprocess.run([chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
                             "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def results_rows(dom: str) -> list[str]:
    """The first cell of every row of the page's results table."""
    from html.parser import HTMLParser

    class Rows(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.cell, self.rows, self.first = False, None, [], False

        def handle_starttag(self, tag, attrs):
            if tag == "table" and ("class", "results") in attrs:
                self.inside = True
            elif self.inside and tag == "tr":
                self.first = True
            elif self.inside and tag == "td" and self.first:
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "table":
                self.inside = False
            elif tag == "td" and self.cell is not None:
                self.rows.append(self.cell)
                self.cell, self.first = None, False

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data
    parser = Rows()
    parser.feed(dom)
    return parser.rows


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    from avcl.cli import main
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        assert main(["run", "synthetic", *FAST, "methods=[finetune,icarl]", f"seed={seed}", "--quiet",
                     "--out", str(root / f"seed{seed}")]) == 0
    return root / "seed0", root / "seed1"


@needs_chromium
def test_the_browser_check_sees_console_errors_and_broken_images(tmp_path):
    page = tmp_path / "broken.html"
    from avcl.report.html import _page
    page.write_text(_page("broken", '<img alt="bad" src="data:image/png;base64,AAAA"><script>nosuch();</script>'))
    dom, console = load_in_chromium(page, tmp_path)
    assert any("nosuch" in line for line in console) and any("image did not load: bad" in line for line in console)
    assert 'data-images-loaded="0/1"' in dom


@needs_chromium
def test_html_report_loads_in_chromium_with_every_method_row(two_runs, tmp_path, capsys):
    from avcl.cli import main
    run = two_runs[0]
    assert main(["report", str(run), "--html"]) == 0
    assert f"html report: {run / 'report.html'}" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert "<link" not in page and "http" not in page.split("<body")[0]  # self-contained
    dom, console = load_in_chromium(run / "report.html", tmp_path)
    assert console == []
    assert results_rows(dom) == ["finetune", "icarl", "icarl [fc]"]
    assert 'data-images-loaded="3/3"' in dom  # the curves, two heat maps
    for section in ("Per task", "Tasks", "Config", "Environment", "after task 3", "torch", "train_per_class"):
        assert section in dom, section


@needs_chromium
def test_html_report_of_a_retrieval_run(tmp_path):
    from avcl.cli import main
    run = tmp_path / "pretrain"
    assert main(["run", "pretrain/synthetic", "methods=[finetune,stella]", "init.epochs=0", "init.avm_epochs=0",
                 "eval.probe=every_task", "train.num_threads=1", "--quiet", "--out", str(run)]) == 0
    assert main(["report", str(run), "--html", str(tmp_path / "page.html")]) == 0
    dom, console = load_in_chromium(tmp_path / "page.html", tmp_path)
    assert console == [] and results_rows(dom) == ["finetune", "stella"]
    assert 'data-images-loaded="3/3"' in dom and "audio→video" in dom and "linear probe after task" in dom


def test_compare_puts_runs_side_by_side_with_their_config_differences(two_runs, capsys):
    from avcl.cli import main
    assert main(["compare", *map(str, two_runs)]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| seed")]
    assert rows == ["seed0: finetune", "seed0: icarl", "seed0: icarl [fc]", "seed1: finetune", "seed1: icarl",
                    "seed1: icarl [fc]"]
    for run in two_runs:
        last = json.loads((run / "icarl" / "metrics.json").read_text())["last_accuracy"]
        assert f"| {run.name}: icarl " in out and f"{last:.4f}" in out
    differences = out.split("config differences:")[1].splitlines()
    assert any(line.split()[:3] == ["seed", "0", "1"] for line in differences), differences
    assert main(["compare", str(two_runs[0]), "/no/such/run"]) == 2
    assert "/no/such/run" in capsys.readouterr().err


@needs_chromium
def test_compare_html_loads_in_chromium(two_runs, tmp_path, capsys):
    from avcl.cli import main
    assert main(["compare", *map(str, two_runs), "--html", str(tmp_path / "compare.html")]) == 0
    dom, console = load_in_chromium(tmp_path / "compare.html", tmp_path)
    assert console == [] and 'data-images-loaded="1/1"' in dom
    assert results_rows(dom) == [f"seed{s}: {m}" for s in (0, 1) for m in ("finetune", "icarl", "icarl [fc]")]


def test_loss_terms_average_over_the_epoch_and_stay_bounded():
    import torch
    from avcl.methods.base import Method

    class Probe(Method):
        def training_loss(self, batch):
            raise NotImplementedError
    method = object.__new__(Probe)
    for step in range(3000):  # more than one fold of 1024
        method.log_terms(ce=torch.tensor(float(step)), per_row=torch.tensor([1.0, 3.0]))
        if step % 2:
            method.log_terms(kd=torch.tensor(1.0))
    assert len(method._terms["ce"][2]) < 1024  # folded, not one tensor per step
    assert method.pop_terms() == pytest.approx({"ce": 1499.5, "per_row": 2.0, "kd": 1.0})
    assert method.pop_terms() == {}
