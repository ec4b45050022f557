"""What a new user hit (issue 12): one clear line instead of tracebacks, before anything is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avcl.cli import main
from conftest import REPO, TINY, error_lines, run_cli


def run_main(capsys, *args):
    """``avcl ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("avcl: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- defect 1: every value validated, up front

BAD_VALUES = [
    ("train.lr=-1", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.weight_decay=-0.1", "train.weight_decay"),
    ("train.momentum=1.5", "train.momentum"),
    ("train.replay_batch_size=-1", "train.replay_batch_size"),
    ("train.num_threads=0", "train.num_threads"),
    ("train.model_selection=best", "train.model_selection"),
    ("train.device=gpu", "train.device"),
    ("memory.size=-5", "memory.size"),
    ("model.embed_dim=0", "model.embed_dim"),
    ("model.feature_dim=-3", "model.feature_dim"),
    ("scenario.first_task_classes=-1", "scenario.first_task_classes"),
    ("seed=-1", "seed"),
    ("init.batch_size=0", "init.batch_size"),
    ("eval.probe_lr=0", "eval.probe_lr"),
    ("eval.recall_at=[1,0]", "eval.recall_at"),
    ("model.cav.mask_ratio_audio=1.0", "model.cav.mask_ratio_audio"),
    ("model.vit.crop_scales=[1.0,0]", "model.vit.crop_scales"),
    ("method_args.er.lr=-1", "method_args.er.lr"),
    ("method_args.lwf.temperature=0", "method_args.lwf.temperature"),
    ("method_args.ewc.ewc_lambda=-1", "method_args.ewc.ewc_lambda"),
    ("method_args.ewc.gamma=2", "method_args.ewc.gamma"),
    ("method_args.finetune.epochs=0", "method_args.finetune.epochs"),
    ("data.train_per_class=0", "data.train_per_class"),
    ("data.audio_noise=-1", "data.audio_noise"),
    # cross-field
    ("eval.probe_warmup_epochs=20", "eval.probe_warmup_epochs"),
    ("scenario.first_task_classes=6", "scenario.first_task_classes"),
    ("scenario.num_tasks=7", "scenario.num_tasks"),
    ("methods=[xkd]", "model.name=xkd"),  # a method tied to another model
    ("methods=[finetune,avcil]", "model.name=avcil"),
    ("model.name=xkd", "model.name=xkd is trained by method xkd"),  # and a model tied to its method
]


@pytest.mark.parametrize("override, key", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_is_refused_before_anything_is_written(override, key, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "run", "synthetic", *TINY, override, "--out", out)
    assert_one_line_error(code, err, key)
    assert not out.exists()


def test_bad_variant_value_names_the_variant(tmp_path, capsys):
    recipe = tmp_path / "v.yaml"
    recipe.write_text("base: synthetic\nmethods: [cold]\nvariants:\n  cold: {method: lwf, temperature: -2}\n")
    code, _, err = run_main(capsys, "run", recipe, *TINY, "--out", tmp_path / "run")
    assert_one_line_error(code, err, "variants.cold", "temperature")
    assert not (tmp_path / "run").exists()


def test_memory_smaller_than_the_classes_is_refused(tmp_path, capsys):
    code, _, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[er]", "memory.size=4",
                            "--out", tmp_path / "run")
    assert_one_line_error(code, err, "memory.size=4", "6 classes")
    assert not (tmp_path / "run").exists()


def test_grid_that_does_not_fit_the_features_is_refused(tmp_path, capsys):
    code, _, err = run_main(capsys, "run", "avcil/avdigits", "data.name=synthetic", *TINY, "methods=[finetune]",
                            "model.encoders=none", "model.visual_grid=[3,5]", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "model.visual_grid")
    assert not (tmp_path / "run").exists()


def test_issue_example_lr_minus_one_exits_2_without_a_run_directory(tmp_path):
    result = run_cli("run", "synthetic", "train.lr=-1", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "avcl: error: bad config: 'train.lr' must be > 0, got -1.0"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- defect 1: every `avcl extract` output trains

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One tiny store per output kind of ``avcl extract`` (12 clips, 2 classes)."""
    import avcl.apps.extract as ex
    from avcl.media.manifests import read_dataset
    from test_extract import RAW, SMALL, make_clips
    folder = tmp_path_factory.mktemp("stores")
    manifest = make_clips(folder, 12, seconds=0.5)  # its split leaves class 'a' without test clips:
    (folder / "unbalanced.csv").write_text(manifest.read_text())
    rows = [f"c{i}.mp4,{'ab'[i % 2]},{'test' if i >= 8 else 'train'}" for i in range(12)]  # 4 + 2 per class
    manifest.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    data = read_dataset(manifest)
    paths = {}
    for output in ("clip", "tokens", "snippets", "avcil", "raw"):
        config = (ex.make_config("cav", RAW + ["decode.gray=true"], output="raw") if output == "raw" else
                  ex.make_config("builtin", SMALL, output=output, snippets=3))
        paths[output] = folder / f"{output}.h5"
        ex.extract(data, paths[output], config, report=lambda line: None)
    paths["unbalanced"] = folder / "unbalanced.h5"
    ex.extract(read_dataset(folder / "unbalanced.csv"), paths["unbalanced"], ex.make_config("builtin", SMALL),
               report=lambda line: None)
    return paths


FEATURE_RECIPES = [  # the recipe docs/extraction.md names for each output kind, and its overrides
    ("clip", "features", []),
    ("tokens", "features", []),
    ("snippets", "features", []),
    ("snippets", "had/features", ["methods=[finetune,had]"]),
    ("avcil", "features", []),
    ("avcil", "files/avdigits", ["model.visual_grid=[4,16]"]),
    ("raw", "pretrain/features", ["model.vit.audio_patch=[8,8]", "model.vit.video_patch=8", "eval.recall_at=[1]"]),
]


@pytest.mark.parametrize("output, recipe, extra", FEATURE_RECIPES, ids=[f"{o}-{r}" for o, r, _ in FEATURE_RECIPES])
def test_every_extract_output_trains_with_its_recipe(stores, output, recipe, extra, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "run", recipe, f"data.store={stores[output]}", "scenario.num_tasks=2",
                                 "train.epochs=1", "memory.size=4", "--out", out, "--quiet",
                                 *(extra or ["methods=[finetune]"]))
    assert code == 0, err
    assert "| finetune" in stdout
    assert json.loads((out / "finetune" / "metrics.json").read_text())["complete"]


RECIPE_FOR = {"clip": "recipe `features`", "tokens": "recipe `features`", "snippets": "`had/features`",
              "avcil": "`files/avdigits`", "raw": "`pretrain/features`"}
WRONG = [(output, recipe) for output in RECIPE_FOR
         for recipe in ("files/avdigits", "had/features", "pretrain/features", "features")
         if recipe not in {r for o, r, _ in FEATURE_RECIPES if o == output} | ({"features"} if output == "raw" else set())]
# (`features` reads a raw store too: its linear encoders on the frames and filterbank, a valid if weak model)


@pytest.mark.parametrize("output, recipe", WRONG, ids=[f"{o}-{r}" for o, r in WRONG])
def test_a_recipe_whose_model_cannot_read_a_store_names_the_recipe_for_its_kind(stores, output, recipe, tmp_path,
                                                                                capsys):
    """Issue 22: each model's shape check (the AV-CIL grid, HAD's snippets, raw frames) names the store's recipe."""
    code, _, err = run_main(capsys, "run", recipe, f"data.store={stores[output]}", "scenario.num_tasks=2",
                            "methods=[finetune]", "memory.size=4", "--out", tmp_path / "run")
    assert_one_line_error(code, err, f"--output {output}` store", RECIPE_FOR[output])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("output", ["clip", "tokens", "snippets"])
def test_wrong_recipe_for_a_store_names_the_recipe_to_use(stores, output, tmp_path, capsys):
    # what the docs used to say: any recipe + data.name=features
    code, _, err = run_main(capsys, "run", "avdigits", "data.name=features", f"data.store={stores[output]}",
                            "scenario.num_tasks=2", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "recipe `features`")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- defect 1: options and overrides in any order

def test_options_and_overrides_mix_in_any_order(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "run", "--quiet", "synthetic", "--out", out, *TINY[:4],
                                 "--data-root", tmp_path, *TINY[4:], "methods=[finetune]", "train.epochs=2")
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["name"] == "synthetic" and config["train"]["epochs"] == 2 and config["methods"] == ["finetune"]
    assert config["data"]["num_classes"] == 6 and config["memory"]["size"] == 30


def test_unknown_option_still_refused_and_list_into_a_closed_pipe(tmp_path):
    result = run_cli("run", "synthetic", "--outt", str(tmp_path / "r"), "seed=1")
    assert result.returncode == 2 and "unrecognized arguments: --outt" in result.stderr
    assert not (tmp_path / "r").exists()
    # `avcl list | head`: the reader is gone before avcl writes (`true` reads nothing and exits at once)
    pipe = subprocess.run(f"{sys.executable} -m avcl list | true", shell=True, capture_output=True, text=True,
                          cwd=REPO)
    assert pipe.stderr == "", pipe.stderr


# ---------------------------------------------------------------- defect 3: no NaN in the accuracy matrix

def test_a_class_without_test_clips_is_refused_by_name(stores, tmp_path, capsys):
    code, _, err = run_main(capsys, "run", "features", f"data.store={stores['unbalanced']}", "scenario.num_tasks=2",
                            "methods=[finetune]", "train.epochs=1", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "class 'a'", "no test clips")
    assert not (tmp_path / "run").exists()


def test_a_class_without_val_clips_when_others_have_some_is_refused():
    import torch
    from avcl.data import AVDataset
    from avcl.data.scenario import class_incremental
    from avcl.core.errors import AvclError

    def split(labels):
        return {"audio": torch.zeros(len(labels), 3), "label": torch.tensor(labels, dtype=torch.long)}
    dataset = AVDataset(name="toy", train=split([0, 0, 1, 1, 2, 2]), val=split([0, 2]), test=split([0, 1, 2]),
                        class_names=["zero", "one", "two"])
    with pytest.raises(AvclError, match="class 'one' of dataset 'toy' has no val clips"):
        class_incremental(dataset, 3)
    fine = AVDataset(name="toy", train=split([0, 0, 1, 1, 2, 2]), val=split([]), test=split([0, 1, 2]),
                     class_names=["zero", "one", "two"])
    assert len(class_incremental(fine, 3).tasks) == 3  # no val at all: allowed (val_fraction=0)


# ---------------------------------------------------------------- defect 1: --resume with a damaged config.yaml

def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert main(["run", "synthetic", *TINY, "methods=[finetune]", "train.epochs=1", "--out", str(out), "--quiet"]) == 0
    return out


DAMAGED = [
    ("invalid", lambda text: "name: [unclosed\n" + text, "not valid YAML"),
    ("list", lambda text: "- 1\n- 2\n", "a list"),
    ("truncated", lambda text: text[:len(text) // 2], "truncated"),
    ("truncated-at-a-line", lambda text: text[:text.index("\ntrain:") + 1], "truncated"),
    ("empty", lambda text: "", "empty"),
]


@pytest.mark.parametrize("case, damage, what", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_resume_with_a_damaged_config_says_which_file_and_changes_nothing(finished_run, case, damage, what,
                                                                         tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = run / "config.yaml"
    config.write_text(damage(config.read_text()))
    before = snapshot(run)
    code, stdout, err = run_main(capsys, "run", "--resume", run)
    assert_one_line_error(code, err, str(config), what)
    assert stdout == "" and snapshot(run) == before


# ---------------------------------------------------------------- defect 5: small but real

def test_methods_as_a_single_name_or_a_comma_list(tmp_path, capsys):
    from avcl.config import load_config
    assert list(load_config("synthetic", ["methods=finetune"]).methods) == ["finetune"]
    assert list(load_config("synthetic", ["methods=finetune,er"]).methods) == ["finetune", "er"]
    code, _, err = run_main(capsys, "run", "synthetic", "methods=magic", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "magic")


def test_interrupted_run_without_out_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import avcl.engine.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "execute", interrupted)
    monkeypatch.chdir(tmp_path)
    code = main(["run", "synthetic", *TINY, "methods=[finetune]"])
    err = capsys.readouterr().err
    assert code == 130
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and f"continue with: avcl run --resume {Path('runs') / runs[0].name}" in err, err


def test_run_files_follow_the_umask(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        code, _, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune]", "train.epochs=1",
                                "train.keep_checkpoints=true", "--out", tmp_path / "run", "--quiet")
    finally:
        os.umask(old)
    assert code == 0, err
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"config.yaml", "metrics.json", "checkpoint.pt", "accuracy.png", "dataset.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_finished_methods_keep_no_checkpoint_unless_asked_and_the_size_is_said(tmp_path, capsys):
    for keep in ("false", "true"):
        out = tmp_path / keep
        code, stdout, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune,er]", "train.epochs=1",
                                     f"train.keep_checkpoints={keep}", "--out", out, "--quiet")
        assert code == 0, err
        assert [(out / m / "checkpoint.pt").is_file() for m in ("finetune", "er")] == [keep == "true"] * 2
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        assert f"run directory: {out} ({size / 2**20:.1f} MiB" in stdout


def test_all_missing_data_reported_at_once_with_counts(tmp_path, capsys):
    recordings = tmp_path / "data" / "fsdd" / "recordings"
    recordings.mkdir(parents=True)
    for name in ("0_george_0.wav", "1_jackson_3.wav"):
        (recordings / name).write_bytes(b"")
    (tmp_path / "data" / "mnist").mkdir()
    (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    code, _, err = run_main(capsys, "run", "avdigits", "data.download=false", "--data-root", tmp_path / "data",
                            "--out", tmp_path / "run")
    assert_one_line_error(code, err, f"FSDD incomplete: 2 of 3,000 wav files in {recordings}",
                          "MNIST incomplete: 1 of 2 files", "no t10k-labels-idx1-ubyte.gz")


def test_avcil_ave_missing_files_mention_convert_features(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, _, err = run_main(capsys, "run", "avcil/ave", "--data-root", tmp_path / "data", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "missing file", "avcl convert-features --dataset AVE")


def captured_figures(monkeypatch):
    import avcl.report.plots as plots
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.__setitem__(Path(path).name, fig))
    return figures


def test_accuracy_plot_has_every_head_and_integer_ticks(monkeypatch):
    from avcl.report.plots import plot_accuracy_curves
    figures = captured_figures(monkeypatch)
    results = {"icarl": {"step_accuracy": [0.9, 0.8, 0.7], "heads": {"fc": {"step_accuracy": [0.9, 0.7, 0.6]}}},
               "er": {"step_accuracy": [0.95, 0.8, 0.75], "heads": {}}}
    plot_accuracy_curves(results, Path("accuracy.png"))
    ax = figures["accuracy.png"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["icarl", "icarl [fc]", "er"]
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks == [1, 2, 3]


def test_heat_maps_are_labelled_by_the_classes_of_each_task(tmp_path, monkeypatch):
    from avcl.report.plots import plot_run
    figures = captured_figures(monkeypatch)
    (tmp_path / "dataset.json").write_text(json.dumps({
        "class_names": ["seven", "two", "nine", "zero"], "class_order": [7, 2, 9, 0],
        "tasks": [{"classes": [0, 1]}, {"classes": [2, 3]}]}))
    metrics = {"method": "er", "accuracy_matrix": [[1.0], [0.5, 0.9]], "step_accuracy": [1.0, 0.7], "heads": {}}
    plot_run(tmp_path, {"er": metrics})
    ax = figures["accuracy_matrix.png"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["seven, two", "nine, zero"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["seven, two", "nine, zero"]


def test_stratified_split_leaves_no_class_empty_on_either_side():
    import numpy as np
    from avcl.data.features import stratified_pick
    labels = np.array([0] * 4 + [1] * 12 + [2] * 1 + [3] * 2)
    picked = stratified_pick(labels, np.ones(len(labels), bool), 0.1, np.random.default_rng(0))
    assert [int(picked[labels == c].sum()) for c in range(4)] == [1, 1, 0, 1]  # round(0.4) = 0 -> 1; one row: kept
    picked = stratified_pick(labels, np.ones(len(labels), bool), 0.95, np.random.default_rng(0))
    assert [int((~picked)[labels == c].sum()) for c in range(4)] == [1, 1, 1, 1]  # never all of a class


# ---------------------------------------------------------------- issue 22: a diverging run does not pass silently

def test_a_diverging_method_stops_at_its_first_non_finite_epoch_and_the_run_says_so(tmp_path, capsys):
    """train.lr=1e8: the loss is NaN at once; the method stops there, its row is marked, the run exits 1."""
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune,lwf]", "train.lr=1e8",
                                 "train.epochs=2", "--out", out, "--quiet")
    assert code == 1, err
    for name in ("finetune", "lwf"):  # the second method ran too: one diverging row does not end the run
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["stopped"] == "diverged" and not metrics["complete"] and metrics["tasks_done"] == 0
        assert metrics["diverged"]["task"] == 0 and metrics["diverged"]["epoch"] == 0
        rows = (out / name / "epochs.csv").read_text().splitlines()
        assert len(rows) == 2 and rows[1].split(",")[2] == "nan"  # trained no further than the first epoch
    assert json.loads((out / "lwf" / "metrics.json").read_text())["diverged"]["terms"] == ["ce"]
    table = [line for line in stdout.splitlines() if line.startswith("| finetune") or line.startswith("| lwf")]
    assert len(table) == 2 and all("(!)" in line and "(diverged)" in line for line in table)
    assert "(!) lwf: loss nan in task 1, epoch 1" in stdout and "non-finite term(s): ce" in stdout
    assert "training diverged" in err and "Traceback" not in err
    # --resume does not train a stopped method again
    code, _, err = run_main(capsys, "run", "--resume", out, "--quiet")
    assert code == 1 and len((out / "lwf" / "epochs.csv").read_text().splitlines()) == 2


def test_on_nan_flag_trains_on_and_flags_the_row(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[lwf]", "train.lr=1e8",
                                 "train.epochs=1", "train.on_nan=flag", "--out", out, "--quiet")
    assert code == 1, err
    metrics = json.loads((out / "lwf" / "metrics.json").read_text())
    assert metrics["complete"] and metrics["tasks_done"] == 3 and metrics["diverged"]["on_nan"] == "flag"
    assert "| lwf (!)" in stdout and "training went on, the row is flagged" in stdout
    assert err.count("avcl: lwf: loss nan") == 1  # said once, not every epoch


def test_a_finite_run_has_no_divergence_mark(tmp_path, capsys):
    code, stdout, _ = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune]", "train.epochs=1",
                               "--out", tmp_path / "run", "--quiet")
    assert code == 0 and "(!)" not in stdout
    assert "diverged" not in json.loads((tmp_path / "run" / "finetune" / "metrics.json").read_text())


def test_a_store_with_non_finite_values_is_refused_naming_the_field(stores, tmp_path, capsys):
    import shutil
    import h5py
    bad = tmp_path / "nan.h5"
    shutil.copy(stores["clip"], bad)
    with h5py.File(bad, "r+") as h5:
        h5["features/audio"][3, 0] = float("nan")
    code, _, err = run_main(capsys, "run", "features", f"data.store={bad}", "scenario.num_tasks=2",
                            "methods=[finetune]", "--out", tmp_path / "run")
    assert_one_line_error(code, err, str(bad), "field 'audio'", "NaN or inf", "1 ")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- issue 22: threads from the cores actually free

@pytest.mark.parametrize("cores, load, processes, want", [(4, 0.2, 1, 4), (4, 2.6, 1, 1), (2, 2.0, 1, 1),
                                                          (8, 0.0, 2, 4), (8, 3.0, 2, 2), (2, 9.0, 4, 1)])
def test_default_threads_are_the_free_cores_shared_by_the_processes(monkeypatch, cores, load, processes, want):
    import os
    from avcl.core import device
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    threads, why = device.default_threads(processes)
    assert threads == want and f"{cores} core(s)" in why and "train.num_threads" in why


def test_the_run_says_how_many_threads_it_chose(tmp_path, capsys):
    import torch
    before = torch.get_num_threads()
    try:
        code, _, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune]", "train.epochs=1",
                                "--out", tmp_path / "run", "--quiet")
        assert code == 0 and "torch thread(s) per process (" in err
        code, _, err = run_main(capsys, "run", "synthetic", *TINY, "methods=[finetune]", "train.epochs=1",
                                "train.num_threads=1", "--out", tmp_path / "run2", "--quiet")
        assert code == 0 and "torch thread(s) per process" not in err and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
