"""Linear probe of a frozen encoder: a small head trained on its features, accuracy on test clips.

The head is FLAVA/STELLA's ``Finetune_head`` classifier on the 2D-wide joint feature (their code):
a Linear + tanh pooler, then Linear(2D, 4D), LayerNorm, GELU, Linear(4D, classes) (the hidden
width 2x the input is ours: our notes on their code name the layers, not their widths). AdamW, linear warm-up then
cosine decay, per step. Deviation: the encoder is frozen, so its features are computed once (no
SpecAugment or noise on the inputs, which the authors' probe applies): the probe is deterministic
and takes seconds. It runs under its own seeded RNG, so it never shifts the training stream's RNG.

Below: linear probes of frozen per-modality features (``linear_probes``, ``eval.protocol=probe`` and ``avcl
probe``) in two protocols, ``eval.probe_protocol``: avcl's (one feature per clip, standardised, logistic or SVM
with a fixed C) and the official one, XKD's linear SVM (``codes/eval/engine/{video,audio,audio_video}/*_svm.py``,
``codes/eval/configs/svm/*``). Deviations of the official one from that code: C is chosen on a validation split
of the train clips and the SVM refitted on all of them (the code reports the best C on the test split); the
code's several clips per video (random train clips, evenly spaced test clips) become augmented views of avcl's
one clip per video (test: the clip itself plus augmented views), the augmentations being avcl's batched ports
(``avcl.models.xkd``) of the code's, with no temporal crop; the volume jitter is an offset ``audio_power`` ln g in
the data's own units (exact for an unnormalised log-power fbank; a per-bin standardised fbank such as
AV-Digits' would need it divided by each bin's std, which the probe does not know); LinearSVC's
``ConvergenceWarning`` is silenced. STELLA_code's probe is the trained head above (``Finetune_head`` with the
encoder frozen, ``commands/cav_finetune_*.sh``), not an SVM.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avcl import parallel
from avcl.core.errors import AvclError
from avcl.core.samples import Samples, to_device
from avcl.nn.augment import color_jitter, grayscale, random_resized_crop


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
                  classifier: str = "logistic", c: float = 1.0, seed: int = 0, protocol: str = "avcl",
                  official: OfficialProbe | None = None) -> dict:
    """XKD's linear protocol on frozen features: a linear classifier on the video features alone, on the
    audio features alone, and on both (each L2-normalised, concatenated): ``probe_video_accuracy``,
    ``probe_audio_accuracy``, ``probe_av_accuracy`` (``..._map`` for multi-label labels). A model whose
    ``embed`` has no per-modality features (only "features") gets ``probe_av_*`` on those. ``probe_protocol``
    names the protocol the numbers come from:

    * ``avcl``: one feature per clip, standardised, ``classifier`` (logistic | svm) with the given ``c``.
    * ``official``: XKD's SVM protocol (``codes/eval/engine/{video,audio,audio_video}/*_svm.py``, configs
      ``codes/eval/configs/svm/*``), settings ``official``: every feature L2-normalised (the code's
      ``apply_l2`` / its wrappers' L2 norm), not standardised (``scale_features: false``); a LinearSVC on
      ``train_views`` augmented views of every train clip (``augment_clips``; the code: that many random
      clips of each train video, each augmented), C chosen among ``costs`` by the accuracy on a validation
      split of the train clips, then refitted on all of them (the code: the best C on the test split); test
      scores averaged over ``test_clips`` views of each test clip (the code: that many clips of each test
      video, unaugmented; avcl's datasets hold one clip per video, so view 0 is the clip, the others
      augmented views of it). Also ``probe_<set>_c`` (the C chosen), ``probe_<set>_val_<metric>``,
      ``probe_train_views`` and ``probe_test_clips`` (the views used: 1 for data that can't be augmented)."""
    if protocol not in PROTOCOLS:
        raise AvclError(f"probe protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "official":
        if official is None:
            raise AvclError("the official probe protocol needs its settings (OfficialProbe)")
        feats = {"train": view_features(model, train, batch_size, device, autocast, official.train_views, False,
                                        official, 2 * seed),
                 "test": view_features(model, test, batch_size, device, autocast, official.test_clips, True,
                                       official, 2 * seed + 1)}
    else:
        feats = {split: modality_features(model, rows, batch_size, device, autocast)
                 for split, rows in (("train", train), ("test", test))}
    labels = {"train": train["label"], "test": test["label"]}
    metric = "map" if labels["train"].dim() == 2 else "accuracy"
    results: dict = {"probe_protocol": protocol}
    for name, keys in PROBE_SETS.items():
        if all(k in feats["train"] for k in keys):
            x = {s: torch.cat([F.normalize(feats[s][k], dim=-1) for k in keys], dim=-1) for s in feats}
        elif name == "av" and "features" in feats["train"]:
            x = {s: feats[s]["features"] for s in feats}
            if protocol == "official":
                x = {s: F.normalize(v, dim=-1) for s, v in x.items()}
        else:
            continue
        if protocol == "official":
            from threadpoolctl import threadpool_limits  # as fit_linear: single-threaded BLAS beside torch
            with threadpool_limits(1, user_api="blas"):
                out = official_probe(x["train"], labels["train"], x["test"], labels["test"], official, seed)
            results.update({f"probe_{name}_{metric}": out["metric"], f"probe_{name}_c": out["c"],
                            f"probe_{name}_val_{metric}": out["val"]})
        else:
            results[f"probe_{name}_{metric}"] = fit_linear(x["train"], labels["train"], x["test"], labels["test"],
                                                            classifier, c, seed)
    if protocol == "official":
        results["probe_train_views"] = feats["train"][next(iter(feats["train"]))].shape[1]
        results["probe_test_clips"] = feats["test"][next(iter(feats["test"]))].shape[1]
    return results


# ----- the official linear protocol (XKD's codes/eval/engine/*/..._svm.py) ----------------------------
PROTOCOLS = ("avcl", "official")


