"""The optimizer step (avcl.engine.regime): parameter groups, schedules, accumulation, clipping, fp16 + GradScaler,
and their state across a resume. Expected values are closed forms or direct computations, not the module's output."""
import json
import math

import pytest
import torch
from torch import nn

from avcl.config import load_config
from avcl.core.device import autocast_factory
from avcl.core.errors import AvclError
from avcl.engine.regime import Regime, param_groups
from avcl.engine.runner import build_method, make_scenario
from avcl.engine.trainer import Trainer
from avcl.nn.optim import virtual_step
from conftest import run_cli

TINY = ["data.train_per_class=16", "data.test_per_class=4", "data.val_per_class=2", "data.num_classes=4",
        "scenario.num_tasks=2", "train.num_threads=1"]


class Toy(nn.Module):
    """A ViT-like module whose parameters' names say which group each belongs to."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Linear(4, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(3)])
        self.head = nn.Linear(4, 2)


class ToyMethod:
    """What Regime.build reads of a method."""
    name, label_free = "toy", False

    def __init__(self, model, lr=None):
        self.model = model
        self.hp = type("Hp", (), {"lr": lr, "epochs": None})()

    def named_parameters(self):
        return self.model.named_parameters()

    def param_groups(self, groups):
        return groups


def train_cfg(*overrides):
    return load_config("synthetic", list(overrides)).train


def test_no_decay_groups_hold_exactly_the_biases_norms_embeddings_and_tokens():
    groups = param_groups(Toy().named_parameters(), train_cfg("train.weight_decay=0.05"), 1e-3)
    by_decay = {g["weight_decay"]: set(g["names"]) for g in groups}
    decayed = {"patch_embed.weight", "head.weight"} | {f"blocks.{i}.1.weight" for i in range(3)}
    exempt = {"patch_embed.bias", "pos_embed", "cls_token", "head.bias"} | {
        f"blocks.{i}.{k}" for i in range(3) for k in ("0.weight", "0.bias", "1.bias")}
    assert by_decay == {0.05: decayed, 0.0: exempt}
    # no_decay=[]: every parameter decays (the AV-CIL code's Adam(model.parameters(), weight_decay=...))
    groups = param_groups(Toy().named_parameters(), train_cfg("train.weight_decay=0.05", "train.no_decay=[]"), 1e-3)
    assert [(g["weight_decay"], len(g["names"])) for g in groups] == [(0.05, len(decayed) + len(exempt))]


def test_an_exempt_parameter_steps_as_without_weight_decay_and_a_decayed_one_does_not():
    """Item 1 of issue 21 (AdamW: a decayed parameter also shrinks by lr x wd, an exempt one does not)."""
    torch.manual_seed(0)
    model = Toy()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    regime = Regime.build(ToyMethod(model), train_cfg("train.optimizer=adamw", "train.weight_decay=0.5",
                                                       "train.lr=0.1"), torch.device("cpu"))
    regime.start_task(1, 1, 0, 1)
    model.head(model.patch_embed(torch.randn(5, 4))).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    regime.step(False)
    for name in ("head.bias", "head.weight"):
        plain = torch.optim.Adam([nn.Parameter(start[name].clone())], lr=0.1)
        plain.param_groups[0]["params"][0].grad = grads[name]
        plain.step()
        without_decay = plain.param_groups[0]["params"][0].detach()
        same = torch.allclose(dict(model.named_parameters())[name].detach(), without_decay)
        assert same == (name == "head.bias"), name


def test_layer_decay_and_lr_multipliers_scale_each_groups_lr():
    cfg = train_cfg("train.layer_decay=0.5", "train.lr_multipliers={head.*: 3.0}")
    lr_of = {n: g["lr"] for g in param_groups(Toy().named_parameters(), cfg, 1.0) for n in g["names"]}
    # MAE's param_groups_lrd with 3 blocks: embeddings 0.5^4, block i 0.5^(3-i), the rest 1 (times 3 for head.*)
    assert lr_of["pos_embed"] == lr_of["cls_token"] == lr_of["patch_embed.weight"] == 0.5 ** 4
    assert [lr_of[f"blocks.{i}.1.weight"] for i in range(3)] == [0.5 ** 3, 0.5 ** 2, 0.5]
    assert lr_of["head.weight"] == lr_of["head.bias"] == 3.0


def lrs_of_a_task(cfg, steps, epochs, task=0, tasks=1):
    regime = Regime.build(ToyMethod(Toy()), cfg, torch.device("cpu"))
    regime.start_task(steps, epochs, task, tasks)
    seen = []
    for _ in range(steps * epochs):
        seen.append(regime.optimizer.param_groups[0]["lr"])
        regime.step(False)
    return seen


def test_warmup_then_cosine_equals_its_closed_form_at_chosen_steps():
    lr, floor, steps, epochs = 0.1, 0.001, 10, 4
    seen = lrs_of_a_task(train_cfg(f"train.lr={lr}", "train.schedule=cosine", "train.warmup_epochs=1",
                                   f"train.min_lr={floor}"), steps, epochs)
    for k in (0, 3, 9, 10, 17, 25, 39):
        p = k / steps
        want = lr * p if p < 1 else floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (p - 1) / (epochs - 1)))
        assert seen[k] == pytest.approx(want, rel=1e-12, abs=1e-15), k
    # warm-up in steps: the same curve when warmup_steps = one epoch of steps
    assert lrs_of_a_task(train_cfg(f"train.lr={lr}", "train.schedule=cosine", "train.warmup_steps=10",
                                   f"train.min_lr={floor}"), steps, epochs) == pytest.approx(seen, rel=1e-12)


def test_step_schedule_and_the_stream_scope():
    seen = lrs_of_a_task(train_cfg("train.lr=1.0", "train.schedule=step", "train.milestones=[1,3]",
                                   "train.gamma=0.1"), 4, 4)
    assert seen == pytest.approx([1.0] * 4 + [0.1] * 8 + [0.01] * 4)
    # over the stream: task 1 of 2 (4 epochs each) runs the second half of the cosine, from 0.5 x lr at its start
    cos = train_cfg("train.lr=1.0", "train.schedule=cosine", "train.schedule_scope=stream")
    second = lrs_of_a_task(cos, 5, 4, task=1, tasks=2)
    assert second[0] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert second[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * (8 - 1 / 5) / 8)))
    per_task = lrs_of_a_task(train_cfg("train.lr=1.0", "train.schedule=cosine"), 5, 4, task=1, tasks=2)
    assert per_task[0] == 1.0  # the task scope starts every task at the top


def run_task(overrides, rows=40):
    """One fit_task of finetune on a fixed synthetic task; the model's parameters after it."""
    cfg = load_config("synthetic", TINY + ["methods=[finetune]", f"data.train_per_class={rows // 2}",
                                           "train.epochs=2"] + overrides)
    torch.manual_seed(0)
    scenario = make_scenario(cfg)
    method = build_method("finetune", cfg, scenario.tasks[0].train)
    torch.manual_seed(1)
    Trainer(cfg.train, torch.device("cpu"), autocast_factory(torch.device("cpu"), None)).fit_task(method,
                                                                                                 scenario.tasks[0])
    return {n: p.detach().clone() for n, p in method.model.named_parameters()}


