"""AFC (AV-CIL's baseline): LSC head, NCA loss, k-means imprinting, importance weights, tiny runs and resume."""
import json
import math

import pytest
import torch

import avcl.engine.runner as runner
from avcl.config import load_config
from avcl.engine.runner import build_method, execute, make_scenario
from avcl.core.errors import AvclError
from avcl.methods.afc import kmeans, nca_loss
from avcl.models.heads import LSCClassifier
from conftest import TINY, run_cli


pytestmark = pytest.mark.usefixtures("one_thread")

# AV-CIL's model on the synthetic clips through the builtin encoders (as tests/test_avcil.py).
AVCIL_SYNTH = TINY + ["model.name=avcil", "model.encoders=builtin", "model.visual_grid=[4,4]",
                      "model.embed_dim=16", "model.feature_dim=32"]


def test_lsc_head_hand_case():
    head = LSCClassifier(2, proxies_per_class=2)
    head.grow(2)
    with torch.no_grad():  # proxy norms do not matter: cosines
        head.proxies.copy_(torch.tensor([[[3.0, 0.0], [0.0, 0.5]], [[-1.0, 0.0], [0.0, -2.0]]]))
    scores = head(torch.tensor([[2.0, 0.0]]))
    # similarity -‖x̂ - p̂‖² = 2 cos - 2: class 0 -> [0, -2], class 1 -> [-4, -2]; softmax-weighted sum
    e = math.exp(-2)
    expected = [-2 * e / (1 + e), (-4 * e - 2) / (1 + e)]
    torch.testing.assert_close(scores, torch.tensor([expected]))


def test_growth_freezes_old_proxies_and_resets_the_scale():
    head = LSCClassifier(4, proxies_per_class=3, scale_init=1.5)
    head.grow(2)
    with torch.no_grad():
        head.scale.fill_(4.0)
    old = head.weight.detach().clone()
    head.grow(5)
    assert head.num_classes == 5 and head.weight.shape == (5, 3, 4)
    torch.testing.assert_close(head.weight[:2], old)
    assert head.scale.item() == 1.5  # a fresh factor at every step, as the official SplitLSCLinear
    assert {id(p) for p in head.parameters()} == {id(head.proxies), id(head.scale)}  # old ones: a buffer
    assert head.proxies.shape == (3, 3, 4) and not head.frozen.requires_grad
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1, weight_decay=0.1)
    new = head.proxies.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        (-head(torch.randn(6, 4)).sum()).backward()
        optimizer.step()
    torch.testing.assert_close(head.weight[:2], old)  # no change, weight decay included
    assert not torch.allclose(head.proxies, new)


