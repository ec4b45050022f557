"""The official linear-probe protocol (XKD's SVM, ``eval.probe_protocol=official``) piece by piece on small
hand-made data, each piece checked against an independent scikit-learn computation or a hand-worked case."""
import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from sklearn.svm import LinearSVC  # noqa: E402

from avcl.config.schema import EvalConfig  # noqa: E402
from avcl.eval.probe import (OfficialProbe, clip_scores, fit_linear, fit_svm, linear_probes,  # noqa: E402
                             official_probe, select_cost, validation_split, view_features)


def _opts(**kw) -> OfficialProbe:
    return OfficialProbe.from_eval(EvalConfig(**kw))


def _two_classes(n: int, informative_scale: float, seed: int):
    """Feature 0 carries the class (sign), at ``informative_scale``; feature 1 is unit noise."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = np.stack([(2 * y - 1) * (1 + 0.2 * g.standard_normal(n)) * informative_scale, g.standard_normal(n)], axis=1)
    return torch.from_numpy(x), torch.from_numpy(y)


def test_official_does_not_standardise():
    # the class feature 1000x smaller than the noise: with C=1 an SVM on the raw features can't afford the weight
    # it needs (chance), the standardised probe can (all right); scaled back up, the raw SVM gets it too
    xtr, ytr = _two_classes(200, 1e-3, 0)
    xte, yte = _two_classes(200, 1e-3, 1)
    opts = _opts(probe_svm_costs=[1.0])
    small = official_probe(xtr[:, None], ytr, xte[:, None], yte, opts, 0)["metric"]
    standardised = fit_linear(xtr, ytr, xte, yte, "svm", 1.0, 0)
    assert small <= 0.6 and standardised >= 0.95
    scale = torch.tensor([1000.0, 1.0], dtype=torch.float64)
    big = official_probe((xtr * scale)[:, None], ytr, (xte * scale)[:, None], yte, opts, 0)["metric"]
    assert big >= 0.95
    assert fit_linear(xtr * scale, ytr, xte * scale, yte, "svm", 1.0, 0) == standardised  # scale-free
    # and it is exactly sklearn's LinearSVC on the raw rows
    raw = LinearSVC(C=1.0, max_iter=1000, random_state=0).fit(xtr.numpy(), ytr.numpy())
    assert small == pytest.approx(float((raw.predict(xte.numpy()) == yte.numpy()).mean()))


def test_cost_chosen_on_validation_matches_brute_force():
    g = np.random.default_rng(3)
    n, views, d, classes = 90, 2, 5, 3
    y = np.arange(n) % classes
    centres = g.standard_normal((classes, d)) * 0.05  # small: the C grid matters
    x = centres[y][:, None] + 0.05 * g.standard_normal((n, views, d))
    costs = [1e-3, 1e-1, 10.0, 1e3]
    held = validation_split(y, 0.3, 7)
    # the split: 30% of each class's clips (all views of a clip on one side)
    assert [int(held[y == c].sum()) for c in range(classes)] == [9, 9, 9]
    best, scores = select_cost(x[~held], y[~held], x[held], y[held], costs, 1000, 0)
    brute = []
    for c in costs:  # brute force: one sklearn fit per C on every view as a row, val scores mean over views
        svm = LinearSVC(C=c, max_iter=1000, random_state=0).fit(
            x[~held].reshape(-1, d), np.repeat(y[~held], views))
        s = svm.decision_function(x[held].reshape(-1, d)).reshape(int(held.sum()), views, -1).mean(axis=1)
        brute.append(float((s.argmax(axis=1) == y[held]).mean()))
    assert scores == pytest.approx(brute)
    assert len(set(brute)) > 1  # the grid is not flat: the choice is a real one
    top = max(brute)
    assert best == [c for c, s in zip(costs, brute) if s == top][-1]  # ties: the later C, as the code's >=
    # official_probe uses that choice (seeded split), then refits on all train clips
    opts = _opts(probe_svm_costs=costs, probe_val_fraction=0.3)
    out = official_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x[:12]),
                         torch.from_numpy(y[:12]), opts, 7)
    assert out["c"] == best and out["val"] == pytest.approx(top)


def test_test_clip_scores_are_the_mean_of_view_scores():
    # classes at x = -1 / +1; each test clip has one misleading view and two right ones
    xtr = torch.tensor([[-1.0, 0.0], [-1.1, 0.1], [1.0, 0.0], [1.1, -0.1]], dtype=torch.float64)
    ytr = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[[0.2, 0.0], [-1.0, 0.0], [-1.0, 0.0]],
                         [[-0.2, 0.0], [1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    yte = torch.tensor([0, 1])
    svm = fit_svm(xtr[:, None].numpy(), ytr.numpy(), 10.0, 1000, 0)
    per_view = np.stack([[svm.decision_function(v[None])[0] for v in clip] for clip in test.numpy()])
    averaged = clip_scores(svm, test.numpy())
    assert averaged[:, 1] == pytest.approx(per_view.mean(axis=1))  # column 1 = sklearn's binary score
    assert averaged[:, 0] == pytest.approx(-per_view.mean(axis=1))
    opts = _opts(probe_svm_costs=[10.0])
    assert official_probe(xtr[:, None], ytr, test, yte, opts, 0)["metric"] == 1.0
    assert official_probe(xtr[:, None], ytr, test[:, :1], yte, opts, 0)["metric"] == 0.0  # first view alone


class _MeanModel(torch.nn.Module):
    """Features: the mean brightness of each frame's quadrants (video) and the mean fbank per bin (audio)."""

    def embed(self, batch):
        v = batch["video"].float()
        b, t, h, w = v.shape
        quads = v.view(b, t, 2, h // 2, 2, w // 2).mean(dim=(1, 3, 5)).flatten(1)
        return {"video": quads, "audio": batch["audio"].float().mean(dim=1)}


def _raw(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % 2
    video = torch.randint(0, 256, (n, 2, 8, 8), generator=g, dtype=torch.uint8)
    video[label == 1, :, :4] = 250  # class 1: a bright top half
    audio = torch.randn(n, 6, 4, generator=g) + label[:, None, None]
    return {"video": video, "audio": audio, "label": label}


def test_views_are_seeded_augmentations_with_the_plain_clip_first():
    data, opts = _raw(10, 0), _opts(probe_volume_jitter=0.5)
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    feats = view_features(_MeanModel(), data, 4, "cpu", autocast, 3, True, opts, 5)
    plain = _MeanModel().embed(data)
    assert feats["video"].shape == (10, 3, 4) and feats["audio"].shape == (10, 3, 4)
    assert torch.allclose(feats["video"][:, 0], plain["video"]) and torch.allclose(feats["audio"][:, 0], plain["audio"])
    assert not torch.allclose(feats["video"][:, 1], feats["video"][:, 2])  # the views differ
    # the volume jitter is one offset per clip: audio_power ln g, |ln g| <= ln(1.5)
    shift = feats["audio"][:, 1] - plain["audio"]
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5)
    assert shift.abs().max() <= 2 * np.log(1.5) + 1e-5 and shift.abs().max() > 0
    again = view_features(_MeanModel(), data, 4, "cpu", autocast, 3, True, opts, 5)
    assert torch.equal(again["video"], feats["video"])  # seeded
    # a feature store (fixed vectors, no raw frames or fbank): nothing to augment, one view
    store = {"video": plain["video"], "audio": plain["audio"]}
    identity = type("Identity", (torch.nn.Module,), {"embed": lambda self, batch: dict(batch)})()
    assert view_features(identity, store, 4, "cpu", autocast, 3, True, opts, 5)["video"].shape == (10, 1, 4)


def test_linear_probes_name_their_protocol():
    train, test = _raw(24, 1), _raw(12, 2)
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    ours = linear_probes(_MeanModel(), train, test, 8, "cpu", autocast, "svm", 1.0, 0)
    assert ours["probe_protocol"] == "avcl" and "probe_av_c" not in ours
    opts = _opts(probe_train_views=2, probe_test_clips=3, probe_svm_costs=[0.1, 1.0])
    official = linear_probes(_MeanModel(), train, test, 8, "cpu", autocast, "svm", 1.0, 0, "official", opts)
    assert official["probe_protocol"] == "official"
    assert official["probe_train_views"] == 2 and official["probe_test_clips"] == 3
    for name in ("video", "audio", "av"):
        assert 0 <= official[f"probe_{name}_accuracy"] <= 1 and official[f"probe_{name}_c"] in (0.1, 1.0)
    assert official["probe_video_accuracy"] == 1.0  # the bright half survives crops and jitter


def test_metrics_and_config_carry_the_protocol():
    from omegaconf import OmegaConf

    from avcl.core.errors import AvclError
    from avcl.eval.protocols import Probe, Retrieval
    cfg = OmegaConf.create({"eval": {"probe_protocol": "official", "probe": "end"}})
    assert Probe(cfg, None, "cpu", None).metrics({"probes": None, "probe_per_task": []})["probe_protocol"] == "official"
    with pytest.raises(AvclError, match="STELLA's trained head"):  # the retrieval probe is not XKD's SVM
        Retrieval.check(cfg, None)
