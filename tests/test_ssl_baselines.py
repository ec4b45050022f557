"""The continual self-supervised baselines (continual_ssl_baselines.md): what each step does differently
from fine-tuning, the virtual optimizer step (§1.4), EMA updates, and that labels are never read."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from avcl.config import build_config, method_hparams_for
from avcl.core.errors import AvclError
from avcl.memory.reservoir import ReservoirBuffer
from avcl.methods import METHODS
from avcl.methods.replay_ssl import LabelFreeMethod
from avcl.models import build_model
from avcl.nn.ema import ema_decay, ema_update
from avcl.nn.optim import virtual_optimizer_step, virtual_step

SSL = ["finetune", "er", "derpp", "lump", "mir", "clser", "gmed", "multitask"]
TASK = SimpleNamespace(classes=[0, 1])


class NoLabels(dict):
    """A batch that fails the test if anyone reads its label."""

    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("a label-free method read batch['label']")
        return super().__getitem__(key)


def tiny_cfg(**sections):
    raw = {"data": {"name": "synthetic"}, "methods": ["finetune"], "seed": 0,
           "model": {"name": "cav",
                     "vit": {"width": 32, "depth": 1, "fusion_depth": 1, "heads": 2, "decoder_width": 32,
                             "decoder_depth": 1, "decoder_heads": 2, "video_patch": 8, "audio_patch": [8, 5],
                             "frames": 4},
                     "cav": {"video_mean": [0.5], "video_std": [0.25], "avm": False}},
           "train": {"batch_size": 4, "replay_batch_size": 4, "lr": 1e-3, "adam_betas": [0.95, 0.999]},
           "memory": {"size": 16}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return build_config(raw)


def cav_batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NoLabels(audio=torch.randn(n, 32, 20, generator=g),
                    video=torch.randint(0, 256, (n, 4, 16, 16), generator=g, dtype=torch.uint8),
                    from_memory=torch.zeros(n, dtype=torch.bool))


def make_method(name, cfg=None, model=None, **hparams):
    cfg = cfg or tiny_cfg()
    cls, hp, model_cfg = method_hparams_for(cfg, name)
    for key, value in hparams.items():
        setattr(hp, key, value)
    model = model if model is not None else build_model(model_cfg, cav_batch(2))
    method = cls(model, hp, cfg)
    method.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas))
    method.before_task(TASK)
    return method


def train_step(method, batch):
    """What the trainer does with a method's loss."""
    loss = method.training_loss(batch)
    method.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.optimizer.step()
    return loss


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def spy_ssl_loss(model, calls):
    original = model.ssl_loss

    def spy(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        calls.append(({k: v.detach().clone() for k, v in x.items()}, out))
        return out
    model.ssl_loss = spy


def spy_sample(buffer, draws):
    original = buffer.sample

    def spy(k):
        slots, rows = original(k)
        draws.append((slots.clone(), {key: value.clone() for key, value in rows.items()}))
        return slots, rows
    buffer.sample = spy


# ----- every method on the tiny CAV backbone -------------------------------------------------------
@pytest.mark.parametrize("name", SSL)
def test_label_free_methods_train_without_labels(name, one_thread):
    torch.manual_seed(0)
    method = make_method(name)
    assert method.label_free
    before = [p.detach().clone() for p in method.model.parameters()]
    for step in range(3):
        loss = train_step(method, cav_batch(seed=step))
        assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, method.model.parameters()))
    if name in ("finetune", "multitask"):
        assert method.memory is None
    else:
        assert isinstance(method.memory, ReservoirBuffer) and method.replay == "step"
        assert len(method.memory) == 12 and method.memory.seen == 12


@pytest.mark.parametrize("name", ["derpp", "lump", "mir", "clser", "gmed"])
def test_ssl_only_methods_refuse_a_classifier_model(name):
    cfg = tiny_cfg()
    cls, hp, _ = method_hparams_for(cfg, name)
    assert issubclass(cls, LabelFreeMethod)
    with pytest.raises(AvclError, match="model.name=cav"):
        cls(nn.Linear(2, 2), hp, cfg)


