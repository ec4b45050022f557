"""CLS-ER on a label-free model (the STELLA code's ``models/cl_methods/clser.py``): plastic and stable EMA models.

State: the working model, two frozen EMA copies of it (plastic P, stable S; made from the
model's weights at the first task, i.e. after any init stage) and a global step counter t,
never reset. Per step, once the memory holds rows: draw B_r = ``train.replay_batch_size``
rows; S and P embed them with ``masked_embeddings`` (encoder-only, each with its own random
mask, no grad); for each EMA model G = norm(a) norm(v)^T / temperature (B_r x B_r, the replay
rows only), p_av = row-softmax(G), p_va = row-softmax(G^T); row i's video target is S's video
embedding if p_av^S[i,i] > p_av^P[i,i] else P's, its audio target S's audio embedding if
p_va^S[i,i] > p_va^P[i,i] else P's. One CAV-MAE forward of the working model on
[current; replay]; loss = L + reg_weight * (MSE(z_a[replay], audio target) +
MSE(z_v[replay], video target)), each mean over B_r x D (0 while the memory is empty). Then
the current rows are offered; t <- t + 1; with probability plastic_update_freq
P <- c P + (1 - c) W, c = min(1 - 1/(t+1), plastic_alpha); independently with probability
stable_update_freq the same for S with stable_alpha (two torch CPU-RNG coin flips every step).
As the code, the EMAs are updated inside the step, before this step's backward and optimizer
step (they see the weights of the previous step). The working model is the one evaluated.
EMA weights and t are in ``state_dict``, so a resumed run continues exactly.

Deviations: the EMA copies are made at the first ``before_task`` (the model then holds its
initial weights and sits on the training device), not when the method is built.

Batch size and processes: the matching softmax runs over the global replay batch (B_r rows): under W
processes the EMA embeddings are all-gathered for it (no gradient), so W processes select as one
process. The STELLA code runs it per rank, over the B/R replay rows of its R = 4 GPUs (12 rows, not 48:
an easier match, so higher pair probabilities). ``code_ranks`` = R emulates that: the softmax runs
within R consecutive groups of B_r / R rows (of the global batch, in rank order).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl import parallel
from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import (LabelFreeMethod, draw, group_bounds, inputs_of, joined, prepare_current,
                                     ssl_terms)
from avcl.nn.cl_losses import embedding_mse
from avcl.nn.ema import ema_decay, ema_update


@dataclass
class CLSERHparams(Hparams):
    reg_weight: float = 0.1  # lambda: weight of the consistency MSE towards the EMA embeddings
    plastic_model_update_freq: float = option(0.8, range="[0,1]")  # probability of a plastic EMA update per step
    plastic_model_alpha: float = option(0.999, range="[0,1]")  # plastic EMA decay (after the 1 - 1/(t+1) warm-up)
    stable_model_update_freq: float = option(0.6, range="[0,1]")  # probability of a stable EMA update per step
    stable_model_alpha: float = option(0.999, range="[0,1]")  # stable EMA decay (after the warm-up)
    temperature: float = option(0.05, range=">0")  # of the audio-video matching softmax that selects the target
    # R: the matching softmax within groups of B_r/R replay rows, as the code on R ranks; 1: the global replay batch
    code_ranks: int = option(1, range=">=1")


@register
class CLSER(LabelFreeMethod):
    name = "clser"
    description = "CLS-ER: consistency of replayed rows' embeddings with plastic/stable EMA models (label-free)"
    Hparams = CLSERHparams

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        self.plastic = self.stable = None
        self.global_step = 0

    def before_task(self, task):
        super().before_task(task)
        if self.plastic is None:
            self.plastic, self.stable = self.frozen_copy(), self.frozen_copy()

    def pair_probabilities(self, emb: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of diag row-softmax(G) (audio anchors) and of diag row-softmax(G^T) (video anchors),
        G = a v^T / tau over the global replay rows (gathered under several processes), within each of the
        ``code_ranks`` groups."""
        a, v = F.normalize(emb["audio"].float(), dim=1), F.normalize(emb["video"].float(), dim=1)
        a_all, offset = parallel.all_rows(a)
        v_all, _ = parallel.all_rows(v)
        av, va = [], []
        for start, end in group_bounds(len(a_all), self.hp.code_ranks):
            logits = a_all[start:end] @ v_all[start:end].T / self.hp.temperature
            av.append(logits.softmax(dim=1).diagonal())
            va.append(logits.T.softmax(dim=1).diagonal())
        mine = slice(offset, offset + len(a))
        return torch.cat(av)[mine], torch.cat(va)[mine]

    @torch.no_grad()
    def targets(self, rows: dict) -> dict:
        """Per replayed row, the stable or plastic model's embedding, whichever matches the pair better."""
        stable, plastic = self.stable.masked_embeddings(rows), self.plastic.masked_embeddings(rows)
        av_s, va_s = self.pair_probabilities(stable)
        av_p, va_p = self.pair_probabilities(plastic)
        return {"video": torch.where((av_s > av_p)[:, None], stable["video"], plastic["video"]),
                "audio": torch.where((va_s > va_p)[:, None], stable["audio"], plastic["audio"])}

    def update_emas(self) -> None:
        self.global_step += 1
        with parallel.shared_random():  # several processes: every replica updates its EMAs alike
            update_plastic = float(torch.rand(1)) < self.hp.plastic_model_update_freq
            update_stable = float(torch.rand(1)) < self.hp.stable_model_update_freq
        if update_plastic:
            ema_update(self.plastic, self.model, ema_decay(self.global_step, self.hp.plastic_model_alpha))
        if update_stable:
            ema_update(self.stable, self.model, ema_decay(self.global_step, self.hp.stable_model_alpha))

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        _, replay = draw(self.memory, self.cfg.train.replay_batch_size)
        target = self.targets(inputs_of(replay)) if replay is not None else None  # EMA passes first, as the code
        out = self.model.ssl_loss(joined(x, replay))
        loss = out["loss"]
        self.log_terms(**ssl_terms(out))
        if replay is not None:
            current = len(x["audio"])
            consistency = (embedding_mse(out["z_audio"][current:], target["audio"])
                           + embedding_mse(out["z_video"][current:], target["video"]))
            self.log_terms(consistency=consistency)
            loss = loss + self.hp.reg_weight * consistency
        self.memory.add(x)
        self.update_emas()
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "global_step": self.global_step,
                "plastic": None if self.plastic is None else self.plastic.state_dict(),
                "stable": None if self.stable is None else self.stable.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.global_step = int(state["global_step"])
        if state["plastic"] is not None:
            if self.plastic is None:
                self.plastic, self.stable = self.frozen_copy(), self.frozen_copy()
            self.plastic.load_state_dict(state["plastic"])
            self.stable.load_state_dict(state["stable"])
