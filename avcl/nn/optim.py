"""The virtual optimizer step of MIR and GMED (the STELLA code's ``utils/training_ops.py``).

One step of the configured optimizer's rule is applied in place to the parameters, from their
current ``.grad``, reading the optimizer's hyper-parameters (per param group) and its stored
state, which is never written: for Adam, with stored moments ``m, v`` and step count ``k``
(zeros and 0 for a parameter that has no state yet)::

    g  <- g + wd * theta                      (coupled L2, torch.optim.Adam's weight_decay)
    m' =  b1 * m + (1 - b1) * g
    v' =  b2 * v + (1 - b2) * g^2
    theta <- theta - lr * sqrt(1 - b2^(k+1)) / (1 - b1^(k+1)) * m' / (sqrt(v') + eps)

This is the STELLA code's formula: eps is added to ``sqrt(v')`` before the bias correction,
where torch.optim.Adam adds it after (``sqrt(v') / sqrt(1 - b2^(k+1)) + eps``); the two
differ by O(eps) only. AdamW (decoupled decay, ``theta *= 1 - lr * wd``) and SGD (momentum,
dampening, nesterov, coupled decay, the stored momentum buffer read, never written) follow
the same pattern. ``amsgrad`` and ``maximize`` are not supported (the trainer never sets them).

``virtual_step(params, optimizer)`` snapshots the parameters, yields a function that applies
the step, and on exit restores the parameters exactly and their gradients as they were before (the STELLA
code deep-copies the whole state dict; parameters are all a step changes). The step reads each group's current
``lr``, which the schedule (avcl.engine.regime) sets before every real step, and the configured optimizer's rule
(Adam, AdamW, SGD: ``train.optimizer``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch

from avcl.core.errors import AvclError


@torch.no_grad()
def virtual_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Apply one step of ``optimizer``'s rule from the current gradients, leaving its state unchanged."""
    if optimizer is None:
        raise AvclError("the virtual optimizer step needs the training optimizer (method.optimizer is set "
                        "by the trainer before the first step of a task)")
    for group in optimizer.param_groups:
        if group.get("maximize") or group.get("amsgrad"):
            raise AvclError("the virtual optimizer step does not support maximize/amsgrad optimizers")
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass (decoupled decay)
            decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
            _adam(optimizer, group, params, decoupled)
        elif isinstance(optimizer, torch.optim.SGD):
            _sgd(optimizer, group, params)
        else:
            raise AvclError(f"the virtual optimizer step supports Adam, AdamW and SGD, not "
                            f"{type(optimizer).__name__}")


def _adam(optimizer, group, params, decoupled: bool) -> None:
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    for p in params:
        grad = p.grad
        state = optimizer.state.get(p, {})
        step = float(state["step"]) if "step" in state else 0.0
        if wd != 0:
            if decoupled:
                p.mul_(1 - lr * wd)
            else:
                grad = grad.add(p, alpha=wd)
        m = state.get("exp_avg")
        v = state.get("exp_avg_sq")
        m = grad.mul(1 - beta1) if m is None else m.mul(beta1).add_(grad, alpha=1 - beta1)
        v = grad.square().mul_(1 - beta2) if v is None else v.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr * (1 - beta2 ** (step + 1)) ** 0.5 / (1 - beta1 ** (step + 1))
        p.addcdiv_(m, v.sqrt_().add_(eps), value=-step_size)


def _sgd(optimizer, group, params) -> None:
    lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
    wd, nesterov = group["weight_decay"], group["nesterov"]
    for p in params:
        d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
        if momentum != 0:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            buf = d.clone() if buf is None else buf.mul(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)


@contextlib.contextmanager
def virtual_step(params: Iterable[torch.nn.Parameter],
                 optimizer: torch.optim.Optimizer) -> Iterator[Callable[[], None]]:
    """Snapshot ``params`` and their grads; yield ``step()`` (one virtual optimizer step from the current grads,
    e.g. those computed inside after a ``zero_grad``); on exit restore the parameters exactly and the grads as they
    were on entry (those of the earlier micro-batches of an accumulated step, ``train.accumulate``; usually None)."""
    params = list(params)
    saved = [(p, p.detach().clone()) for p in params if p.requires_grad]
    grads = [p.grad for p in params]
    try:
        yield lambda: virtual_optimizer_step(optimizer)
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        for p, grad in zip(params, grads):
            p.grad = grad
