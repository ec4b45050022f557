"""Many runs at once (issue 11): seeds=[...] gives one complete run per seed and a mean ± std report;
--jobs N runs the methods x seeds in worker processes with the same numbers as --jobs 1; a sweep resumes
per unit; bad sweep input is one message, before anything is written."""
import json
import shutil
import statistics

import pytest

from conftest import TINY, error_lines, run_cli

SWEEP = [*TINY, "train.epochs=3", "methods=[finetune,er]", "seeds=[0,1]", "train.num_threads=1"]
TIMES = {"train_seconds", "task_seconds", "peak_memory_mib", "val_accuracy"}


def metrics(run_dir, seed, method):
    found = json.loads((run_dir / f"seed-{seed}" / method / "metrics.json").read_text())
    return {k: v for k, v in found.items() if k not in TIMES}


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for jobs in (1, 2):
        result = run_cli("run", "synthetic", *SWEEP, "--jobs", str(jobs), "--out", str(root / f"jobs{jobs}"), "--quiet")
        assert result.returncode == 0, result.stderr
        out[jobs] = (root / f"jobs{jobs}", result.stdout)
    return out


def test_each_seed_is_a_complete_run_and_the_report_gives_mean_and_std(sweeps):
    run_dir, stdout = sweeps[1]
    for seed in (0, 1):
        config = (run_dir / f"seed-{seed}" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in config and "seeds: []" in config
    seeds_differ = metrics(run_dir, 0, "er")["accuracy_matrix"] != metrics(run_dir, 1, "er")["accuracy_matrix"]
    assert seeds_differ  # another seed is another run, not a copy
    row = next(line for line in stdout.splitlines() if line.startswith("| er "))
    values = [metrics(run_dir, s, "er")["average_incremental_accuracy"] for s in (0, 1)]
    want = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert want in row and row.split("|")[-2].strip() == "2/2", (want, row)
    assert "seed 0 (" in stdout and "seed 1 (" in stdout  # each seed's own table follows


def test_two_jobs_give_the_numbers_of_one(sweeps):
    one, two = sweeps[1][0], sweeps[2][0]
    for seed in (0, 1):
        for method in ("finetune", "er"):
            assert metrics(one, seed, method) == metrics(two, seed, method), (seed, method)
    assert (two / "seed-1" / "accuracy.png").stat().st_size > 1000  # replotted with every method


def test_a_sweep_resumes_only_the_missing_units(sweeps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sweeps[2][0], run_dir)
    shutil.rmtree(run_dir / "seed-1" / "er")  # as if killed before that unit ran
    kept = (run_dir / "seed-0" / "er" / "metrics.json").stat().st_mtime_ns
    result = run_cli("run", "--resume", str(run_dir), "--jobs", "2", "--quiet")
    assert result.returncode == 0, result.stderr
    assert metrics(run_dir, 1, "er") == metrics(sweeps[1][0], 1, "er")
    assert (run_dir / "seed-0" / "er" / "metrics.json").stat().st_mtime_ns == kept  # a done unit is not redone


@pytest.mark.parametrize("args, message", [(["seeds=[0,0]"], "seeds"), (["--jobs", "0"], "--jobs"),
                                           (["seeds=[-1]"], "seeds")])
def test_bad_sweep_input_is_one_message(args, message, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", "synthetic", *TINY, *args, "--out", str(out))
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists()


def test_seed_runs_gathered_by_hand_report_like_a_sweep(sweeps, tmp_path):
    from avcl.report.tables import report
    run_dir, stdout = sweeps[1]
    for seed in (0, 1):  # e.g. one cluster job per seed, each with --out RUN/seed-<s>
        shutil.copytree(run_dir / f"seed-{seed}", tmp_path / f"seed-{seed}")
    table = report(tmp_path).split("\nmean ± sample std")[0]
    assert table == stdout.split("\nmean ± sample std")[0]
