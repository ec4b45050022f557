"""HAD (reconstructed): Hierarchical Augmentation and Distillation (Zuo et al., TPAMI 2024).

HAD has no public code and its full text was not available: what is known comes from the
abstract (see docs/had.md and the HAD paper's abstract, arXiv 2401.06287). Known: exemplar
memory, no task id; HAM, a *segmental feature augmentation* of stored past data at both
model levels; HDM, *logical* distillation at video and distribution level (with class
"proxies") and *correlative* distillation at snippet and video level. Everything else below
is OUR reconstruction, each piece switchable:

* HAM (``ham``): for replayed exemplars, add Gaussian noise independently to every snippet
  (segment = snippet), scaled by ``ham_strength`` x the class's per-dimension feature std
  measured when the class was learned, at the low level (per-modality snippet embeddings)
  and/or the snippet level (fused snippet embeddings), as ``ham_levels`` says. Labels kept.
* video-level logical distillation (``video_kd``): KD (T = ``temperature``) on old-class logits.
* distribution-level logical distillation (``distribution_kd``): proxies = normalised mean
  old-model video embedding of each old class over memory; KL between the old and new
  softmax(cos(z, proxies) / ``proxy_temperature``).
* snippet- and video-level correlative distillation (``snippet_relation``, ``video_relation``):
  KL between the old and new row-softmax(cosine-similarity matrix / ``relation_temperature``)
  of all snippets (B*N x B*N) and of all videos (B x B) of the batch.
* loss = CE over all seen classes (current data + augmented replay) + the weighted terms;
  the old model sees the exemplars un-augmented. Random exemplars, replayed as a separate batch.
All weights are ours (the paper's are unknown).
"""
from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method
from avcl.nn.cl_losses import distillation_kl
from avcl.parallel import eval_pass


HAM_LEVELS = ("low", "snippet")


@dataclass
class HADHparams(Hparams):
    ham: bool = True  # HAM: per-snippet Gaussian augmentation of replayed exemplars
    ham_strength: float = option(0.5, range="[0,1]")  # HAM noise scale, x the class's per-dimension feature std
    ham_levels: List[str] = option(factory=lambda: ["low", "snippet"], choices=HAM_LEVELS)  # where HAM adds noise: low | snippet
    video_kd: float = 1.0  # weight of the video-level KD on old-class logits
    distribution_kd: float = 1.0  # weight of the distribution-level KD (class proxies)
    snippet_relation: float = 1.0  # weight of the snippet-level relation distillation
    video_relation: float = 1.0  # weight of the video-level relation distillation
    temperature: float = option(2.0, range=">0")  # T of the video-level KD
    proxy_temperature: float = option(0.1, range=">0")  # softmax temperature over the class proxies' cosines
    relation_temperature: float = option(0.1, range=">0")  # softmax temperature of the similarity matrices


