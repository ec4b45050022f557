"""What a new user hit (issue 12): one clear line instead of tracebacks, before anything is written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from avcl.cli import main
from conftest import REPO, TINY, run_cli


def run_main(capsys, *args):
    """``avcl ARGS`` in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
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
    ("scenario.initial_classes=-1", "scenario.initial_classes"),
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
    ("scenario.initial_classes=6", "scenario.initial_classes"),
    ("scenario.num_tasks=7", "scenario.num_tasks"),
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
