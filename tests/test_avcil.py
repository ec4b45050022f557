"""AV-CIL: model (attention, growth), loss terms on hand-computed cases, ablations, model selection, a tiny run."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from avcl.config import ModelConfig, load_config
from avcl.engine.runner import build_method, execute, make_scenario
from avcl.core.errors import AvclError
from avcl.methods.avcil import attention_kl, class_contrastive, instance_contrastive
from avcl.models import build_model
from avcl.models.avcil import audio_guided_attention
from conftest import TINY


pytestmark = pytest.mark.usefixtures("one_thread")

# AV-CIL on the synthetic clips through the builtin encoders: 4 frames x (16/8)^2 = 4 patches.
AVCIL_SYNTH = TINY + ["model.name=avcil", "model.encoders=builtin", "model.visual_grid=[4,4]",
                      "model.embed_dim=16", "model.feature_dim=32", "train.replay_batch_size=16"]


def feature_model(grid=(3, 5), audio_dim=12, video_dim=10, classes=4, **kw):
    cfg = OmegaConf.structured(ModelConfig(name="avcil", visual_grid=list(grid), feature_dim=16, **kw))
    example = {"audio": torch.randn(6, audio_dim), "video": torch.randn(6, grid[0] * grid[1], video_dim),
               "label": torch.arange(6) % classes}
    model = build_model(cfg, example)
    model.head.grow(classes)
    return model, example


def test_attention_maps_are_distributions_and_flat_or_grid_tokens_agree():
    model, example = feature_model()
    out = model(example, attention_rows=torch.arange(6))
    spatial = out["spatial_log_attention"].exp()
    assert spatial.shape == (6, 3, 5, 10) and out["temporal_attention"].shape == (6, 3, 10)
    torch.testing.assert_close(spatial.sum(dim=2), torch.ones(6, 3, 10))
    torch.testing.assert_close(out["temporal_attention"].sum(dim=1), torch.ones(6, 10))
    assert (spatial > 0).all()
    assert model(example)["spatial_log_attention"].shape == (0, 3, 5, 10)  # maps only when asked for
    picked = model(example, attention_rows=torch.tensor([4, 1]))["spatial_log_attention"]
    torch.testing.assert_close(picked, out["spatial_log_attention"][[4, 1]])
    grid = {**example, "video": example["video"].reshape(6, 3, 5, 10)}
    torch.testing.assert_close(model(grid)["logits"], out["logits"])
    torch.testing.assert_close(out["audio_embedding"].norm(dim=1), torch.ones(6))


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_attention_hand_case(kernel):
    # Equal visual keys -> uniform spatial attention: each frame pools the mean of its raw tokens.
    tokens = torch.tensor([[[[1.0, 2.0], [3.0, 6.0]]]])  # (B=1, T=1, P=2, D=2)
    out = audio_guided_attention(torch.tensor([[0.3, -0.2]]), torch.full((1, 1, 2, 2), 0.5), tokens, kernel=kernel)
    torch.testing.assert_close(out["spatial_log_attention"].exp(), torch.full((1, 1, 2, 2), 0.5))
    torch.testing.assert_close(out["pooled"], torch.tensor([[2.0, 4.0]]))
    # Two patches, one channel: keys tanh(pre) = [0, ln 2], audio key 1 -> scores [0, ln 2]
    # -> attention [1/3, 2/3] applied to the raw tokens [4, 8].
    pre = torch.tensor([[[[0.0], [math.atanh(math.log(2))]]]])
    out = audio_guided_attention(torch.tensor([[1.0]]), pre, torch.tensor([[[[4.0], [8.0]]]]), kernel=kernel)
    torch.testing.assert_close(out["spatial_log_attention"].exp()[0, 0, :, 0], torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(out["pooled"], torch.tensor([[20 / 3]]))


@pytest.mark.parametrize("tokens_need_grad", [False, True])
def test_fused_kernel_matches_the_reference_values_and_gradients(tokens_need_grad, monkeypatch):
    import avcl.models.avcil_attention as kernels
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 2 * 4 * 5 * 6 * 8)  # 2 samples per chunk: 3 chunks
    torch.manual_seed(0)
    audio_key = torch.tanh(torch.randn(5, 6, dtype=torch.float64)).requires_grad_()
    visual_pre = torch.randn(5, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(5, 3, 4, 6, dtype=torch.float64, requires_grad=tokens_need_grad)
    rows = torch.tensor([4, 1])  # rows in different chunks, out of order
    inputs = [audio_key, visual_pre] + ([tokens] if tokens_need_grad else [])
    results = []
    for kernel in ("reference", "fused"):
        out = audio_guided_attention(audio_key, visual_pre, tokens, rows, kernel)
        weights = torch.Generator().manual_seed(1)
        loss = sum((out[k] * torch.randn(out[k].shape, generator=weights, dtype=torch.float64)).sum()
                   for k in ("pooled", "spatial_log_attention", "temporal_scores"))
        results.append([out["pooled"], out["spatial_log_attention"], *torch.autograd.grad(loss, inputs)])
    for reference, fused in zip(*results):
        torch.testing.assert_close(fused, reference)
    # The fused backward writes into its saved buffers: a second backward is refused, not wrong.
    loss = audio_guided_attention(audio_key, visual_pre, tokens, rows, "fused")["pooled"].sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_unknown_attention_kernel_is_a_clear_error():
    with pytest.raises(AvclError, match="model.attention_kernel"):
        feature_model(attention_kernel="fast")


def test_wrong_grid_is_a_clear_error():
    model, example = feature_model()
    with pytest.raises(AvclError, match="visual_grid"):
        model({**example, "video": torch.randn(6, 14, 10)})


def test_unimodal_variants():
    for modalities, used in ((["audio"], "audio_proj"), (["video"], "visual_proj")):
        model, example = feature_model(modalities=modalities)
        out = model(example)
        assert out["logits"].shape == (6, 4) and "spatial_log_attention" not in out
        assert hasattr(model, used) and not hasattr(model, "attn_audio_proj")
    model, example = feature_model(modalities=["video"])
    expected = torch.relu(model.visual_proj(example["video"].mean(dim=1)))
    torch.testing.assert_close(model.embed(example)["features"], expected)


def test_classifier_growth_keeps_old_rows():
    model, example = feature_model(classes=4)
    weight, bias = model.head.fc.weight.detach().clone(), model.head.fc.bias.detach().clone()
    before = model(example)["logits"].detach()
    model.head.grow(7)
    torch.testing.assert_close(model.head.fc.weight[:4], weight)
    torch.testing.assert_close(model.head.fc.bias[:4], bias)
    torch.testing.assert_close(model(example)["logits"][:, :4], before)


def test_instance_contrastive_hand_case():
    eye = torch.eye(2)
    expected = math.log(1 + math.exp(-1))  # -log(e / (e + 1)) for each anchor, tau = 1
    assert instance_contrastive(eye, eye, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert instance_contrastive(eye, eye, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_class_contrastive_official_and_paper_normalisation():
    eye, labels = torch.eye(3), torch.tensor([0, 0, 1])
    log_z = math.log(math.e + 2)  # S = I, tau = 1: log p_ii = 1 - log_z, log p_ij = -log_z
    pos = [1 - 2 * log_z, 1 - 2 * log_z, 1 - log_z]  # positive log-prob sums of anchors 0, 1, 2
    official = -sum(p / 3 for p in pos) / 3
    paper = -(pos[0] / 2 + pos[1] / 2 + pos[2] / 1) / 3
    assert class_contrastive(eye, eye, labels, 1.0, "official").item() == pytest.approx(official, rel=1e-6)
    assert class_contrastive(eye, eye, labels, 1.0, "paper").item() == pytest.approx(paper, rel=1e-6)


def test_attention_kl_hand_case():
    old = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    new_log = torch.tensor([[0.25, 0.75], [0.25, 0.75]]).log()
    kl = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert attention_kl(old, new_log).item() == pytest.approx(kl, rel=1e-6)  # summed, / batch of 2
    assert attention_kl(old, old.log()).item() == pytest.approx(0.0, abs=1e-7)


def _second_step(overrides=()):
    cfg = load_config("synthetic", AVCIL_SYNTH + ["methods=[avcil]", *overrides])
    scenario = make_scenario(cfg)
    method = build_method("avcil", cfg, scenario.tasks[0].train)
    method.before_task(scenario.tasks[0])
    method.memory.update(scenario.tasks[0].train)
    method.before_task(scenario.tasks[1])
    new, old = scenario.tasks[1].train, method.memory.samples
    batch = {k: torch.cat([new[k][:8], old[k][:4]]) for k in new}
    batch["from_memory"] = torch.arange(12) >= 8
    return method, batch


def test_loss_terms_at_a_later_step_and_ablations():
    method, batch = _second_step()
    terms = method.loss_terms(batch)
    assert set(terms) == {"ss_ce", "tkd", "davsc_instance", "davsc_class", "vad_spatial", "vad_temporal"}
    # Right after the step starts the model equals its teacher: no distillation signal yet.
    for name in ("tkd", "vad_spatial", "vad_temporal"):
        assert terms[name].item() == pytest.approx(0.0, abs=1e-5), name
    with torch.no_grad():
        for p in method.model.encoders.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms = method.loss_terms(batch)
    assert terms["vad_spatial"] > 0 and terms["vad_temporal"] > 0 and terms["tkd"] > 0
    # The per-step teacher cache gives the same terms as running the teacher on every batch.
    data, replay = method.training_data({**batch, "from_memory": torch.zeros(12, dtype=torch.bool)},
                                        {k: v[8:] for k, v in batch.items()})
    assert method.teacher["spatial_attention"].shape[0] == 4
    cached = method.loss_terms({**batch, "teacher_row": torch.cat([data["teacher_row"][:8], replay["teacher_row"]])})
    for name, value in terms.items():
        torch.testing.assert_close(cached[name], value, msg=name)
    assert set(_second_step(["method_args.avcil.use_davsc=false"])[0].loss_terms(batch)) == {
        "ss_ce", "tkd", "vad_spatial", "vad_temporal"}
    assert set(_second_step(["method_args.avcil.use_vad=false"])[0].loss_terms(batch)) == {
        "ss_ce", "tkd", "davsc_instance", "davsc_class"}


def test_avcil_needs_the_avcil_model():
    with pytest.raises(AvclError, match="model.name=avcil"):  # when the config is loaded
        load_config("synthetic", TINY + ["methods=[avcil]"])
    cfg = load_config("synthetic", TINY + ["methods=[finetune]"])
    with pytest.raises(AvclError, match="model.name=avcil"):  # and a method built on another model
        build_method("avcil", cfg, make_scenario(cfg).tasks[0].train)


def test_best_val_selection_and_a_tiny_run_learns(tmp_path):
    cfg = load_config("synthetic", AVCIL_SYNTH + ["methods=[avcil]", "train.model_selection=best_val",
                                                  "data.val_per_class=10"])
    m = execute(cfg, tmp_path, show_progress=False)["avcil"]
    matrix = m["accuracy_matrix"]
    assert matrix[0][0] >= 0.8, matrix
    assert m["last_accuracy"] > 1 / 6 + 0.1, m  # chance 1/6; the bar test_methods sets for SS-IL
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    for t in range(3):
        per_epoch = [e["val_accuracy"] for e in events if e["event"] == "epoch_val" and e["task"] == t]
        assert len(per_epoch) == 15
        # The task ends with the best epoch's weights: its val accuracy is the per-epoch maximum.
        assert m["val_accuracy"][t] == pytest.approx(max(per_epoch))


def test_unknown_model_selection_is_a_clear_error(tmp_path):
    with pytest.raises(AvclError, match=r"'train.model_selection' must be one of \['last', 'best_val'\], got 'best'"):
        load_config("synthetic", AVCIL_SYNTH + ["methods=[avcil]", "train.model_selection=best"])  # before any run


def test_speed_benchmark_runs_every_design_and_prints_its_figures_last():
    """A smoke run (tiny sizes; no timing is asserted): every design trains, the last line is name=value."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parents[1] / "benchmarks" / "avcil_step.py"
    done = subprocess.run([sys.executable, str(script), "--videos", "48", "--classes", "4", "--grid", "2", "4",
                           "--dim", "16", "--batch", "8", "--replay-batch", "4", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = dict(pair.split("=") for pair in done.stdout.strip().splitlines()[-1].split())
    for name in ("a_avcl_epoch_s", "b_official_epoch_s", "b_over_a", "a_official_compute_epoch_s",
                 "a_kept_heap_epoch_s", "a_kept_heap_fused_epoch_s", "step_gflop", "flop_fraction"):
        assert float(figures[name]) > 0, name