def test_multitask_is_finetune_on_one_task():
    assert METHODS["multitask"].single_task and not METHODS["finetune"].single_task
    torch.manual_seed(0)
    a = make_method("finetune")
    b = make_method("multitask", model=copy.deepcopy(a.model))
    batch = cav_batch()
    torch.manual_seed(5)
    la = a.training_loss(batch)
    torch.manual_seed(5)
    assert torch.equal(la, b.training_loss(batch))


def test_er_replays_stored_prepared_rows_in_one_forward(one_thread):
    torch.manual_seed(0)
    method = make_method("er")
    calls = []
    spy_ssl_loss(method.model, calls)
    draws = []
    spy_sample(method.memory, draws)
    train_step(method, cav_batch(seed=1))
    assert len(calls[0][0]["audio"]) == 4  # empty memory: the current rows only
    train_step(method, cav_batch(seed=2))
    x, _ = calls[1]
    assert len(x["audio"]) == 8 and len(calls) == 2  # [current; replay], one forward
    _, rows = draws[1]
    assert torch.equal(x["audio"][4:], rows["audio"]) and torch.equal(x["video"][4:], rows["video"])
    # the first step's prepared rows are what the reservoir holds
    assert torch.equal(method.memory.rows()["audio"][:4], calls[0][0]["audio"])


# ----- DER++ ---------------------------------------------------------------------------------------
def paired_derpp_er(alpha, one_thread=None):
    torch.manual_seed(0)
    der = make_method("derpp", alpha=alpha)
    train_step(der, cav_batch(seed=1))  # fills the memory with 4 rows and their embeddings
    er = make_method("er", model=copy.deepcopy(der.model))
    er.memory.load_state_dict({**der.memory.state_dict(),
                               "rows": {k: der.memory.rows()[k] for k in ("audio", "video")}})
    der.model.zero_grad(set_to_none=True)
    return der, er


def test_derpp_is_er_plus_the_embedding_penalty(one_thread):
    der, er = paired_derpp_er(alpha=0.5)
    calls = []
    spy_ssl_loss(der.model, calls)
    draws = []
    spy_sample(der.memory, draws)
    batch = cav_batch(seed=2)
    torch.manual_seed(7)
    loss_der = der.training_loss(batch)
    loss_der.backward()
    torch.manual_seed(7)
    loss_er = er.training_loss(batch)
    loss_er.backward()
    (_, out), (_, rows) = calls[0], draws[0]
    penalty = 0.5 * (((out["z_audio"][4:] - rows["z_audio"]) ** 2).mean()
                     + ((out["z_video"][4:] - rows["z_video"]) ** 2).mean())
    assert float(penalty.detach()) > 0
    assert torch.allclose(loss_der, loss_er + penalty, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(a, b) for a, b in zip(grads(der.model), grads(er.model)))
    # the current rows are stored with their own embeddings from this forward, detached
    stored = der.memory.rows()
    assert torch.allclose(stored["z_audio"][4:8], out["z_audio"][:4].detach())
    assert not stored["z_audio"].requires_grad