@dataclass(frozen=True)
class OfficialProbe:
    """The settings of ``eval.probe_protocol=official`` (EvalConfig's ``probe_*`` fields, which hold the defaults
    and say where each number comes from)."""
    costs: tuple[float, ...]
    max_iter: int
    val_fraction: float
    train_views: int
    test_clips: int
    crop_scale: tuple[float, float]
    flip: float
    color_jitter: tuple[float, ...]
    gray: float
    volume_jitter: float
    audio_power: float

    @classmethod
    def from_eval(cls, ev) -> "OfficialProbe":
        return cls(costs=tuple(float(c) for c in ev.probe_svm_costs), max_iter=int(ev.probe_svm_iter),
                   val_fraction=float(ev.probe_val_fraction), train_views=int(ev.probe_train_views),
                   test_clips=int(ev.probe_test_clips), crop_scale=tuple(float(s) for s in ev.probe_crop_scale),
                   flip=float(ev.probe_flip), color_jitter=tuple(float(s) for s in ev.probe_color_jitter),
                   gray=float(ev.probe_gray), volume_jitter=float(ev.probe_volume_jitter),
                   audio_power=float(ev.probe_audio_power))


def augmentable(data: Samples) -> bool:
    """True when ``data`` holds raw inputs the probe's augmentation can vary: uint8 frames (N, T, H, W[, 3])
    and/or an fbank (N, frames, mel) (feature stores hold fixed vectors: one view is all there is)."""
    video, audio = data.get("video"), data.get("audio")
    return ((video is not None and video.dtype == torch.uint8 and video.dim() in (4, 5))
            or (audio is not None and audio.dtype.is_floating_point and audio.dim() == 3))