def test_state_dict_round_trip_as_the_runner_resumes():
    head = LSCClassifier(4, proxies_per_class=2)
    head.grow(2)
    head.grow(3)
    state = head.state_dict()
    assert set(state) == {"fc.weight", "scale"} and state["fc.weight"].shape == (3, 2, 4)
    fresh = LSCClassifier(4, proxies_per_class=2)
    fresh.grow(state["fc.weight"].shape[0])  # runner.py: head.grow(state["model"]["head.fc.weight"].shape[0])
    fresh.load_state_dict(state)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), head(x))
    fresh.grow(4)  # the next task freezes every loaded proxy
    torch.testing.assert_close(fresh.frozen, state["fc.weight"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        LSCClassifier(4, proxies_per_class=2).load_state_dict(state)


def test_kmeans_finds_separated_clusters():
    torch.manual_seed(0)
    means = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    points = torch.cat([m + 0.1 * torch.randn(10, 3) for m in means])
    centres = kmeans(points, 3, iterations=50)
    order = centres.argmax(dim=1).argsort()
    torch.testing.assert_close(centres[order], points.reshape(3, 10, 3).mean(dim=1))
    few = points[:2]
    torch.testing.assert_close(kmeans(few, 3, 10), few[[0, 1, 0]])  # fewer points than centres: cycled


def _afc(overrides=(), modalities="[audio,video]"):
    cfg = load_config("synthetic", AVCIL_SYNTH + ["methods=[afc]", f"model.modalities={modalities}", *overrides])
    scenario = make_scenario(cfg)
    return build_method("afc", cfg, scenario.tasks[0].train), scenario


def _second_step(overrides=(), modalities="[audio,video]"):
    method, scenario = _afc(overrides, modalities)
    method.before_task(scenario.tasks[0])
    method.memory.update(scenario.tasks[0].train, embed=method.embed_features)
    first = method.model.head.weight.detach().clone()
    method.before_task(scenario.tasks[1])
    new, old = scenario.tasks[1].train, method.memory.samples
    batch = {k: torch.cat([new[k][:8], old[k][:4]]) for k in new}
    return method, scenario, batch, first


def test_imprinting_puts_new_proxies_at_the_class_means():
    # One proxy per class: k-means gives the mean of the class's L2-normalised features.
    method, scenario, _, first = _second_step(["method_args.afc.proxies_per_class=1"])
    head, data = method.model.head, scenario.tasks[1].train
    torch.testing.assert_close(head.frozen, first)
    features = torch.nn.functional.normalize(method.embed_features(data), dim=1)
    centres = torch.stack([features[data["label"] == c].mean(dim=0) for c in range(*method.task_ranges[-1])])
    torch.testing.assert_close(head.proxies[:, 0], centres * first.norm(dim=-1).mean())
    assert method.old_model.head.num_classes == head.num_classes  # the teacher was copied after growing
    assert not torch.allclose(method.old_model.head.proxies, head.proxies)  # ... before imprinting


def test_nca_hand_case_and_margin():
    z, y = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([1])
    # s = 2 (z - 0.6) = [-3.2, -5.2, -7.2], minus its max -> [0, -2, -4]; the target's term becomes exp(0)
    expected = 2 + math.log(2 + math.exp(-4))
    assert nca_loss(z, y, 2.0, 0.6).item() == pytest.approx(expected, rel=1e-6)
    assert nca_loss(z, y, 2.0, 0.0).item() == pytest.approx(expected, rel=1e-6)  # on every similarity: cancels
    # PODNet's target-only margin: s = 2 [-1, -2.6, -3] -> [0, -3.2, -4]
    target_only = 3.2 + math.log(2 + math.exp(-4))
    assert nca_loss(z, y, 2.0, 0.6, target_only=True).item() == pytest.approx(target_only, rel=1e-6)
    # y = 0 is the max: its loss is log(1 + e^-2 + e^-4); the batch loss is the mean
    both = nca_loss(torch.cat([z, z]), torch.tensor([1, 0]), 2.0, 0.6).item()
    assert both == pytest.approx((expected + math.log(1 + math.exp(-2) + math.exp(-4))) / 2, rel=1e-6)


def test_importance_weights_are_normalised_and_follow_the_teacher():
    method, _, batch, _ = _second_step()
    assert method.sites == ("visual_pooled", "audio_features", "visual_features")
    _, weights = method.teacher_sites(batch)
    stacked = torch.stack(weights)  # (sites, batch)
    assert stacked.shape == (3, 12) and (stacked >= 0).all()
    torch.testing.assert_close(stacked.sum(dim=0), torch.ones(12))
    torch.testing.assert_close(weights[1], weights[2])  # sum fusion: equal gradients at f^a and f^v
    # The model equals its teacher below the head: nothing to distil yet.
    assert method.feature_distillation(batch, method.model(batch)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in method.old_model.visual_proj.parameters():
            p.mul_(3.0)
    _, changed = method.teacher_sites(batch)
    assert not torch.allclose(torch.stack(changed), stacked)
    assert method.feature_distillation(batch, method.model(batch)).item() > 0
    loss = method.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and method.model.head.frozen.grad is None


@pytest.mark.parametrize("modalities,site", [("[audio]", "audio_features"), ("[video]", "visual_features")])
def test_unimodal_models_distil_their_one_feature(modalities, site):
    method, _, batch, _ = _second_step(modalities=modalities)
    assert method.sites == (site,)
    assert method.teacher_sites(batch)[1] == [1.0]
    assert torch.isfinite(method.training_loss(batch))


def test_afc_needs_the_avcil_model_and_a_known_classifier():
    with pytest.raises(AvclError, match="model.name=avcil"):  # when the config is loaded
        load_config("synthetic", TINY + ["methods=[afc]"])
    cfg = load_config("synthetic", TINY + ["methods=[finetune]"])
    with pytest.raises(AvclError, match="model.name=avcil"):  # and a method built on another model
        build_method("afc", cfg, make_scenario(cfg).tasks[0].train)
    with pytest.raises(AvclError, match="'nme' or 'lsc'"):
        _afc(["method_args.afc.classifier=fc"])


def test_tiny_run_reports_both_heads_and_beats_finetune(tmp_path):
    recipe = tmp_path / "afc.yaml"
    recipe.write_text("base: synthetic\nmethods: [afc, afc-nme, finetune]\n"
                      "variants:\n  afc-nme: {method: afc, classifier: nme}\n")
    out = tmp_path / "run"
    done = run_cli("run", str(recipe), *AVCIL_SYNTH, "train.lr=0.01", "train.num_threads=1", "--out", str(out),
                   "--quiet")
    assert done.returncode == 0, done.stderr
    m = {name: json.loads((out / name / "metrics.json").read_text()) for name in ("afc", "afc-nme", "finetune")}
    assert set(m["afc"]["heads"]) == {"nme"} and set(m["afc-nme"]["heads"]) == {"lsc"}
    # Same seed, same training: the two entries differ only in which head is reported first.
    assert m["afc"]["accuracy_matrix"] == m["afc-nme"]["heads"]["lsc"]["accuracy_matrix"]
    assert m["afc-nme"]["accuracy_matrix"] == m["afc"]["heads"]["nme"]["accuracy_matrix"]
    for name in ("afc", "afc-nme"):
        assert m[name]["accuracy_matrix"][0][0] >= 0.8, m[name]
        assert m[name]["average_incremental_accuracy"] > m["finetune"]["average_incremental_accuracy"], name


def test_resume_after_a_crash_gives_the_same_metrics(tmp_path, monkeypatch):
    cfg = load_config("synthetic", AVCIL_SYNTH + ["methods=[afc]", "train.epochs=4"])
    reference = execute(cfg, tmp_path / "reference", show_progress=False)["afc"]
    fit_task, calls = runner.Trainer.fit_task, []

    def crash_in_third_task(self, method, task, *args, **kwargs):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit_task(self, method, task, *args, **kwargs)

    monkeypatch.setattr(runner.Trainer, "fit_task", crash_in_third_task)
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, tmp_path / "crashed", show_progress=False)
    assert json.loads((tmp_path / "crashed" / "afc" / "metrics.json").read_text())["tasks_done"] == 2
    monkeypatch.setattr(runner.Trainer, "fit_task", fit_task)
    resumed = execute(cfg, tmp_path / "crashed", show_progress=False)["afc"]
    events = [json.loads(line) for line in (tmp_path / "crashed" / "events.jsonl").read_text().splitlines()]
    assert {"event": "method_resume", "method": "afc", "task": 2}.items() <= \
        next(e for e in events if e["event"] == "method_resume").items()
    timing = {"train_seconds", "task_seconds", "peak_memory_mib"}
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in reference.items() if k not in timing}
