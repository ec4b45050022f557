"""HAD (reconstructed): HDM terms, HAM, the snippet model, a tiny end-to-end run."""
import pytest
import torch
from omegaconf import OmegaConf

from avcl.config import ModelConfig, load_config
from avcl.engine.runner import build_method, execute, make_scenario
from avcl.methods.had import proxy_kd, relation_kd, segmental_noise
from avcl.models.had import HADNet
from conftest import TINY

HAD_TINY = TINY + ["model.name=had", "model.snippets=2"]


def test_relation_and_proxy_terms_are_zero_for_equal_models_and_positive_otherwise():
    torch.manual_seed(0)
    new, other = torch.randn(6, 5), torch.randn(6, 5)
    proxies = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    assert relation_kd(new, new.clone(), 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert proxy_kd(new, new.clone(), proxies, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_kd(new, other, 0.1).item() > 1e-3
    assert proxy_kd(new, other, proxies, 0.1).item() > 1e-3


def test_every_hdm_term_vanishes_when_old_equals_new_and_grows_when_they_differ():
    cfg = load_config("synthetic", HAD_TINY + ["methods=[had]", "method_args.had.ham=false"])
    scenario = make_scenario(cfg)
    method = build_method("had", cfg, scenario.tasks[0].train)
    method.before_task(scenario.tasks[0])
    method.after_task(scenario.tasks[0])
    method.before_task(scenario.tasks[1])  # old model = exact copy of the current one
    batch = {k: v[:10] for k, v in scenario.tasks[1].train.items()}
    batch["from_memory"] = torch.zeros(10, dtype=torch.bool)
    ce = torch.nn.functional.cross_entropy(method.model(batch)["logits"], batch["label"])
    with torch.no_grad():
        assert method.training_loss(batch).item() == pytest.approx(ce.item(), abs=1e-5)
        for p in method.model.low.parameters():
            p.add_(0.1 * torch.randn_like(p))
        changed = method.model(batch)
        drift = method.training_loss(batch).item() - torch.nn.functional.cross_entropy(
            changed["logits"], batch["label"]).item()
    assert drift > 1e-4


def test_ham_perturbs_each_snippet_of_exemplars_only():
    torch.manual_seed(0)
    x = torch.zeros(4, 3, 5)
    rows = torch.tensor([True, False, True, False])
    out = segmental_noise(x, rows, torch.ones(4, 5), 0.5)
    assert torch.all(out[~rows] == 0)
    assert (out[rows] != 0).all()
    assert not torch.allclose(out[0, 0], out[0, 1])  # independent noise per snippet


def test_ham_keeps_labels_and_changes_replayed_features():
    cfg = load_config("synthetic", HAD_TINY + ["methods=[had]"])
    scenario = make_scenario(cfg)
    method = build_method("had", cfg, scenario.tasks[0].train)
    method.before_task(scenario.tasks[0])
    method.after_task(scenario.tasks[0])
    assert set(method.class_std) == {"low:audio", "low:video", "snippet"}
    batch = {k: v[:6] for k, v in method.memory.samples.items()}
    batch["from_memory"] = torch.ones(6, dtype=torch.bool)
    labels = batch["label"].clone()
    low = method.model.low_level(batch)["audio"]
    augmented = method._augment(low, "low:audio", batch)
    assert not torch.allclose(low, augmented) and torch.equal(batch["label"], labels)


@pytest.mark.parametrize("inputs", ["raw", "snippet_features"])
def test_snippet_model_shapes(inputs):
    if inputs == "raw":
        example = {"audio": torch.randn(3, 32, 20), "video": torch.zeros(3, 4, 16, 16, dtype=torch.uint8)}
        cfg = ModelConfig(name="had", snippets=4, embed_dim=8, feature_dim=12)
        n = 4
    else:  # AVE-style: 10 snippets of pre-extracted features per modality
        example = {"audio": torch.randn(3, 10, 7), "video": torch.randn(3, 10, 9)}
        cfg = ModelConfig(name="had", audio_encoder="linear", video_encoder="linear", embed_dim=8, feature_dim=12)
        n = 10
    model = HADNet(OmegaConf.structured(cfg), example)
    model.head.grow(5)
    out = model(example)
    assert out["snippets"].shape == (3, n, 12) and out["features"].shape == (3, 12) and out["logits"].shape == (3, 5)


def test_tiny_had_run_learns_and_beats_finetune(tmp_path):
    cfg = load_config("synthetic", HAD_TINY + ["methods=[had,finetune]"])
    results = execute(cfg, tmp_path, show_progress=False)
    had = results["had"]
    assert had["accuracy_matrix"][0][0] >= 0.8
    assert had["average_incremental_accuracy"] > results["finetune"]["average_incremental_accuracy"]
