"""AFC (Kang, Park, Han, CVPR 2022, "Class-Incremental Learning by Knowledge Distillation with
Adaptive Feature Consolidation") as AV-CIL's official code runs it as a baseline
(``AFC/train_incremental_afc.py``, ``model/layers.py``).

Needs ``model.name=avcil`` (modalities [audio], [video] or [audio, video]). The method puts an
LSC head (``avcl.models.heads.LSCClassifier``: ``proxies_per_class`` cosine proxies per class,
softmax attention over a class's proxies, learnable NCA scale) on ``model.head``.

* Memory: ``memory.size`` exemplars by herding on L2-normalised fused features, merged with
  the new task's data.
* Task 0: NCA loss on the LSC head; the proxies start random (no imprinting, as the official code).
* Task k >= 1 (0-indexed), in ``before_task``: the head grows (old proxies frozen, scale back to
  ``scale``), the teacher is copied *after* growing (official order: it scores the new classes
  with the fresh random proxies and scale), then the new classes' proxies are imprinted: per new
  class, k-means (``proxies_per_class`` centres) on the L2-normalised fused features of its
  training samples, times the mean norm of the frozen proxies. Loss on a batch:

      L = NCA(z, y; scale) + lam_disc · √(k+1) · Σ_sites mean_i w_i,site ‖n(h_i,site) - n(h^old_i,site)‖₂

  - NCA (official ``nca``): s_j = scale · (z_j - margin) for *every* class j, shifted by its max
    m = max_j s_j; L = -(s_y - m) + log(1 + Σ_{j≠y} exp(s_j - m)) (the target's term is replaced
    by exp(0) = 1 in the denominator, PODNet's ``exclude_pos_denominator``). With the margin on
    every similarity it cancels in the shift: the margin has no effect (``margin_target_only``
    gives PODNet's / the original AFC's target-only margin instead).
  - sites h: audio-visual: the pooled visual vector v̄, f^a, f^v ("visual_pooled",
    "audio_features", "visual_features"); audio-only: f^a; video-only: f^v (the official
    unimodal models distil their one feature, without importance); n = L2 normalisation.
  - importance (official, audio-visual only): I_i,site = ‖∂ NCA_old / ∂ h^old_i,site‖₂, the
    gradient of the teacher's NCA loss (the teacher's logits and scale, the batch's labels) with
    respect to its own site features, per sample; w_i,site = I_i,site / Σ_sites I_i,site (the sum
    clamped at 1e-12; the official code divides by zero there). With sum fusion f = f^a + f^v the
    gradients at f^a and f^v are equal, so w_a = w_v. Single-site models: w = 1.
  - weight lam_disc · √(k+1): AV-CIL's ``lam_t = (step + 1) ** 0.5`` with ``--lam_disc 0.5`` (its
    shell script; the argparse default is 4.0). The original AFC uses √(seen classes / new
    classes), equal when all tasks have the same size.

* Evaluation: ``classifier`` = "lsc" (argmax of the head's class scores) or "nme" (iCaRL's
  nearest mean of exemplars); the other head is reported too (``heads`` in metrics.json).

Deviations from the AFC paper (as AV-CIL's ``AFC/train_incremental_afc.py``): the margin on every similarity;
no class-balanced fine-tuning stage; the importance is a per-sample scalar per site computed on
every batch from the teacher, not a per-channel importance accumulated over the data after each
task; the distillation is an L2 distance of normalised vectors, not PODNet's pooled distillation
of intermediate maps.

Deviations from the AV-CIL code / choices where it says nothing:

* k-means is avcl's own (k-means++ start, at most ``kmeans_iters`` Lloyd steps, torch RNG; the
  official uses scikit-learn's ``KMeans(n_clusters=10)`` defaults); a class with at most K
  training samples gets its samples as proxies, cycled (scikit-learn would fail).
* Imprinting reads every training sample of the new classes (official: a drop_last loader).
* NME means are renormalised, as avcl's iCaRL (official AFC: the plain mean of normalised features).
* Model selection (``train.model_selection=best_val``) always uses the LSC head (official "NME"
  runs select the epoch by NME validation accuracy).
* The NCA loss is computed in float32, the head's cosines too (even under bf16 autocast).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method
from avcl.methods.icarl import NearestMeanHead
from avcl.models.heads import LSCClassifier


# The features distilled per modality set (AV-CIL's ``AFC/train_incremental_afc.py``; official AFC_train_out outputs).
SITES = {("audio", "video"): ("visual_pooled", "audio_features", "visual_features"),
         ("audio",): ("audio_features",), ("video",): ("visual_features",)}


@dataclass
class AFCHparams(Hparams):
    classifier: str = "lsc"  # lsc | nme (the other one is reported in heads)
    proxies_per_class: int = option(10, range=">=1")  # cosine proxies per class of the LSC head (k-means centres at init)
    margin: float = 0.6  # NCA margin (official: on every similarity, where it cancels)
    margin_target_only: bool = False  # PODNet / original AFC: the margin on the target similarity only
    scale: float = option(1.0, range=">0")  # NCA scale, its initial value at every task
    learn_scale: bool = True  # the NCA scale is a trained parameter (false: fixed at scale)
    lam_disc: float = 0.5  # distillation weight; x √(k+1) at task k
    kmeans_iters: int = option(100, range=">=1")  # at most this many Lloyd steps of the proxies' k-means


def nca_loss(similarities: torch.Tensor, labels: torch.Tensor, scale, margin: float,
             target_only: bool = False) -> torch.Tensor:
    """AV-CIL's ``nca``: -(s_y - m) + log(1 + Σ_{j≠y} exp(s_j - m)), s = scale (z - margin), m = max s."""
    margins = margin * F.one_hot(labels, similarities.shape[1]) if target_only else margin
    s = scale * (similarities.float() - margins)
    s = s - s.max(dim=1, keepdim=True).values
    target = s.gather(1, labels[:, None]).squeeze(1)
    return (torch.logsumexp(s.scatter(1, labels[:, None], 0.0), dim=1) - target).mean()


