"""GMED on a label-free model (the STELLA code's ``models/cl_methods/gmed.py``): edit replayed rows before replaying them.

Per step, once the memory holds rows: draw B_r = ``train.replay_batch_size`` stored rows X_m
(prepared audio and video). With X_m as leaves that require grad:

1. g1 = dL(X_m)/dX_m at the current weights (mean-reduced CAV-MAE loss, all three terms);
2. a virtual optimizer step on the current batch alone (``avcl.nn.optim``, as MIR);
3. g2 = dL(X_m)/dX_m at the stepped weights;
4. X_m <- X_m + grad_stride * factor * (g2 - (1 - reg_strength) * g1), i.e. the code's
   (g2 - g1) + reg_strength * g1, in the normalised input space of both modalities; the
   edited rows are written back to their slots (not a new presentation);
5. weights restored exactly, grads dropped; then the ER step on [current; edited X_m], and the
   current rows are offered to the reservoir.

The edit-decay oddity: ``factor = (1 - edit_decay) ** age``. Official GMED increments a slot's
age at every edit (default decay 0); the STELLA code has an age array that nothing ever
increments, so age stays 0, factor is 1 and ``edit_decay`` (1.0 there) has no effect. We
reproduce that by default (``count_edits: false``: no age is stored, factor 1). With
``count_edits: true`` each slot carries its edit count (reset when the reservoir replaces
the row) and the factor applies, as official GMED does; with edit_decay 1.0 that freezes
every row after its first edit, so lower edit_decay when turning it on.

Deviations: the STELLA code obtains the regulariser gradient (-g1) through two extra input-
gradient backward passes on the pre graph plus a full backward; here g1 comes from one input-
gradient pass (identical values, 3 backward traversals per step instead of 5). The sign of the
reg_strength term is the official GMED code's (the paper's objective may have the opposite).

Batch size and processes: the input gradients are those of a loss *mean* over the drawn rows, so each
row's edit scales as 1/B_r. Here B_r is the global replay batch (one process, or W processes: each
rank's gradient is rescaled by 1/W and the virtual step's gradient is all-reduced, so W processes edit
as one process); the STELLA code computes both per rank, over B/R rows on R = 4 GPUs, so its edits are
R times larger (for the MAE terms exactly; its contrastive gradient too, as far as the mean goes), and
its virtual step sees B/R current rows. ``code_ranks`` = R multiplies the input gradients by R, the
code's per-rank edit size on one process (the virtual step stays the global batch's).
"""
from dataclasses import dataclass

import torch

from avcl import parallel
from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import INPUTS, LabelFreeMethod, draw, joined, logged_ssl_loss, prepare_current
from avcl.nn.optim import virtual_step


@dataclass
class GMEDHparams(Hparams):
    grad_stride: float = 0.1  # alpha: step size of the edit
    reg_strength: float = 0.05  # beta: weight of the pre-update loss gradient in the direction
    edit_decay: float = option(1.0, range="[0,1]")  # gamma: edits scaled by (1 - gamma) ** age
    count_edits: bool = False  # false: age stays 0 (STELLA's code); true: age = edits of the slot (GMED's)
    # R: input gradients of a mean over B_r/R rows (R x larger edits), as the code on R ranks; 1: the global batch
    code_ranks: int = option(1, range=">=1")


@register
class GMED(LabelFreeMethod):
    name = "gmed"
    description = "GMED: replayed rows edited towards higher interference and written back (label-free)"
    Hparams = GMEDHparams

    def input_grads(self, rows: dict) -> list[torch.Tensor]:
        return list(torch.autograd.grad(self.model.ssl_loss(rows)["loss"], [rows[k] for k in INPUTS]))

    def edit(self, x, stored) -> dict:
        """The edited inputs of the drawn rows (detached), given the current prepared batch ``x``."""
        model = self.model
        rows = {key: stored[key].detach().clone().requires_grad_(True) for key in INPUTS}
        g1 = self.input_grads(rows)
        with virtual_step(model.parameters(), self.optimizer) as step:
            model.zero_grad(set_to_none=True)
            model.ssl_loss(x)["loss"].backward()
            if parallel.is_gathering():  # the global current batch's gradient, as one process
                parallel.average_gradients(self.optimizer)
            step()
            g2 = self.input_grads(rows)
        # W processes: each rank's gradient is W x the global mean's (its mean over B_r / W rows; the gathered
        # contrastive rows' gradients are summed over the ranks), so 1/W gives one process's edit; R emulates
        # the code's mean over B_r / R rows
        ranks = parallel.world() if parallel.is_gathering() else 1
        stride = self.hp.grad_stride * self.hp.code_ranks / ranks
        scale = torch.full((len(rows["audio"]),), stride, device=rows["audio"].device)
        if self.hp.count_edits:
            scale = scale * (1 - self.hp.edit_decay) ** stored["edits"].to(scale.dtype)
        edited = {}
        for key, pre, post in zip(INPUTS, g1, g2):
            direction = post - (1 - self.hp.reg_strength) * pre
            factor = scale.view(-1, *([1] * (direction.dim() - 1))).to(direction.dtype)
            edited[key] = (rows[key] + factor * direction).detach()
        return edited

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        slots, stored = draw(self.memory, self.cfg.train.replay_batch_size)
        replay = None
        if stored is not None:
            replay = self.edit(x, stored)
            written = dict(replay)
            if self.hp.count_edits:
                written["edits"] = stored["edits"] + 1
            self.memory.write(slots, written)
        loss = logged_ssl_loss(self, joined(x, replay))["loss"]
        fresh = dict(x)
        if self.hp.count_edits:
            fresh["edits"] = torch.zeros(len(x["audio"]), dtype=torch.long, device=x["audio"].device)
        self.memory.add(fresh)
        return loss