def test_derpp_without_penalty_has_ers_gradient(one_thread):
    der, er = paired_derpp_er(alpha=0.0)
    batch = cav_batch(seed=2)
    torch.manual_seed(7)
    der.training_loss(batch).backward()
    torch.manual_seed(7)
    er.training_loss(batch).backward()
    for a, b in zip(grads(der.model), grads(er.model)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# ----- LUMP ----------------------------------------------------------------------------------------
def test_lump_trains_on_a_mixture_only_and_stores_clean_rows(one_thread):
    torch.manual_seed(0)
    method = make_method("lump")
    train_step(method, cav_batch(seed=1))
    calls = []
    spy_ssl_loss(method.model, calls)
    draws = []
    spy_sample(method.memory, draws)
    numpy_state = np.random.get_state()[1].copy()
    prepared = []
    original_prepare = method.model.prepare
    method.model.prepare = lambda b, t: prepared.append(original_prepare(b, t)) or prepared[-1]
    train_step(method, cav_batch(seed=2))
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # lambda comes from torch, not numpy
    (mixed, _), (_, rows), x = calls[0], draws[0], prepared[0]
    assert len(calls) == 1 and len(mixed["audio"]) == 4  # one forward, B rows: the mixture only
    a, b, m = x["audio"].flatten(), rows["audio"].flatten(), mixed["audio"].flatten()
    far = (a - b).abs().argmax()
    lam = float((m[far] - b[far]) / (a[far] - b[far]))
    assert 0 <= lam <= 1
    for key in ("audio", "video"):  # one lambda for both modalities, row i with drawn row i
        assert torch.allclose(mixed[key], lam * x[key] + (1 - lam) * rows[key], atol=1e-4)
        assert not torch.allclose(mixed[key], x[key], atol=1e-3)
    assert torch.equal(method.memory.rows()["audio"][4:8], x["audio"])  # clean current rows stored


def test_lump_lambda_is_reproducible_from_the_torch_seed():
    method = make_method("lump")
    x = {"audio": torch.ones(2, 3), "video": torch.ones(2, 1)}
    replay = {"audio": torch.zeros(2, 3), "video": torch.zeros(2, 1)}
    torch.manual_seed(3)
    first = method.mix(x, replay)["audio"][0, 0]
    torch.manual_seed(3)
    assert torch.equal(first, method.mix(x, replay)["audio"][0, 0])
    lams = torch.stack([method.mix(x, replay)["audio"][0, 0] for _ in range(400)])
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.06)
    assert float(((lams < 0.1) | (lams > 0.9)).float().mean()) > 0.35  # Beta(0.5, 0.5) is U-shaped


# ----- a deterministic label-free model for the planted cases ---------------------------------------
class ToyLabelFree(nn.Module):
    """The CAV API subset the baselines use, without random masking: per-row loss
    (sum(a * w) - sum(v * u))^2 + 0.1 * sum(a^2 * w^2)."""
    label_free = True

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -0.3, 0.2]))
        self.u = nn.Parameter(torch.tensor([0.1, 0.4]))

    def prepare(self, batch, train):
        return {"audio": batch["audio"].float(), "video": batch["video"].float()}

    def ssl_loss(self, x, selected=None, reduction="mean"):
        za, zv = x["audio"] * self.w, x["video"] * self.u
        loss = (za.sum(1) - zv.sum(1)) ** 2 + 0.1 * (za ** 2).sum(1)
        return {"loss": loss.mean() if reduction == "mean" else loss, "z_audio": za, "z_video": zv}

    def masked_embeddings(self, x):
        return {"audio": x["audio"] * self.w, "video": x["video"] * self.u}


def toy_method(name, replay_batch_size, **hparams):
    cfg = tiny_cfg(train={"replay_batch_size": replay_batch_size, "lr": 0.05})
    method = make_method(name, cfg=cfg, model=ToyLabelFree(), **hparams)
    method.optimizer = torch.optim.Adam(method.model.parameters(), lr=0.05, betas=(0.95, 0.999), weight_decay=0.01)
    warm = {"audio": torch.tensor([[1.0, 2.0, 0.5]]), "video": torch.tensor([[0.3, -1.0]])}
    method.model.ssl_loss(warm)["loss"].backward()  # one real step: the optimizer has moments
    method.optimizer.step()
    method.optimizer.zero_grad()
    return method


def real_step_copy(model, optimizer, x):
    """A deep copy of ``model`` after one real optimizer step on ``x`` (same optimizer state)."""
    twin = copy.deepcopy(model)
    opt = type(optimizer)(twin.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                 if k in ("lr", "betas", "eps", "weight_decay")})
    opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # (load_state_dict shares the tensors)
    twin.ssl_loss(x)["loss"].backward()
    opt.step()
    return twin


