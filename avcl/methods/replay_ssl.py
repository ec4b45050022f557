"""Shared step pieces of the label-free (self-supervised) replay baselines
(as the STELLA code's ``models/cl_methods/``, commit a20a5ea).

A step of every replay baseline (ER, DER++, MIR, GMED, CLS-ER, LUMP) on a label-free model:

1. ``x = model.prepare(batch, train=True)``: the current rows' prepared inputs (augmented,
   normalised); these, not the raw clips, are what the reservoir stores (the STELLA code's
   ``utils/buffer.py`` holds the loader's augmented tensors and never re-augments them);
2. draw ``train.replay_batch_size`` stored rows uniformly without replacement (``draw``);
3. one forward of ``model.ssl_loss`` on ``joined(x, replay)`` = [current; replay], so both share
   one mean (as the STELLA code's ``models/cav.py`` loss: no separate replay weight);
4. after that forward, offer the current rows to the reservoir (they cannot be replayed in the
   step that inserts them).

Several processes (W): counts such as ``train.replay_batch_size`` are global; each rank draws its
share from its own reservoir (``draw``), so the ranks together replay as many rows as one process
with the same global batch. The methods whose step has a batch-level search or softmax (MIR's
top-k pool, GMED's input gradient of a batch mean, CLS-ER's matching softmax) run it over the
global batch, as one process does, and offer ``code_ranks`` (``code_groups``): R > 1 runs it per
group of B/R rows instead, as the official code does per rank on R GPUs (R = 4 in the STELLA runs).

The methods that exist only for label-free models subclass ``LabelFreeMethod``.
"""
from __future__ import annotations

from typing import Optional

import torch

from avcl import parallel
from avcl.core.errors import AvclError
from avcl.core.samples import Samples
from avcl.memory.reservoir import ReservoirBuffer
from avcl.methods.base import MemoryUse, Method


INPUTS = ("audio", "video")  # the prepared-input fields of model.prepare / model.ssl_loss


class LabelFreeMethod(Method):
    """A continual self-supervised method: needs a label-free model with the CAV API (model.name=cav)."""
    memory_use = MemoryUse("reservoir", replay="step")

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        if not self.label_free:
            raise AvclError(f"method '{self.name}' is a self-supervised method: it needs a label-free model "
                            f"with the CAV API (model.name=cav), got {type(model).__name__}")


@torch.no_grad()
def prepare_current(model, batch: Samples) -> dict[str, torch.Tensor]:
    """The current batch's prepared inputs (train-time augmentation; no gradient needed)."""
    return model.prepare(batch, True)


def draw(memory: ReservoirBuffer, k: int) -> tuple[torch.Tensor, Optional[Samples]]:
    """``min(k, len(memory))`` stored rows (slots, rows); rows is None while the memory is empty.

    ``k`` is the global replay batch: with several processes each rank draws its share from its own
    reservoir (the STELLA code's ``utils/buffer.py``: the replay mini-batch is the per-GPU batch)."""
    slots, rows = memory.sample(parallel.per_rank(k))
    return slots, (rows if rows and len(slots) else None)


def draw_local(memory: ReservoirBuffer, k: int) -> tuple[torch.Tensor, Optional[Samples]]:
    """``min(k, len(memory))`` stored rows, ``k`` already this rank's count (e.g. one per current row)."""
    slots, rows = memory.sample(k)
    return slots, (rows if rows and len(slots) else None)


def code_groups(code_ranks: int, what: str) -> int:
    """How many groups of rows this rank splits a batch-level computation into, to emulate the official code's
    ``code_ranks`` ranks (each computing it on its own B/R rows): ``code_ranks / W`` in a step cut across W
    processes, 1 when ``code_ranks`` is 1 (the global batch). Refused when W does not divide a ``code_ranks`` > 1."""
    w = parallel.world() if parallel.is_gathering() else 1  # an uncut step: every rank computes the whole batch
    if code_ranks == 1:
        return 1
    if code_ranks % w:
        raise AvclError(f"{what}.code_ranks={code_ranks} must be 1 or a multiple of the {w} processes")
    return code_ranks // w


def group_bounds(count: int, groups: int) -> list[tuple[int, int]]:
    """[start, end) of ``groups`` consecutive near-equal groups of ``count`` rows (the first ones one row larger)."""
    sizes = [count // groups + (g < count % groups) for g in range(groups)]
    starts = [sum(sizes[:g]) for g in range(groups)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def joined(current: dict[str, torch.Tensor], replay: Optional[Samples]) -> dict[str, torch.Tensor]:
    """[current; replay] per input field (the replay rows' other fields, e.g. stored embeddings, are left out)."""
    if replay is None:
        return current
    return {key: torch.cat([value, replay[key].to(value.dtype)]) for key, value in current.items()}


def inputs_of(rows: Samples) -> dict[str, torch.Tensor]:
    return {key: rows[key] for key in INPUTS}


def ssl_terms(out: dict) -> dict[str, torch.Tensor]:
    """The terms of a CAV-MAE ``ssl_loss`` output, for ``Method.log_terms``."""
    return {key: out[key] for key in ("mae_audio", "mae_video", "contrastive") if key in out}


def logged_ssl_loss(method: Method, x: dict, **kwargs) -> dict:
    """``method.model.ssl_loss(x)``, its terms reported to the logs (``Method.log_terms``)."""
    out = method.model.ssl_loss(x, **kwargs)
    method.log_terms(**ssl_terms(out))
    return out
