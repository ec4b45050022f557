"""Linear probe of a frozen encoder: a small head trained on its features, accuracy on test clips.

The head is FLAVA/STELLA's ``Finetune_head`` classifier on the 2D-wide joint feature (spec A.10):
a Linear + tanh pooler, then Linear(2D, 4D), LayerNorm, GELU, Linear(4D, classes) (the hidden
width 2x the input is ours: the spec names the layers, not their widths). AdamW, linear warm-up then
cosine decay, per step. Deviation: the encoder is frozen, so its features are computed once (no
SpecAugment or noise on the inputs, which the authors' probe applies): the probe is deterministic
and takes seconds. It runs under its own seeded RNG, so it never shifts the training stream's RNG.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from avcl.data.samples import Samples, batches


class ProbeHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.pooler = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.classifier = nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(),
                                        nn.Linear(2 * dim, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(features))


@torch.no_grad()
def embed_all(embed: Callable[[Samples], torch.Tensor], data: Samples, batch_size: int, device,
              autocast) -> torch.Tensor:
    """Features of every row of ``data`` (float32, on ``device``), batched."""
    out = []
    for batch in batches(data, batch_size):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            out.append(embed(batch).float())
    return torch.cat(out)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int, warmup_epochs: int, lr: float, weight_decay: float,
                 batch_size: int, seed: int) -> float:
    """Test accuracy of a ProbeHead trained on (train_x, train_y)."""
    device = train_x.device
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        head = ProbeHead(train_x.shape[1], num_classes).to(device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(train_x) / batch_size)
        total, warmup = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        train_y = train_y.to(device)
        for _ in range(epochs):
            order = torch.randperm(len(train_x), device=device)
            for start in range(0, len(train_x), batch_size):
                pick = order[start:start + batch_size]
                loss = F.cross_entropy(head(train_x[pick]), train_y[pick])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        head.eval()
        with torch.no_grad():
            predicted = torch.cat([head(test_x[s:s + 1024]).argmax(1) for s in range(0, len(test_x), 1024)])
    return float((predicted.cpu() == test_y.cpu()).float().mean())