def test_mir_replays_the_candidates_whose_loss_rises_most():
    method = toy_method("mir", replay_batch_size=3, search_factor=4)
    g = torch.Generator().manual_seed(0)
    stored = {"audio": torch.randn(12, 3, generator=g) * torch.linspace(0.2, 3, 12)[:, None],
              "video": torch.randn(12, 2, generator=g)}
    method.memory.add(stored)
    current = NoLabels(audio=torch.tensor([[2.0, -1.0, 1.0], [1.5, 0.5, -2.0], [0.0, 1.0, 1.0]]),
                       video=torch.tensor([[1.0, 1.0], [-1.0, 2.0], [0.5, 0.0]]))
    model, optimizer = method.model, method.optimizer
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict())
    twin = real_step_copy(model, optimizer, method.model.prepare(current, True))
    with torch.no_grad():
        score = twin.ssl_loss(stored, reduction="none")["loss"] - model.ssl_loss(stored, reduction="none")["loss"]
        before = model.ssl_loss(stored, reduction="none")["loss"]
        after = twin.ssl_loss(stored, reduction="none")["loss"]
    expected = set(score.topk(3).indices.tolist())
    # the plant discriminates: neither the highest loss before nor after gives the same rows
    assert expected != set(before.topk(3).indices.tolist()) and expected != set(after.topk(3).indices.tolist())
    calls = []
    spy_ssl_loss(model, calls)
    loss = method.training_loss(current)
    replayed = calls[-1][0]["audio"][3:]
    picked = {int((stored["audio"] == row).all(1).nonzero()) for row in replayed}
    assert picked == expected
    assert len(calls) == 4  # pre (no grad), virtual, post (no grad), the ER forward on [cur; kept]
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # restored exactly
    assert all(p.grad is None for p in model.parameters())
    after_state = optimizer.state_dict()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after_state["state"][key][name]))
    assert torch.isfinite(loss)


def test_gmed_edits_stored_rows_by_the_formula_and_writes_them_back():
    method = toy_method("gmed", replay_batch_size=3)
    stored = {"audio": torch.tensor([[1.0, 0.5, -1.0], [2.0, -1.0, 0.0], [0.3, 0.3, 2.0], [1.0, 1.0, 1.0]]),
              "video": torch.tensor([[0.5, 1.0], [-1.0, 0.2], [1.5, -0.5], [0.0, 2.0]])}
    method.memory.add(stored)
    current = NoLabels(audio=torch.tensor([[2.0, -1.0, 1.0], [1.5, 0.5, -2.0]]),
                       video=torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    model = method.model
    weights = [p.detach().clone() for p in model.parameters()]
    twin = real_step_copy(model, method.optimizer, model.prepare(current, True))
    original = copy.deepcopy(model)
    draws = []
    spy_sample(method.memory, draws)
    calls = []
    spy_ssl_loss(model, calls)
    method.training_loss(current)
    slots, rows = draws[0]

    def input_grads(net):
        leaves = {k: rows[k].clone().requires_grad_(True) for k in ("audio", "video")}
        return torch.autograd.grad(net.ssl_loss(leaves)["loss"], [leaves["audio"], leaves["video"]])

    g1, g2 = input_grads(original), input_grads(twin)
    for key, pre, post in zip(("audio", "video"), g1, g2):
        expected = rows[key] + 0.1 * (post - 0.95 * pre)
        assert not torch.allclose(expected, rows[key], atol=1e-3)  # the edit is not negligible here
        assert torch.allclose(method.memory.storage[key][slots], expected, rtol=1e-4, atol=1e-6)
        assert torch.allclose(calls[-1][0][key][2:], expected, rtol=1e-4, atol=1e-6)  # replayed edited
    untouched = [s for s in range(4) if s not in slots.tolist()]
    for s in untouched:
        assert torch.equal(method.memory.storage["audio"][s], stored["audio"][s])
    assert method.memory.seen == 4 + 2  # edits are not presentations; the current rows were offered
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))


