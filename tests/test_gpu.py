"""GPUs (issue 11). Everywhere: CUDA asked for and absent is one message, before anything is written.
Where CUDA is (``pytest -m gpu`` on a GPU machine; skipped with the reason elsewhere): every kind of
recipe (supervised, AV-CIL, pre-training, XKD) runs unchanged with ``train.device=cuda``, in fp32 close
to the CPU's numbers and with bf16 autocast; the fused AV-CIL attention kernel's CUDA path matches the
reference in values and gradients."""
import json
import math

import pytest
import torch

from avcl.cli import main
from avcl.config import build_config, load_config
from avcl.engine.runner import execute
from avcl.models.avcil import audio_guided_attention
from conftest import TINY, error_lines
from tests.test_xkd import TINY as XKD_TINY

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here: the GPU checks run on a machine with one "
                                                 "(pytest -m gpu)")


def test_cuda_asked_for_and_absent_is_one_message(tmp_path, capsys):
    device = f"cuda:{torch.cuda.device_count()}" if CUDA else "cuda"  # one past the last GPU, or none at all
    out = tmp_path / "run"
    code = main(["run", "synthetic", *TINY, f"train.device={device}", "--out", str(out)])
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and f"train.device={device}" in lines[0], err
    assert not out.exists()


# kind -> (recipe, overrides, the metric compared across devices)
AVCIL = TINY + ["model.name=avcil", "model.encoders=builtin", "model.visual_grid=[4,4]", "model.embed_dim=16",
                "model.feature_dim=32", "train.replay_batch_size=16", "methods=[avcil]"]
RECIPES = {
    "supervised": ("synthetic", TINY + ["methods=[finetune,er,icarl]"], "average_incremental_accuracy"),
    "avcil": ("synthetic", AVCIL, "average_incremental_accuracy"),
    "pretrain": ("pretrain/synthetic", ["methods=[finetune,er,stella]"], "probe_accuracy"),
    "xkd": (XKD_TINY, [], "probe_av_accuracy"),
}


def run_on(kind, device, tmp_path, *extra):
    recipe, overrides, metric = RECIPES[kind]
    overrides = [*overrides, f"train.device={device}", *extra]
    cfg = build_config(recipe, overrides) if isinstance(recipe, dict) else load_config(recipe, overrides)
    run_dir = tmp_path / f"{device}{'-'.join(extra)}"
    results = execute(cfg, run_dir, show_progress=False)
    started = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert next(e for e in started if e["event"] == "run_start")["device"].startswith(device)
    return {name: m[metric] for name, m in results.items()}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", sorted(RECIPES))
@pytest.mark.usefixtures("one_thread")
def test_recipe_runs_on_cuda_fp32_close_to_cpu_and_with_bf16(kind, tmp_path):
    cpu = run_on(kind, "cpu", tmp_path)
    fp32 = run_on(kind, "cuda", tmp_path, "train.precision=fp32")
    bf16 = run_on(kind, "cuda", tmp_path, "train.precision=bf16")
    print(f"{kind}: cpu {cpu} cuda-fp32 {fp32} cuda-bf16 {bf16}")
    assert cpu.keys() == fp32.keys() == bf16.keys()
    for name in cpu:
        assert all(math.isfinite(r[name]) for r in (cpu, fp32, bf16)), name
        # same data, seeds and steps: only float summation order differs (GPU kernels), so the tiny runs
        # end close; bf16 rounds every matmul and may drift further
        assert abs(fp32[name] - cpu[name]) <= 0.1, (name, cpu[name], fp32[name])
        assert abs(bf16[name] - cpu[name]) <= 0.25, (name, cpu[name], bf16[name])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_attention_cuda_matches_the_reference(dtype):
    torch.manual_seed(0)
    shapes = {"audio_key": (16, 32), "visual_pre": (16, 8, 49, 32), "tokens": (16, 8, 49, 32)}
    inputs = {k: torch.randn(s, dtype=dtype, device="cuda", requires_grad=True) for k, s in shapes.items()}
    inputs["audio_key"] = torch.tanh(inputs["audio_key"]).detach().requires_grad_()
    rows = torch.tensor([9, 2, 15], device="cuda")
    results = []
    for kernel in ("reference", "fused"):
        out = audio_guided_attention(inputs["audio_key"], inputs["visual_pre"], inputs["tokens"], rows, kernel)
        weights = torch.Generator(device="cuda").manual_seed(1)
        loss = sum((out[k] * torch.randn(out[k].shape, generator=weights, dtype=dtype, device="cuda")).sum()
                   for k in ("pooled", "spatial_log_attention", "temporal_scores"))
        results.append([out["pooled"], out["spatial_log_attention"], *torch.autograd.grad(loss, list(inputs.values()))])
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for reference, fused in zip(*results):
        assert fused.device.type == "cuda"
        torch.testing.assert_close(fused, reference, **tolerance)