def relation_kd(new: torch.Tensor, old: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between row-softmaxed cosine-similarity matrices of old and new embeddings (rows = samples)."""
    def logits(x):
        x = F.normalize(x.float(), dim=1)
        return x @ x.T / temperature
    return F.kl_div(F.log_softmax(logits(new), dim=1), F.log_softmax(logits(old), dim=1),
                    reduction="batchmean", log_target=True)


def proxy_kd(new: torch.Tensor, old: torch.Tensor, proxies: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL between old and new softmax over cosine similarities to the class proxies."""
    def logits(z):
        return F.normalize(z.float(), dim=1) @ proxies.T / temperature
    return F.kl_div(F.log_softmax(logits(new), dim=1), F.log_softmax(logits(old), dim=1),
                    reduction="batchmean", log_target=True)


def segmental_noise(x: torch.Tensor, rows: torch.Tensor, std: torch.Tensor, strength: float) -> torch.Tensor:
    """x (B, N, D): rows where ``rows`` is True get independent noise per snippet, scaled by ``std`` (B, D)."""
    noise = torch.randn_like(x) * (strength * std)[:, None, :]
    return x + noise * rows.to(x.dtype)[:, None, None]


@register
class HAD(Method):
    name = "had"
    description = "HAD (reconstructed): segmental feature augmentation + hierarchical distillation"
    Hparams = HADHparams
    memory_use = MemoryUse("exemplars", replay="separate")
    requires_model = "had"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        self.class_std: dict[str, torch.Tensor] = {}  # "low:<modality>" / "snippet" -> (classes, D)
        self.proxies = torch.empty(0)

    def before_task(self, task):
        super().before_task(task)
        if self.old_model is not None and len(self.memory):
            memory = self.memory.samples
            z = eval_pass(lambda b: self.old_model.embed(b)["features"].float(), memory, self.cfg.eval.batch_size)
            sums = torch.zeros(self.old_classes, z.shape[1], device=z.device).index_add_(0, memory["label"], z)
            self.proxies = F.normalize(sums, dim=1)

    def _augment(self, x, key, batch):
        if not self.hp.ham or key not in self.class_std:
            return x
        rows = batch["from_memory"]
        std = self.class_std[key].to(x.device)[batch["label"].clamp(max=len(self.class_std[key]) - 1)]
        return segmental_noise(x, rows, std, self.hp.ham_strength)

    def training_loss(self, batch):
        model, hp = self.model, self.hp
        low = model.low_level(batch)
        if "low" in hp.ham_levels:
            low = {m: self._augment(e, f"low:{m}", batch) for m, e in low.items()}
        snippets = model.snippet_level(low)
        if "snippet" in hp.ham_levels:
            snippets = self._augment(snippets, "snippet", batch)
        z = model.video_level(snippets)
        logits = model.head(z)
        loss = F.cross_entropy(logits, batch["label"])
        if self.old_model is None:
            return loss
        with torch.no_grad():
            old = self.old_model(batch)
        terms = {}
        if hp.video_kd:
            terms["video_kd"] = distillation_kl(logits[:, :self.old_classes], old["logits"], hp.temperature)
            loss = loss + hp.video_kd * terms["video_kd"]
        if hp.distribution_kd and len(self.proxies):
            terms["distribution_kd"] = proxy_kd(z, old["features"], self.proxies, hp.proxy_temperature)
            loss = loss + hp.distribution_kd * terms["distribution_kd"]
        if hp.snippet_relation:
            terms["snippet_relation"] = relation_kd(snippets.flatten(0, 1), old["snippets"].flatten(0, 1),
                                                    hp.relation_temperature)
            loss = loss + hp.snippet_relation * terms["snippet_relation"]
        if hp.video_relation:
            terms["video_relation"] = relation_kd(z, old["features"], hp.relation_temperature)
            loss = loss + hp.video_relation * terms["video_relation"]
        self.log_terms(**terms)
        return loss

    @torch.no_grad()
    def after_task(self, task):
        super().after_task(task)
        # Per-class feature spread at both levels, measured now, for HAM in later tasks.
        was_training = self.model.training
        self.model.eval()
        keys = {f"low:{m}": m for m in self.model.modalities} | {"snippet": "snippets"}
        outs = eval_pass(lambda b: {name: out.float() for name, out in self.model.embed(b).items() if name in keys.values()},
                         task.train, self.cfg.eval.batch_size)  # several processes: sharded
        self.model.train(was_training)
        labels = task.train["label"]
        for key, field_name in keys.items():
            values = outs[field_name]  # (n, N, D)
            std = torch.zeros(self.seen_classes, values.shape[-1], device=values.device)
            if key in self.class_std:
                std[:len(self.class_std[key])] = self.class_std[key].to(std.device)
            for c in task.classes:
                std[c] = values[labels == c].flatten(0, 1).std(dim=0)
            self.class_std[key] = std

    def state_dict(self):
        return {**super().state_dict(), "class_std": self.class_std}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.class_std = state["class_std"]