def test_gmed_counted_edits_decay_the_step():
    method = toy_method("gmed", replay_batch_size=2, count_edits=True, edit_decay=1.0)
    current = NoLabels(audio=torch.tensor([[2.0, -1.0, 1.0], [1.5, 0.5, -2.0]]),
                       video=torch.tensor([[1.0, 1.0], [-1.0, 2.0]]))
    method.training_loss(current)  # stores the two rows with 0 edits
    first = {k: v.clone() for k, v in method.memory.rows().items()}
    method.training_loss(current)  # edits both (age 0: factor 1), writes age 1
    second = {k: v.clone() for k, v in method.memory.rows().items()}
    assert not torch.equal(first["audio"][:2], second["audio"][:2]) and second["edits"][:2].tolist() == [1, 1]
    method.training_loss(current)  # age 1 with decay 1: factor 0, rows frozen
    assert torch.equal(method.memory.rows()["audio"][:2], second["audio"][:2])


# ----- CLS-ER --------------------------------------------------------------------------------------
def test_clser_emas_update_before_the_step_with_the_warmup_decay(one_thread):
    torch.manual_seed(0)
    method = make_method("clser", plastic_model_update_freq=1.0, stable_model_update_freq=0.0)
    plastic0 = [p.clone() for p in method.plastic.parameters()]
    stable0 = [p.clone() for p in method.stable.parameters()]
    working0 = [p.detach().clone() for p in method.model.parameters()]
    train_step(method, cav_batch(seed=1))
    c = ema_decay(1, 0.999)
    assert c == 0.5
    for p, p0, w0 in zip(method.plastic.parameters(), plastic0, working0):
        assert torch.allclose(p, c * p0 + (1 - c) * w0)  # the working weights before this step's update
    assert all(torch.equal(p, p0) for p, p0 in zip(method.stable.parameters(), stable0))
    assert all(not p.requires_grad for p in method.plastic.parameters())
    assert method.global_step == 1


def test_clser_ema_update_frequencies(monkeypatch):
    import avcl.methods.clser as clser
    method = make_method("clser")
    hits = []
    monkeypatch.setattr(clser, "ema_update", lambda target, source, decay: hits.append(target))
    torch.manual_seed(0)
    steps = 2000
    for _ in range(steps):
        method.update_emas()
    plastic = sum(t is method.plastic for t in hits) / steps
    stable = sum(t is method.stable for t in hits) / steps
    assert plastic == pytest.approx(0.8, abs=0.04) and stable == pytest.approx(0.6, abs=0.04)
    assert method.global_step == steps


def test_clser_targets_come_from_the_ema_that_matches_each_pair_better():
    method = toy_method("clser", replay_batch_size=4)
    eye = torch.eye(4)
    # stable matches rows 0, 1 (audio == video), plastic rows 2, 3; the other rows are confusable
    stable = {"audio": eye.clone(), "video": torch.stack([eye[0], eye[1], eye[0], eye[1]])}
    plastic = {"audio": eye.clone(), "video": torch.stack([eye[2], eye[3], eye[2], eye[3]]) + 0.01}
    method.stable.masked_embeddings = lambda x: stable
    method.plastic.masked_embeddings = lambda x: plastic
    target = method.targets({"audio": torch.zeros(4, 3), "video": torch.zeros(4, 2)})
    assert torch.equal(target["video"][:2], stable["video"][:2])
    assert torch.equal(target["video"][2:], plastic["video"][2:])
    assert torch.equal(target["audio"][:2], stable["audio"][:2])
    assert torch.equal(target["audio"][2:], plastic["audio"][2:])


