"""MIR on a label-free model (the STELLA code's ``models/cl_methods/mir.py``): replay the most interfered rows.

Per step, once the memory holds rows: draw C = min(search_factor * B_r, len) candidates
(B_r = ``train.replay_batch_size``); score each by its per-row CAV-MAE loss (``reduction="none"``)
before and after a virtual optimizer step on the current batch alone (``avcl.nn.optim``: the
real optimizer's rule, lr, betas, weight decay and stored moments, state not written), keep
the B_r candidates with the largest increase (all when C <= B_r), restore the weights and drop
the grads, then run the ER step on [current; kept] and offer the current rows.

Deviations: beyond ER's, the global virtual gradient under several processes (below). The virtual step's gradient is not
loss-scaled in either (bf16 autocast here needs no scaler). The pre and post scores use
different random masks, as in the code. When C <= B_r every candidate is kept, so the scoring
(two forwards and the virtual step) is skipped: same replay rows, fewer random draws.

Several processes (W) and the official 4-rank runs: B_r and C are global counts; each rank draws
C / W candidates from its own reservoir and keeps B_r / W of them (before this was fixed each rank
kept B_r of its C / W, i.e. 48 of 60 on 4 GPUs: almost no selection). The virtual step's gradient is
the global current batch's (all-reduced under W processes; the STELLA code's is rank-local, over its
B/R rows: a deviation). The top-k pool is where one process differs from the code's R = 4 ranks: one
process keeps the top 48 of 240 candidates, the code the top 12 of each rank's 60.
``code_ranks`` = R emulates that: the candidates are cut into R consecutive pools and the top B_r / R
of each are kept. Pools never span processes (that would move candidate clips between ranks), so
under W processes there are max(R, W) pools, W dividing R: W processes equal one process with
``code_ranks`` = max(R, W).
"""
from dataclasses import dataclass

import torch

from avcl import parallel
from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams
from avcl.methods.replay_ssl import (LabelFreeMethod, code_groups, draw, group_bounds, joined, logged_ssl_loss,
                                     prepare_current)
from avcl.nn.optim import virtual_step


@dataclass
class MIRHparams(Hparams):
    search_factor: int = option(5, range=">=1")  # candidates drawn per replayed row
    # R: the top-k runs in R pools (top B_r/R of each C/R), as the code on R ranks; 1: one pool of the global batch
    code_ranks: int = option(1, range=">=1")


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
            if parallel.is_gathering():  # the global current batch's gradient, as one process
                parallel.average_gradients(self.optimizer)
            step()
            with torch.no_grad():
                after = model.ssl_loss(candidates, reduction="none")["loss"]
        return (after - before).float()

    def select(self, scores: torch.Tensor, keep_count: int) -> torch.Tensor:
        """Indices of the kept candidates: the top of each pool (``code_ranks``), pools in order."""
        pools = max(1, code_groups(self.hp.code_ranks, "mir"))
        kept = []
        for (start, end), (keep_start, keep_end) in zip(group_bounds(len(scores), pools),
                                                        group_bounds(keep_count, pools)):
            kept.append(start + scores[start:end].topk(min(keep_end - keep_start, end - start)).indices)
        return torch.cat(kept)

    def training_loss(self, batch):
        x = prepare_current(self.model, batch)
        replay_count = self.cfg.train.replay_batch_size  # global; this rank keeps its share
        keep_count = parallel.per_rank(replay_count)
        _, candidates = draw(self.memory, self.hp.search_factor * replay_count)
        replay = None
        if candidates is not None:
            candidates = {key: candidates[key] for key in x}
            if len(candidates["audio"]) > keep_count:
                kept = self.select(self.interference(x, candidates), keep_count)
                replay = {key: value[kept] for key, value in candidates.items()}
            else:
                replay = candidates
        loss = logged_ssl_loss(self, joined(x, replay))["loss"]
        self.memory.add(x)
        return loss
