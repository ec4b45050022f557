"""Linear probe of a frozen encoder: a small head trained on its features, accuracy on test clips.

The head is FLAVA/STELLA's ``Finetune_head`` classifier on the 2D-wide joint feature (their code):
a Linear + tanh pooler, then Linear(2D, 4D), LayerNorm, GELU, Linear(4D, classes) (the hidden
width 2x the input is ours: our notes on their code name the layers, not their widths). AdamW, linear warm-up then
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

from avcl import parallel
from avcl.core.samples import Samples, to_device


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
    def features(batch: Samples) -> torch.Tensor:
        with autocast():
            return embed(to_device(batch, device)).float()
    return parallel.eval_pass(features, data, batch_size)  # several processes: sharded


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


# ----- linear probes of frozen per-modality features (XKD's linear protocol, codes/eval/) ------------
PROBE_SETS = {"video": ("video",), "audio": ("audio",), "av": ("audio", "video")}


@torch.no_grad()
def modality_features(model, data: Samples, batch_size: int, device, autocast) -> dict[str, torch.Tensor]:
    """Per-modality frozen features of every row (``model.embed``'s "audio" / "video", and "features"),
    float32 on the CPU, in eval mode."""
    model.eval()
    def features(batch: Samples) -> dict[str, torch.Tensor]:
        with autocast():
            emb = model.embed(to_device(batch, device))
        return {key: emb[key].float().cpu() for key in ("audio", "video", "features") if key in emb}
    return parallel.eval_pass(features, data, batch_size)  # several processes: sharded


def _fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                classifier: str = "logistic", c: float = 1.0, seed: int = 0) -> float:
    """A linear classifier (scikit-learn: standardised features, then LogisticRegression or LinearSVC with
    inverse regularisation ``c``) fitted on the train rows: top-1 accuracy on the test rows, or, for
    multi-label targets ((N, C) 0/1), the macro mean average precision (one-vs-rest)."""
    # scikit-learn takes about 2 s to import: only the runs that fit a linear probe pay for it
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import average_precision_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "svm":
        linear = LinearSVC(C=c, max_iter=5000, random_state=seed)
    elif classifier == "logistic":
        linear = LogisticRegression(C=c, tol=1e-6, max_iter=5000, random_state=seed)  # tight: row order-free
    else:
        raise ValueError(f"classifier must be 'logistic' or 'svm', got {classifier!r}")
    xtr, xte = train_x.double().numpy(), test_x.double().numpy()
    ytr, yte = train_y.cpu().numpy(), test_y.cpu().numpy()
    if ytr.ndim == 2:  # multi-label
        model = make_pipeline(StandardScaler(), OneVsRestClassifier(linear)).fit(xtr, ytr)
        scores = model.decision_function(xte)
        present = yte.sum(axis=0) > 0  # classes without a positive test row have no AP
        return float(average_precision_score(yte[:, present], scores[:, present], average="macro"))
    model = make_pipeline(StandardScaler(), linear).fit(xtr, ytr)
    return float((model.predict(xte) == yte).mean())


def fit_linear(*args, **kwargs) -> float:
    """``_fit_linear`` with BLAS on one thread: next to torch's OpenMP workers, multi-threaded BLAS in these
    small solves was 15x slower on a 2-core machine (2.3 s instead of 36 s for a 2430 x 192 problem)."""
    from threadpoolctl import threadpool_limits  # scikit-learn's own dependency, loaded with it (above)
    with threadpool_limits(1, user_api="blas"):
        return _fit_linear(*args, **kwargs)


def linear_probes(model, train: Samples, test: Samples, batch_size: int, device, autocast,
                  classifier: str = "logistic", c: float = 1.0, seed: int = 0) -> dict[str, float]:
    """XKD's linear protocol on frozen features: a linear classifier on the video features alone, on the
    audio features alone, and on both (each L2-normalised, concatenated): ``probe_video_accuracy``,
    ``probe_audio_accuracy``, ``probe_av_accuracy`` (``..._map`` for multi-label labels). A model whose
    ``embed`` has no per-modality features (only "features") gets ``probe_av_*`` on those."""
    feats = {split: modality_features(model, rows, batch_size, device, autocast)
             for split, rows in (("train", train), ("test", test))}
    labels = {"train": train["label"], "test": test["label"]}
    metric = "map" if labels["train"].dim() == 2 else "accuracy"
    results = {}
    for name, keys in PROBE_SETS.items():
        if all(k in feats["train"] for k in keys):
            x = {s: torch.cat([F.normalize(feats[s][k], dim=1) for k in keys], dim=1) for s in feats}
        elif name == "av" and "features" in feats["train"]:
            x = {s: feats[s]["features"] for s in feats}
        else:
            continue
        results[f"probe_{name}_{metric}"] = fit_linear(x["train"], labels["train"], x["test"], labels["test"],
                                                        classifier, c, seed)
    return results