def importance_weights(loss: torch.Tensor, sites: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample and site: ‖∂loss/∂site‖₂, divided by its sum over the sites."""
    norms = [g.float().flatten(1).norm(dim=1) for g in torch.autograd.grad(loss, sites)]
    total = sum(norms).clamp_min(1e-12)
    return [n / total for n in norms]


def kmeans(points: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """k centres of ``points`` (n, D): k-means++ start, then Lloyd steps until nothing moves."""
    if len(points) <= k:
        return points[torch.arange(k) % len(points)]
    centres = points[torch.randint(len(points), (1,))]
    for _ in range(k - 1):  # next centre with probability proportional to the squared distance
        distance = torch.cdist(points, centres).min(dim=1).values ** 2
        centres = torch.cat([centres, points[torch.multinomial(distance.clamp_min(1e-12), 1)]])
    for _ in range(iterations):
        assign = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1), centres)  # empty cluster: stays
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


@register
class AFC(NearestMeanHead, Method):
    name = "afc"
    description = "AFC (AV-CIL's baseline): LSC head + NCA, importance-weighted feature distillation, herding"
    Hparams = AFCHparams
    memory_use = MemoryUse("exemplars", selection="herding")
    requires_model = "avcil"
    own_head = "lsc"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        model.head = LSCClassifier(model.head.in_features, hparams.proxies_per_class, hparams.scale,
                                   hparams.learn_scale)
        self.sites = SITES[tuple(model.modalities)]

    def before_task(self, task):
        self.task_ranges.append((self.seen_classes, self.seen_classes + len(task.classes)))
        self.model.head.grow(self.seen_classes)
        self.old_model = None
        if len(self.task_ranges) > 1:
            # The teacher's graph gives the importance gradients; it is never optimised.
            self.old_model = self.frozen_copy().requires_grad_(len(self.sites) > 1)
            self.imprint(task.train)

    @torch.no_grad()
    def imprint(self, data):
        """New classes' proxies: k-means centres of their L2-normalised features x mean old-proxy norm."""
        features = F.normalize(self.embed_features(data), dim=1)
        labels = data["label"].to(features.device)
        centres = [kmeans(features[labels == c], self.hp.proxies_per_class, self.hp.kmeans_iters)
                   for c in range(*self.task_ranges[-1])]
        self.model.head.imprint(torch.stack(centres))

    def nca(self, similarities, labels, scale):
        return nca_loss(similarities, labels, scale, self.hp.margin, self.hp.margin_target_only)

    def training_loss(self, batch):
        out = self.model(batch)
        loss = self.nca(out["logits"], batch["label"], self.model.head.scale)
        if self.old_model is None:
            return loss
        step = len(self.task_ranges) - 1
        distillation = self.feature_distillation(batch, out)
        self.log_terms(nca=loss, distillation=distillation)
        return loss + self.hp.lam_disc * math.sqrt(step + 1) * distillation

    def teacher_sites(self, batch) -> tuple[list[torch.Tensor], list]:
        """The teacher's features at each site (detached) and their importance weights."""
        with torch.enable_grad():
            old = self.old_model(batch)
            sites = [old[s] for s in self.sites]
            weights = [1.0] if len(sites) == 1 else importance_weights(
                self.nca(old["logits"], batch["label"], self.old_model.head.scale), sites)
        return [h.detach() for h in sites], weights

    def feature_distillation(self, batch, out):
        """Σ_sites mean_i w_i,site ‖n(h_i,site) - n(h^old_i,site)‖₂ (module docstring)."""
        old_sites, weights = self.teacher_sites(batch)
        return sum((w * (F.normalize(out[s].float(), dim=1) - F.normalize(h.float(), dim=1)).norm(dim=1)).mean()
                   for s, h, w in zip(self.sites, old_sites, weights))