def augment_clips(batch: Samples, opts: OfficialProbe) -> Samples:
    """XKD's SVM train-mode augmentation (``configs/svm/*``: ``vid_aug_kwargs`` / ``aud_aug_kwargs``) on raw
    rows, one draw per clip from the global torch RNG: frames get a random resized crop (area ``crop_scale``,
    back to the frame size) with a horizontal flip, colour jitter and grey-scale (the code's MSC-HF-CJ-GS; blur
    and cutout are off there), the fbank a volume jitter g ~ U(1 -/+ volume_jitter) on the wave, i.e. an offset
    ``audio_power`` ln g on the log-mel (the code's VolJitter; its masks and time warp are off there). Other
    fields are left as they are."""
    out = dict(batch)
    video, audio = batch.get("video"), batch.get("audio")
    if video is not None and video.dtype == torch.uint8 and video.dim() in (4, 5):
        rgb = video.dim() == 5
        frames = (video.permute(0, 1, 4, 2, 3) if rgb else video.unsqueeze(2)).float().div_(255.0)
        frames = random_resized_crop(frames, tuple(frames.shape[-2:]), opts.crop_scale, opts.flip)
        frames = color_jitter(frames, opts.color_jitter)
        if opts.gray > 0 and rgb:
            pick = (torch.rand(frames.shape[0], device=frames.device) < opts.gray).view(-1, 1, 1, 1, 1)
            frames = torch.where(pick, grayscale(frames).expand_as(frames), frames)
        frames = frames.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        out["video"] = frames.permute(0, 1, 3, 4, 2).contiguous() if rgb else frames[:, :, 0]
    if audio is not None and audio.dtype.is_floating_point and audio.dim() == 3 and opts.volume_jitter > 0:
        gain = 1 + (torch.rand(audio.shape[0], 1, 1, device=audio.device) * 2 - 1) * opts.volume_jitter
        out["audio"] = (audio.float() + opts.audio_power * gain.log()).to(audio.dtype)
    return out


@torch.no_grad()
def view_features(model, data: Samples, batch_size: int, device, autocast, views: int, plain_first: bool,
                  opts: OfficialProbe, seed: int) -> dict[str, torch.Tensor]:
    """``modality_features`` of ``views`` views of every row: {key: (N, views, D)}. View v of a batch is drawn under
    torch seed (seed, v, the batch's first row), so it does not depend on the processes or the rest of the
    data; ``plain_first``: view 0 is the clip itself (no augmentation). Data ``augmentable`` can't vary
    (a feature store) gets one view."""
    views = views if augmentable(data) else 1
    rows = torch.arange(len(next(iter(data.values()))))
    per_view = []
    model.eval()
    for v in range(views):
        if v == 0 and plain_first:
            per_view.append(modality_features(model, data, batch_size, device, autocast))
            continue

        def features(batch: Samples, v=v) -> dict[str, torch.Tensor]:
            first = int(batch.pop("_probe_row")[0])
            batch = to_device(batch, device)
            with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
                torch.manual_seed((seed * 1_000_003 + v) * 1_000_003 + first)
                batch = augment_clips(batch, opts)
            with autocast():
                emb = model.embed(batch)
            return {key: emb[key].float().cpu() for key in ("audio", "video", "features") if key in emb}
        per_view.append(parallel.eval_pass(features, {**data, "_probe_row": rows}, batch_size))
    return {key: torch.stack([f[key] for f in per_view], dim=1) for key in per_view[0]}


def _decision_scores(classifier, x) -> "np.ndarray":
    """(N, classes) decision scores (scikit-learn gives one column for two classes: s -> [-s, s])."""
    scores = classifier.decision_function(x)
    return np.stack([-scores, scores], axis=1) if scores.ndim == 1 else scores


def clip_scores(classifier, clips: "np.ndarray") -> "np.ndarray":
    """The code's dense test: decision scores of every view of every clip (N, V, D), averaged over the views."""
    n, v, d = clips.shape
    return _decision_scores(classifier, clips.reshape(n * v, d)).reshape(n, v, -1).mean(axis=1)