def test_accumulated_micro_batches_equal_one_batch_that_many_times_larger():
    """40 rows: 8-row micro-batches, 2 per step (the last step of each epoch holds one 8-row micro-batch), equal
    16-row batches: same parameters after 2 epochs of Adam, to 1e-6."""
    big = run_task(["train.batch_size=16", "train.accumulate=1"])
    small = run_task(["train.batch_size=8", "train.accumulate=2"])
    plain = run_task(["train.batch_size=8", "train.accumulate=1"])
    assert max(float((big[n] - small[n]).abs().max()) for n in big) < 1e-6
    assert max(float((big[n] - plain[n]).abs().max()) for n in big) > 1e-4  # the comparison can tell


def test_drop_last_drops_the_partial_batch_unless_it_is_the_only_one():
    from avcl.engine.regime import micro_batches
    assert micro_batches(40, 16, True) == [(0, 16), (16, 32)]
    assert micro_batches(40, 16, False) == [(0, 16), (16, 32), (32, 40)]
    assert micro_batches(10, 16, True) == [(0, 10)]  # never an epoch without a step


def test_gradient_clipping_global_and_per_parameter():
    def step(*overrides):
        a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
        method = ToyMethod(nn.Module())
        method.named_parameters = lambda: [("a", a), ("b", b)]
        regime = Regime.build(method, train_cfg("train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                                                *overrides), torch.device("cpu"))
        regime.start_task(1, 1, 0, 1)
        a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])  # norms 5 and 12, together 13
        regime.step(False)
        return -a.detach(), -b.detach()  # SGD at lr 1: the (clipped) gradient
    a, b = step("train.clip_grad_norm=1.3")
    assert torch.allclose(a, torch.tensor([0.3, 0.4]), atol=1e-6) and torch.allclose(b, torch.tensor([1.2]), atol=1e-6)
    a, b = step("train.clip_grad_per_param=6.0")
    assert torch.allclose(a, torch.tensor([3.0, 4.0])) and torch.allclose(b, torch.tensor([6.0]), atol=1e-5)


