"""MIR on a label-free model (the STELLA code's ``models/cl_methods/mir.py``): replay the most interfered rows.

Per step, once the memory holds rows: draw C = min(search_factor * B_r, len) candidates
(B_r = ``train.replay_batch_size``); score each by its per-row CAV-MAE loss (``reduction="none"``)
before and after a virtual optimizer step on the current batch alone (``avcl.nn.optim``: the
real optimizer's rule, lr, betas, weight decay and stored moments, state not written), keep
the B_r candidates with the largest increase (all when C <= B_r), restore the weights and drop
the grads, then run the ER step on [current; kept] and offer the current rows.

Deviations: none from the STELLA code beyond ER's. The virtual step's gradient is not
loss-scaled in either (bf16 autocast here needs no scaler). The pre and post scores use
different random masks, as in the code. When C <= B_r every candidate is kept, so the scoring
(two forwards and the virtual step) is skipped: same replay rows, fewer random draws.
"""
from dataclasses import dataclass

import torch

from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import LabelFreeMethod, draw, joined, logged_ssl_loss, prepare_current
from avcl.nn.optim import virtual_step


@dataclass
class MIRHparams(Hparams):
    search_factor: int = option(5, range=">=1")  # candidates drawn per replayed row


@register
class MIR(LabelFreeMethod):
    name = "mir"
    description = "MIR: replay the stored rows whose loss a virtual step on the current batch raises most (label-free)"
    Hparams = MIRHparams

    def interference(self, x, candidates) -> torch.Tensor:
        """Per-candidate loss increase caused by one virtual optimizer step on ``x``."""
        model = self.model
        with torch.no_grad():
            before = model.ssl_loss(candidates, reduction="none")["loss"]
        with virtual_step(model.parameters(), self.optimizer) as step:
            model.zero_grad(set_to_none=True)
            model.ssl_loss(x)["loss"].backward()
            step()
            with torch.no_grad():
                after = model.ssl_loss(candidates, reduction="none")["loss"]
        return (after - before).float()

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        keep_count = self.cfg.train.replay_batch_size
        _, candidates = draw(self.memory, self.hp.search_factor * keep_count)
        replay = None
        if candidates is not None:
            candidates = {key: candidates[key] for key in x}
            if len(candidates["audio"]) > keep_count:
                top = self.interference(x, candidates).topk(keep_count).indices
                replay = {key: value[top] for key, value in candidates.items()}
            else:
                replay = candidates
        loss = logged_ssl_loss(self, joined(x, replay))["loss"]
        self.memory.add(x)
        return loss
