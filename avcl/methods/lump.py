"""LUMP on a label-free model (the STELLA code's ``models/cl_methods/lump.py``): mixup of current and stored clips.

Per step, once the memory holds rows: draw as many stored rows as the batch has (row i of the
draw is paired with current row i), one lambda ~ Beta(mixup_alpha, mixup_alpha) for the whole
step, mix audio and video with the same lambda, and take the CAV-MAE loss of the mixed batch
only (no clean term, no concatenation). The clean current rows are then offered to the
reservoir. While the memory is empty the loss is that of the current batch.

Several processes: each rank mixes every row of its slice with a row of its own reservoir (before this
was fixed it drew 1/W as many rows as its slice has, so only 1/W of its rows were mixed), and
lambda comes from the shared stream, so the W ranks mix with one lambda, as one process does with the
global batch (the STELLA code: each rank its own unseeded numpy lambda).

Deviations: lambda is drawn from torch's (seeded, checkpointed) RNG, not numpy's unseeded one.
The draw size is the current batch's size (the STELLA code draws ``replay_batch_size`` = B
rows, which is the same there); if the memory holds fewer rows than the batch (only possible
when memory.size < batch size), the first rows are mixed and the rest stay clean.
"""
from dataclasses import dataclass

import torch

from avcl import parallel
from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import LabelFreeMethod, draw_local, logged_ssl_loss, prepare_current


@dataclass
class LUMPHparams(Hparams):
    mixup_alpha: float = option(0.5, range=">0")  # Beta(mixup_alpha, mixup_alpha) mixing weight of the current clip


@register
class LUMP(LabelFreeMethod):
    name = "lump"
    description = "LUMP: CAV-MAE loss on mixups of current and buffered clips (label-free)"
    Hparams = LUMPHparams

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        concentration = torch.tensor(float(hparams.mixup_alpha))
        self.beta = torch.distributions.Beta(concentration, concentration)

    def mix(self, x, replay):
        """The step's mixed inputs: lam * current + (1 - lam) * replay on the first len(replay) rows."""
        with parallel.shared_random():  # several processes: one lambda for the global batch
            lam = float(self.beta.sample())
        k = len(replay["audio"])
        mixed = {}
        for key, value in x.items():
            part = lam * value[:k] + (1 - lam) * replay[key].to(value.dtype)
            mixed[key] = part if k == len(value) else torch.cat([part, value[k:]])
        return mixed

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        _, replay = draw_local(self.memory, len(x["audio"]))  # one per row of this rank's slice
        loss = logged_ssl_loss(self, x if replay is None else self.mix(x, replay))["loss"]
        self.memory.add(x)
        return loss