def test_fp16_scaler_skips_a_non_finite_step_and_counts_it():
    model = Toy()
    regime = Regime.build(ToyMethod(model), train_cfg("train.precision=fp16"), torch.device("cpu"))
    regime.start_task(2, 1, 0, 1)
    before = model.head.weight.detach().clone()
    regime.backward(model.head(torch.full((1, 4), float("inf"))).sum())
    regime.step(False)
    assert regime.pop_skipped() == 1 and torch.equal(model.head.weight, before)
    assert regime.state_dict()["scaler"]["scale"] == 2.0 ** 16 * 0.5  # torch's initial scale, halved once
    regime.optimizer.zero_grad(set_to_none=True)
    regime.backward(model.head(torch.ones(1, 4)).sum())
    regime.step(False)
    assert regime.pop_skipped() == 0 and not torch.equal(model.head.weight, before)


def test_the_virtual_step_reads_the_scheduled_lr_and_keeps_earlier_micro_batches_grads():
    p = nn.Parameter(torch.ones(2))
    method = ToyMethod(nn.Module())
    method.named_parameters = lambda: [("p", p)]
    regime = Regime.build(method, train_cfg("train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                                            "train.schedule=step", "train.milestones=[1]", "train.gamma=0.25"),
                          torch.device("cpu"))
    regime.start_task(1, 2, 0, 1)
    p.grad = torch.ones(2)
    regime.step(False)  # epoch 1 now: lr 0.25
    p.grad = torch.full((2,), 7.0)  # an earlier micro-batch's gradient
    with virtual_step([p], regime.optimizer) as step:
        p.grad = None  # as MIR's zero_grad(set_to_none=True)
        p.grad = torch.full((2,), 2.0)
        step()
        moved = p.detach().clone()
    assert torch.allclose(moved, torch.full((2,), 0.0 - 0.25 * 2.0))  # 1 - 1 (real step), then - 0.25 x 2
    assert torch.equal(p.grad, torch.full((2,), 7.0)) and torch.equal(p.detach(), torch.zeros(2))


@pytest.mark.parametrize("bad,message", [
    (["train.warmup_epochs=1", "train.warmup_steps=5"], "not both"),
    (["train.schedule=step"], "train.milestones"),
    (["train.optimizer=lamb"], "train.optimizer"),
    (["train.precision=fp8"], "train.precision"),
    (["train.lr_multipliers={avm.*: -1}"], "lr_multipliers.avm"),
    (["train.accumulate=0"], "train.accumulate"),
])
def test_bad_regime_options_are_one_message_naming_the_key(bad, message):
    from avcl.config.validate import validate
    with pytest.raises(AvclError, match=message.replace(".", r"\.").replace("*", r"\*")):
        validate(load_config("synthetic", bad))


def _run(tmp_path, name, extra, env=None):
    args = ["run", "synthetic", "methods=[finetune]", *TINY, "train.epochs=3", "train.batch_size=8",
            "train.schedule=cosine", "train.warmup_epochs=1", "train.precision=fp16", "train.accumulate=2",
            "train.checkpoint_every=2", "--quiet", "--out", str(tmp_path / name), *extra]
    return run_cli(*args, env=env)


def test_a_kill_mid_schedule_resumes_on_the_same_curve_with_the_scaler_state(tmp_path):
    """fp16 + GradScaler, accumulation and a warm-up + cosine schedule: killed inside task 1's second epoch, then
    resumed, the run equals the uninterrupted one (metrics, losses and the lr column of epochs.csv)."""
    assert _run(tmp_path, "whole", []).returncode == 0
    died = _run(tmp_path, "killed", [], env={"AVCL_TEST_STOP": "finetune:1:1:1"})
    assert died.returncode == 3, died.stderr[-2000:]
    state = torch.load(tmp_path / "killed" / "finetune" / "step_checkpoint.pt", weights_only=True)
    assert state["regime"]["scaler"]["scale"] > 0 and state["regime"]["scheduler"]["last_epoch"] > 0
    resumed = run_cli("run", "--resume", str(tmp_path / "killed"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    def result(name):
        m = json.loads((tmp_path / name / "finetune" / "metrics.json").read_text())
        rows = (tmp_path / name / "finetune" / "epochs.csv").read_text().splitlines()
        header = rows[0].split(",")
        keep = [header.index(k) for k in ("task", "epoch", "loss", "lr", "skipped_steps")]
        return ({k: v for k, v in m.items() if "seconds" not in k and "memory" not in k},
                [[r.split(",")[i] for i in keep] for r in rows[1:]])
    whole, killed = result("whole"), result("killed")
    assert killed == whole
    # the lr of each epoch's last step (2 steps an epoch: positions 0.5, 1.5, 2.5 epochs), again in each task
    want = [0.002 * 0.5, *(0.002 * 0.5 * (1 + math.cos(math.pi * (p - 1) / 2)) for p in (1.5, 2.5))]
    for task in "01":
        assert [float(row[3]) for row in whole[1] if row[0] == task] == pytest.approx(want, rel=1e-9)


def test_show_regime_prints_the_groups_with_their_sizes():
    done = run_cli("show", "synthetic", "--regime", *TINY, "methods=[finetune]", "train.weight_decay=0.1")
    assert done.returncode == 0, done.stderr[-2000:]
    groups = [line for line in done.stdout.splitlines() if "group '" in line]
    assert [g.split("'")[1] for g in groups] == ["decay", "no decay"]
    cfg = load_config("synthetic", TINY + ["methods=[finetune]"])
    scenario = make_scenario(cfg)
    model = build_method("finetune", cfg, scenario.tasks[0].train).model
    counted = sum(int(g.split(" tensors, ")[1].split(" values")[0].replace(",", "")) for g in groups)
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert "schedule: constant" in done.stdout and "precision fp32" in done.stdout


def test_pre_training_methods_drop_the_partial_last_batch_by_default_classifiers_keep_it():
    from avcl.engine.regime import drops_last
    label_free, classifier = ToyMethod(Toy()), ToyMethod(Toy())
    label_free.label_free = True
    cfg = train_cfg()
    assert drops_last(cfg, label_free) and not drops_last(cfg, classifier)
    assert not drops_last(train_cfg("train.drop_last=false"), label_free)
    assert drops_last(train_cfg("train.drop_last=true"), classifier)


def test_clipping_applies_only_to_the_named_parameters():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    method = ToyMethod(nn.Module())
    method.named_parameters = lambda: [("student.w", a), ("decoder.w", b)]
    regime = Regime.build(method, train_cfg("train.optimizer=sgd", "train.momentum=0", "train.lr=1.0",
                                            "train.clip_grad_per_param=1.0", "train.clip_grad_params=[student.*]"),
                          torch.device("cpu"))
    regime.start_task(1, 1, 0, 1)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    regime.step(False)
    assert torch.allclose(-a.detach(), torch.tensor([0.6, 0.8]), atol=1e-5)  # clipped to norm 1
    assert torch.equal(-b.detach(), torch.tensor([12.0]))  # the decoder's: untouched