def score_metric(scores: "np.ndarray", labels: "np.ndarray") -> float:
    """Top-1 accuracy of (N, C) scores against class ids (N,), or the macro mAP against 0/1 targets (N, C)."""
    if labels.ndim == 2:
        from sklearn.metrics import average_precision_score  # scikit-learn: slow to import, probes only
        present = labels.sum(axis=0) > 0  # classes without a positive row have no AP
        return float(average_precision_score(labels[:, present], scores[:, present], average="macro"))
    return float((scores.argmax(axis=1) == labels).mean())


def fit_svm(views: "np.ndarray", labels: "np.ndarray", c: float, max_iter: int, seed: int):
    """XKD's classifier: ``LinearSVC(C=c, max_iter)`` on every view of every clip (N, V, D) as its own row with
    the clip's label, on the features as they are (``scale_features: false``); one-vs-rest for 0/1 targets."""
    from sklearn.exceptions import ConvergenceWarning  # scikit-learn: slow to import, probes only
    from sklearn.multiclass import OneVsRestClassifier  # (as above)
    from sklearn.svm import LinearSVC  # (as above)

    n, v, d = views.shape
    x = views.reshape(n * v, d)
    y = np.repeat(labels, v, axis=0)
    svm = LinearSVC(C=c, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():  # the code's 1000 iterations often stop short of tolerance: as there
        warnings.simplefilter("ignore", ConvergenceWarning)
        return (OneVsRestClassifier(svm) if y.ndim == 2 else svm).fit(x, y)


def validation_split(labels: "np.ndarray", fraction: float, seed: int) -> "np.ndarray":
    """A boolean mask of the train clips held out to choose C: ``fraction`` of each class's clips (rounded, at
    least one clip of every class left to train on), drawn with ``seed``; for 0/1 targets, of all clips."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    groups = [np.arange(len(labels))] if labels.ndim == 2 else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for rows in groups:
        k = min(int(round(fraction * len(rows))), len(rows) - 1)
        held[rng.permutation(rows)[:k]] = True
    return held


def select_cost(train: "np.ndarray", train_y: "np.ndarray", val: "np.ndarray", val_y: "np.ndarray",
                costs, max_iter: int, seed: int) -> tuple[float, list[float]]:
    """The C of ``costs`` whose SVM, fitted on the ``train`` clips' views, scores best on the ``val`` clips
    (view-averaged scores), and every C's validation score. Ties go to the later C, as the code's ``>=``."""
    scores = [score_metric(clip_scores(fit_svm(train, train_y, c, max_iter, seed), val), val_y) for c in costs]
    best = max(range(len(costs)), key=lambda i: (scores[i], i))
    return float(costs[best]), scores


def official_probe(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                   opts: OfficialProbe, seed: int) -> dict[str, float]:
    """XKD's SVM protocol on view features (train (N, V, D), test (M, W, D)): C chosen on a validation split of
    the train clips (``validation_split``, ``select_cost``; the code picks the best C on the test clips), then a
    LinearSVC with that C on all train clips' views, its decision scores averaged over each test clip's views.
    {"metric": test score, "c": the C, "val": its validation score}."""
    xtr, xte = train.double().numpy(), test.double().numpy()
    ytr, yte = train_y.cpu().numpy(), test_y.cpu().numpy()
    costs = list(opts.costs)
    if len(costs) == 1:
        c, val = costs[0], None
    else:
        held = validation_split(ytr, opts.val_fraction, seed)
        if not held.any():
            raise AvclError(f"eval.probe_val_fraction={opts.val_fraction} holds out no train clip: no validation "
                            f"data to choose C among eval.probe_svm_costs={costs}")
        c, scores = select_cost(xtr[~held], ytr[~held], xtr[held], ytr[held], costs, opts.max_iter, seed)
        val = scores[costs.index(c)]
    metric = score_metric(clip_scores(fit_svm(xtr, ytr, c, opts.max_iter, seed), xte), yte)
    return {"metric": metric, "c": c, "val": val}