def test_clser_state_dict_restores_emas_and_counter(one_thread):
    torch.manual_seed(0)
    method = make_method("clser")
    for step in range(2):
        train_step(method, cav_batch(seed=step))
    state = copy.deepcopy(method.state_dict())
    fresh = make_method("clser", model=copy.deepcopy(method.model))
    fresh.load_state_dict(state)
    assert fresh.global_step == 2 and len(fresh.memory) == 8
    for a, b in zip(fresh.plastic.state_dict().values(), method.plastic.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(fresh.stable.state_dict().values(), method.stable.state_dict().values()):
        assert torch.equal(a, b)
    torch.manual_seed(9)
    loss_a = method.training_loss(cav_batch(seed=5))
    torch.manual_seed(9)
    assert torch.equal(loss_a, fresh.training_loss(cav_batch(seed=5)))


# ----- virtual optimizer step and EMA -------------------------------------------------------------------
def toy_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def set_grads(net, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g)
    net.zero_grad(set_to_none=True)
    (net(x) ** 2).mean().backward()


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "sgd-nesterov"])
def test_virtual_step_matches_a_real_step_and_restores_everything(kind):
    net = toy_net()
    make = {"adam": lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.95, 0.999), weight_decay=0.05),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
            "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.05),
            "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True)}[kind]
    opt = make(net[0].parameters())  # net[2] has no state yet: added below, as a new param group
    for seed in range(3):
        set_grads(net, seed)
        opt.step()
    opt.add_param_group({"params": list(net[2].parameters())})
    set_grads(net, 10)
    twin = copy.deepcopy(net)  # (deepcopy leaves the grads behind)
    for q, p in zip(twin.parameters(), net.parameters()):
        q.grad = p.grad.clone()
    twin_opt = make(twin[0].parameters())
    twin_opt.add_param_group({"params": list(twin[2].parameters())})
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict shares the tensors)
    twin_opt.step()
    weights = [p.detach().clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    grads = [p.grad for p in net.parameters()]
    with virtual_step(net.parameters(), opt) as step:
        step()
        for p, q in zip(net.parameters(), twin.parameters()):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), kind  # (Adam: eps placed as STELLA's, O(eps) off)
        assert any(not torch.equal(p, w) for p, w in zip(net.parameters(), weights))
        net.zero_grad(set_to_none=True)  # as MIR's and GMED's steps do inside
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    assert all(p.grad is g for p, g in zip(net.parameters(), grads))  # the entry's grads (earlier micro-batches)
    after = opt.state_dict()
    assert after["state"].keys() == state["state"].keys()
    for key, value in state["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["state"][key][name]))


def test_virtual_adam_step_is_the_specs_formula():
    """theta - lr * sqrt(1 - b2^(k+1)) / (1 - b1^(k+1)) * m' / (sqrt(v') + eps), coupled decay, k stored."""
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = torch.optim.Adam([p], lr=0.1, betas=(0.9, 0.99), eps=0.5, weight_decay=0.2)
    p.grad = torch.tensor([0.3, 0.1, -0.4])
    opt.step()
    m, v, k = (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(), float(opt.state[p]["step"]))
    theta = p.detach().clone()
    p.grad = torch.tensor([-0.2, 0.6, 0.1])
    g = p.grad + 0.2 * theta
    m2, v2 = 0.9 * m + 0.1 * g, 0.99 * v + 0.01 * g ** 2
    expected = theta - 0.1 * (1 - 0.99 ** (k + 1)) ** 0.5 / (1 - 0.9 ** (k + 1)) * m2 / (v2.sqrt() + 0.5)
    virtual_optimizer_step(opt)
    assert torch.allclose(p.detach(), expected, rtol=1e-6)
    assert float(opt.state[p]["step"]) == k and torch.equal(opt.state[p]["exp_avg"], m)


def test_virtual_step_needs_an_optimizer():
    with pytest.raises(AvclError, match="optimizer"):
        virtual_optimizer_step(None)


def test_ema_update_moves_parameters_and_copies_buffers():
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = copy.deepcopy(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    source[1].running_mean.fill_(3.0)
    old = [p.detach().clone() for p in target.parameters()]
    ema_update(target, source, 0.9)
    for t, o, s in zip(target.parameters(), old, source.parameters()):
        assert torch.allclose(t, 0.9 * o + 0.1 * s)
    assert torch.equal(target[1].running_mean, source[1].running_mean)
    assert ema_decay(0, 0.999) == 0.0 and ema_decay(1, 0.999) == 0.5 and ema_decay(10 ** 6, 0.999) == 0.999


# ----- code_ranks: one process emulating the official code's per-rank batch of B/R rows ---------------------

def test_mir_code_ranks_keeps_the_top_of_each_pool():
    """R = 2: the 8 candidates are 2 pools of 4 (as 2 ranks of the code draw them), the top 2 of each kept;
    R = 1: the top 4 of all 8. Planted scores: pool 0 holds the 4 highest."""
    scores = torch.tensor([8.0, 7.0, 6.0, 5.0, 1.0, 2.0, 3.0, 4.0])
    expected = {1: [0, 1, 2, 3], 2: [0, 1, 6, 7]}
    for ranks, positions in expected.items():
        method = toy_method("mir", replay_batch_size=4, search_factor=2, code_ranks=ranks)
        g = torch.Generator().manual_seed(0)
        method.memory.add({"audio": torch.randn(8, 3, generator=g), "video": torch.randn(8, 2, generator=g)})
        method.interference = lambda x, candidates: scores
        draws, calls = [], []
        spy_sample(method.memory, draws)
        spy_ssl_loss(method.model, calls)
        method.training_loss(NoLabels(audio=torch.ones(2, 3), video=torch.ones(2, 2)))
        candidates = draws[0][1]["audio"]
        replayed = calls[-1][0]["audio"][2:]
        assert sorted(int((candidates == row).all(1).nonzero()) for row in replayed) == positions, ranks


def test_gmed_code_ranks_scales_the_edit():
    """R = 2: every edit (stored row after - before) is twice the R = 1 edit, from the same state and draw."""
    edits = {}
    for ranks in (1, 2):
        method = toy_method("gmed", replay_batch_size=2, code_ranks=ranks)
        stored = {"audio": torch.tensor([[1.0, 0.5, -1.0], [2.0, -1.0, 0.0], [0.3, 0.3, 2.0]]),
                  "video": torch.tensor([[0.5, 1.0], [-1.0, 0.2], [1.5, -0.5]])}
        method.memory.add(stored)
        method.training_loss(NoLabels(audio=torch.tensor([[2.0, -1.0, 1.0], [1.5, 0.5, -2.0]]),
                                      video=torch.tensor([[1.0, 1.0], [-1.0, 2.0]])))
        edits[ranks] = {key: method.memory.storage[key][:3] - stored[key] for key in stored}
    for key in ("audio", "video"):
        assert edits[1][key].abs().max() > 1e-3  # the edit is not negligible here
        torch.testing.assert_close(edits[2][key], 2 * edits[1][key], rtol=1e-5, atol=1e-6)  # (x + e) - x


def test_clser_code_ranks_runs_the_matching_softmax_per_group():
    """R = 2 on 4 replay rows: each row's target is the one R = 1 picks on its half alone (rows 0-1, rows 2-3);
    the plant is one where the softmax over all 4 rows picks otherwise."""
    g = torch.Generator().manual_seed(0)
    stable = {"audio": torch.randn(4, 3, generator=g), "video": torch.randn(4, 3, generator=g)}
    plastic = {"audio": torch.randn(4, 3, generator=g), "video": torch.randn(4, 3, generator=g)}

    def targets(ranks, rows):
        method = toy_method("clser", replay_batch_size=4, code_ranks=ranks, temperature=0.5)
        method.stable.masked_embeddings = lambda x: {k: v[rows] for k, v in stable.items()}
        method.plastic.masked_embeddings = lambda x: {k: v[rows] for k, v in plastic.items()}
        return method.targets({"audio": torch.zeros(len(rows), 3), "video": torch.zeros(len(rows), 2)})

    grouped = targets(2, [0, 1, 2, 3])
    halves = [targets(1, [0, 1]), targets(1, [2, 3])]
    whole = targets(1, [0, 1, 2, 3])
    for key in ("audio", "video"):
        assert torch.equal(grouped[key], torch.cat([h[key] for h in halves]))
    assert any(not torch.equal(whole[key], grouped[key]) for key in ("audio", "video"))
