"""AV-CIL (Pian et al., ICCV 2023): SS-IL + D-AVSC + VAD (AV-CIL's ``ours/train_incremental_ours.py``).

Needs ``model.name=avcil`` with both modalities. Memory: ``memory.size`` random exemplars,
replayed as a separate batch (``train.replay_batch_size``) joined to every new-data batch.

* Task 0: plain softmax CE over the first task's classes.
* Tasks >= 1, on a batch of B = B_n new + B_e replayed samples:
  - separated-softmax CE (SS-IL): ``separated_softmax_ce``;
  - task-wise KD, T = ``temperature``, weight ``kd_weight``, on all B samples;
  - D-AVSC (``use_davsc``) on all B samples of the current model, S_ij = â_i·v̂_j / ``tau``:
    ``lambda_i`` x instance-aware term (audio anchors, visual candidates, positive = same
    video) + ``lambda_c`` x class-aware term (positives = same label, the anchor included);
    ``class_norm`` = "official" divides each anchor's positive sum by B (the official code,
    the default, to reproduce its numbers) or "paper" by the number of positives (Eq. 7);
  - VAD (``use_vad``) on the replayed samples only: ``vad_lambda`` x spatial KL(old || new)
    (over patches, summed over time steps and channels) + (1 - ``vad_lambda``) x temporal KL
    (over time, summed over channels), each summed over the replayed samples and divided by B_e.

Defaults are the official AVE settings (lambda_I 0.5); the K-S / VS100 recipes set 0.1.
Speed: with ``teacher_cache`` (default) the teacher's outputs are computed once per step, not
in every batch (the official code re-runs the old model on every batch); the numbers are
the same. Deviations: the old model is the in-memory best/last model of the previous task (the official
code reloads the same weights from disk); replay batches are drawn at random with replacement
from memory (official: a cycled, shuffled exemplar DataLoader); new-data batches keep the last
partial batch (official: drop_last). Loss terms are computed in float32 under autocast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from avcl import parallel
from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import num_samples
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method
from avcl.nn.cl_losses import separated_softmax_ce, taskwise_kd


CLASS_NORMS = ("official", "paper")


@dataclass
class AVCILHparams(Hparams):
    temperature: float = option(2.0, range=">0")  # task-wise KD temperature
    kd_weight: float = 1.0  # weight of the task-wise KD on the logits
    use_davsc: bool = True  # dual audio-visual similarity constraint
    tau: float = option(0.05, range=">0")  # D-AVSC temperature (both terms)
    lambda_i: float = 0.5  # instance-aware weight (official: 0.5 AVE, 0.1 KS / VS100)
    lambda_c: float = 1.0  # class-aware weight
    class_norm: str = option("official", choices=CLASS_NORMS)  # official (divide by B) | paper (Eq. 7: by the number of positives)
    use_vad: bool = True  # visual attention distillation on exemplars
    vad_lambda: float = option(0.5, range="[0,1]")  # spatial share of VAD; temporal gets 1 - vad_lambda
    # compute the frozen teacher's outputs once per step (logits of every sample, attention maps
    # of the exemplars: memory x T x P x D floats) instead of in every batch; same numbers
    teacher_cache: bool = True


def instance_contrastive(audio: torch.Tensor, visual: torch.Tensor, tau: float) -> torch.Tensor:
    """-(1/B) Σ_i log softmax_j(â_i·v̂_j / tau)[i]: audio anchors, the same video's visual positive.

    Several processes: the candidates are every rank's rows (gathered), the anchors this rank's."""
    visual_all, offset = parallel.all_rows(visual.float())
    similarity = audio.float() @ visual_all.T / tau
    return F.cross_entropy(similarity, offset + torch.arange(len(audio), device=audio.device))


def class_contrastive(audio: torch.Tensor, visual: torch.Tensor, labels: torch.Tensor, tau: float,
                      norm: str = "official") -> torch.Tensor:
    """Class-aware term: positives are all batch items with the anchor's label (itself included).

    official: -(1/B) Σ_i (1/B) Σ_{j: y_j = y_i} log p_ij; paper (Eq. 7): (1/|P(i)|) instead of 1/B.
    """
    visual_all, _ = parallel.all_rows(visual.float())  # several processes: every rank's candidates
    labels_all, _ = parallel.all_rows(labels)
    log_p = (audio.float() @ visual_all.T / tau).log_softmax(dim=1)
    positive = (labels[:, None] == labels_all[None, :]).float()
    per_anchor = (positive * log_p).sum(dim=1)
    per_anchor = per_anchor / (len(labels_all) if norm == "official" else positive.sum(dim=1))
    return -per_anchor.mean()


def attention_kl(old: torch.Tensor, new_log: torch.Tensor) -> torch.Tensor:
    """Σ over every distribution of KL(old || new), divided by the batch size.

    ``old`` are the teacher's probabilities, ``new_log`` the student's log-probabilities.
    """
    old = old.float()
    kl = old * (old.clamp_min(1e-12).log() - new_log.float())
    return kl.sum() / len(old)


@register
class AVCIL(Method):
    name = "avcil"
    description = "AV-CIL: SS-IL + audio-visual similarity constraints + visual attention distillation"
    Hparams = AVCILHparams
    memory_use = MemoryUse("exemplars", replay="separate")
    requires_model = "avcil"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        if model.modalities != ["audio", "video"]:
            raise AvclError(f"method avcil needs model.modalities=[audio, video], got {model.modalities}")
        self.teacher: Optional[dict] = None  # the step's cached teacher outputs (training_data)

    def training_data(self, data, replay):
        """With ``teacher_cache``: the teacher's outputs for every sample of the step, computed once.

        The teacher is frozen and avcl applies no augmentation, so its logits and attention maps
        per sample are fixed for the whole step; samples carry ``teacher_row``, their row in the cache.
        """
        self.teacher = None
        if self.old_model is None or not self.hp.teacher_cache:
            return data, replay
        new = self.teacher_pass(data, attention=False)
        memory = self.teacher_pass(replay, attention=self.hp.use_vad) if replay else {}
        offset = num_samples(data)
        self.teacher = {"memory_offset": offset, **memory,
                        "logits": torch.cat([new["logits"]] + ([memory["logits"]] if memory else []))}
        data = {**data, "teacher_row": torch.arange(offset, device=data["label"].device)}
        if replay:
            replay = {**replay, "teacher_row": offset + torch.arange(num_samples(replay), device=replay["label"].device)}
        return data, replay

    def teacher_pass(self, samples, attention: bool) -> dict[str, torch.Tensor]:
        """The teacher's logits for ``samples``, and with ``attention`` its spatial / temporal maps."""
        def outputs(batch) -> dict[str, torch.Tensor]:
            rows = torch.arange(num_samples(batch), device=batch["label"].device) if attention else None
            out = self.old_model(batch, attention_rows=rows)
            return {"logits": out["logits"].float()} if not attention else {
                "logits": out["logits"].float(), "spatial_attention": out["spatial_log_attention"].exp(),
                "temporal_attention": out["temporal_attention"].float()}
        return parallel.eval_pass(outputs, samples, self.cfg.eval.batch_size)  # several processes: sharded

    @torch.no_grad()
    def teacher_outputs(self, batch, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The teacher's logits for the batch; spatial / temporal attention for ``rows``."""
        if self.teacher is None:
            old = self.old_model(batch, attention_rows=rows)
            return {"logits": old["logits"], "spatial_attention": old["spatial_log_attention"].exp(),
                    "temporal_attention": old["temporal_attention"][rows]}
        cache_rows = batch["teacher_row"]
        old = {"logits": self.teacher["logits"][cache_rows]}
        if len(rows):
            memory_rows = cache_rows[rows] - self.teacher["memory_offset"]
            old.update(spatial_attention=self.teacher["spatial_attention"][memory_rows],
                       temporal_attention=self.teacher["temporal_attention"][memory_rows])
        return old

    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        """Every loss term of the current step, by name (their sum is the training loss)."""
        hp = self.hp
        distill_attention = self.old_model is not None and hp.use_vad
        rows = batch["from_memory"].nonzero().squeeze(1) if distill_attention else None
        out = self.model(batch, attention_rows=rows)
        logits, labels = out["logits"], batch["label"]
        if self.old_model is None:
            return {"ce": F.cross_entropy(logits, labels)}
        old = self.teacher_outputs(batch, rows if rows is not None else labels[:0])
        terms = {"ss_ce": separated_softmax_ce(logits, labels, batch["from_memory"], self.old_classes),
                 "tkd": hp.kd_weight * taskwise_kd(logits.float(), old["logits"].float(),
                                                   self.task_ranges[:-1], hp.temperature)}
        if hp.use_davsc:
            a, v = out["audio_embedding"], out["visual_embedding"]
            terms["davsc_instance"] = hp.lambda_i * instance_contrastive(a, v, hp.tau)
            terms["davsc_class"] = hp.lambda_c * class_contrastive(a, v, labels, hp.tau, hp.class_norm)
        if distill_attention and len(rows):
            terms["vad_spatial"] = hp.vad_lambda * attention_kl(
                old["spatial_attention"], out["spatial_log_attention"])
            terms["vad_temporal"] = (1 - hp.vad_lambda) * attention_kl(
                old["temporal_attention"], out["temporal_scores"][rows].log_softmax(dim=1))
        return terms

    def training_loss(self, batch):
        terms = self.loss_terms(batch)
        self.log_terms(**terms)
        return sum(terms.values())
