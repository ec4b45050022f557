"""STELLA (= FLAVA): continual audio-video pre-training with localized, replay-guided patch selection.

Lee et al., "STELLA: Continual Audio-Video Pre-training with Spatio-Temporal Localized Alignment"
(ICML 2024; arXiv 2310.08204, first titled FLAVA); code: ``G-JWLee/STELLA_code``, ``G-JWLee/FLAVA_code``.
Label-free, task-free; runs on the CAV backbone only (``model.name=cav`` with ``model.cav.avm``).

STELLA = DER++-style replay of a reservoir + training the CAV-MAE objective on only half of the
patches, chosen where the current audio and video attend to each other (localized importance)
and away from patches that past clips' cross-modal queries claim (forget-robust selection), with
an online-trained AVM cross-attention module providing the attention. One step
(``training_loss``; as the code's ``models/cl_methods/stella.py``):

1. ``x = model.prepare(batch, train=True)``; one full-token unimodal pass and one fusion pass of
   the current rows, no grad (the AVM's input in the code's ``stella.py``).
2. AVM attention on the fusion outputs -> importance ``I_a, I_v`` at temperature T_att (the code's
   ``extract_multimodal_relationship``),
   candidate sets = top ``K = floor((1 - core_ratio) L)`` tokens (392 of 784 video, 256 of 512 audio
   tokens at ViT-B size), pooled queries ``q_a, q_v`` per head (ibid.). K is also the selection budget.
3. L_avm: the AVM matching BCE on half-deranged pairs, gradients into the AVM only (the code's
   ``learn_multimodal_relationship`` and ``models/avm_module.py``). As the code, the unimodal codes are
   paired before the joint fusion pass, so each negative pair is fused together; it is
   ``model.avm_loss(unimodal=..., fused=...)`` on step 1's outputs: no second unimodal pass, the positive pairs
   reuse step 1's fusion outputs (the same pairs) and only the negative pairs get a fusion pass of their own.
4. Buffer non-empty: draw ``B_r = train.replay_batch_size`` rows; current row n is aligned with
   replayed row ``n mod B_r``; correlation ``c`` of the current candidates against that row's stored
   pooled queries (the code's ``stella.py``); pruning ~ Bernoulli(c) for current rows and
   ~ Bernoulli(stored c) for replayed rows, re-drawn every time; video ids by weighted sampling without
   replacement (the code's ``torch.multinomial``), audio ids by contiguous chunk sampling (the code's
   ``compute_core_audio_indices``). Replayed rows use their stored I and c, never recomputed (as the code).
   Buffer empty (first step of the stream): deterministic top-K by I for both modalities (audio
   too: no chunks), no pruning, c = 0, no DER term.
5. ``model.ssl_loss([current; replay], selected=ids)``: CAV-MAE (MAE + 0.1 InfoNCE) on the selected
   patches, a random floor(0.2 L) of them visible (the code's
   ``modality_guided_masking``, ``models/objectives.py``).
6. Loss = ssl loss + ``matching_loss_weight`` L_avm + ``der_alpha`` (MSE(stored z_a, z_a) + MSE(stored
   z_v, z_v)) over the replayed rows, each MSE a mean over B_r x D elements (the code's ``stella.py``,
   as DER++).
7. The current rows are offered to the reservoir with their detached z_a, z_v (from step 5's
   forward, before this step's update), q_a, q_v, c_a, c_v, I_a, I_v (the code's ``utils/buffer.py``).

STELLA+ (``store: patches``; STELLA_code's ``stella_p.py``, which cannot run as released): the slot
keeps only the selected patches (raw patch values of ``model.patchify``) and their ids instead of
the prepared clip, and no c / I (never needed: the stored selection is reused as is at replay).
The backbone's ``ssl_loss`` takes a full-size prepared input plus ``selected`` ids; the adapter
:func:`scatter_patches` rebuilds that input with zeros outside the stored patches. ``patchify`` is
a pure rearrangement, so its adjoint (a vector-Jacobian product) is its inverse on the patches it
covers; ``ssl_loss`` reads nothing but the selected patches, so the result is exactly the loss
of the stored patches (tested). The current rows of a STELLA+ step are scored as in STELLA (their c
against the replayed rows' stored pooled queries); only the replayed rows skip pruning and selection.
A slot holds K_a x P_a + K_v x P_v patch values (half the prepared clip at the default ratios) plus
the K_a + K_v ids, z_a, z_v and the pooled queries.

Deviations from the official code:
- Gumbel-top-k (exact same distribution) instead of ``torch.multinomial`` for every weighted draw
  without replacement (our choice): video patches and the audio chunk order.
- The audio chunk selection is vectorised (one sort with a composite key, see
  ``avcl.methods.stella.selection.contiguous_audio_selection``), with documented choices where the
  code is silent: trimming in time-major token order, fill with pruned tokens in chunk order.
- Pruned video tokens are ordered by their importance when they must fill the budget (the code's
  multinomial puts all zero-weight entries last in an unspecified order).
- The reservoir is one per rank with memory.size / W slots, as the code's (``avcl.memory.sharding``), but it
  lives on the device of the data, dtype float32 (the code: float32 arrays on the CPU).
- The correlation and importance scores are computed in float32 even under bf16 autocast.
- The AVM matching loss reuses the scoring pass's unimodal codes and, for its positive pairs only, its fusion
  outputs (step 3); the code runs a second fusion pass over the whole batch. Same values: a positive pair is
  the scoring pass's own pair, and the negatives (paired before fusion, as the code) are fused anew.
- STELLA+ follows what can be read in ``stella_p.py`` (selected patches + ids stored, reused as is);
  it cannot run as released, so its other details
  (if any) are unknown.
- No separate AVM learning rate or weight decay (the code uses the same lr; our optimizer is one
  group over ``model.parameters()``, which includes ``model.avm``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avcl import parallel
from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.methods import register
from avcl.methods.base import Hparams, MemoryUse, Method
from avcl.methods.replay_ssl import ssl_terms
from avcl.methods.stella.selection import (bernoulli_prune, candidate_mask, contiguous_audio_selection,
                                           past_correlation, patch_importance, pooled_queries, top_k_selection,
                                           weighted_sample_without_replacement)
from avcl.nn.vit import visible_count


MODALITIES = ("audio", "video")


@dataclass
class StellaHparams(Hparams):
    attention_temperature: float = option(0.4, range=">0")  # T_att of the importance softmax (STELLA code): 0.4 VGGSound, 0.1 AudioSet
    core_video_ratio: float = option(0.5, range="[0,1)")  # rho_v: fraction of video patches left out by the selection (code: core_video_ratio)
    core_audio_ratio: float = option(0.5, range="[0,1)")  # rho_a: likewise for audio
    audio_chunk: int = option(4, range=">=1")  # time steps (of the audio token grid) per chunk of the contiguous selection (compute_core_audio_indices)
    matching_loss_weight: float = 1.0  # weight of the AVM matching BCE (the code's matching_loss_weight)
    der_alpha: float = 0.5  # weight of the replayed embeddings' MSE (the STELLA code's DER alpha)
    store: str = option("clip", choices=("clip", "patches"))  # clip: STELLA (prepared clip + scores) | patches: STELLA+ (selected patches + ids)


def scatter_patches(model, patches: dict, ids: dict, like: dict) -> dict:
    """A prepared input shaped as ``like``'s rows, holding ``patches[m]`` (B, K, P) at token ids ``ids[m]``
    (B, K) and zeros elsewhere: the inverse of ``model.patchify`` on those patches (its adjoint, as
    patchify only rearranges values)."""
    rows = len(next(iter(ids.values())))
    with torch.enable_grad():
        probe = {m: torch.zeros((rows, *like[m].shape[1:]), dtype=torch.float32, device=like[m].device,
                                requires_grad=True) for m in MODALITIES}
        out = model.patchify(probe)
        full = {m: out[m].new_zeros(out[m].shape).scatter(
            1, ids[m][..., None].expand(-1, -1, out[m].shape[2]), patches[m].to(out[m].dtype)) for m in MODALITIES}
        grads = torch.autograd.grad([out[m] for m in MODALITIES], [probe[m] for m in MODALITIES],
                                    grad_outputs=[full[m] for m in MODALITIES])
    return {m: g.detach().to(like[m].dtype) for m, g in zip(MODALITIES, grads)}


@register
class Stella(Method):
    name = "stella"
    description = "STELLA/FLAVA: DER++ replay + localized, forget-robust patch selection with an online AVM"
    Hparams = StellaHparams
    memory_use = MemoryUse("reservoir", replay="step")
    requires_model = "cav"

    def __init__(self, model, hparams, cfg):
        super().__init__(model, hparams, cfg)
        hp = hparams
        if getattr(model, "avm", None) is None:
            raise AvclError("method 'stella' needs the AVM module: set model.cav.avm=true")
        # K = floor((1 - rho) L) (STELLA code: 392 of 784 video, 256 of 512 audio tokens)
        ratio = {"audio": hp.core_audio_ratio, "video": hp.core_video_ratio}
        self.budget = {m: visible_count(model.num_tokens[m], ratio[m]) for m in MODALITIES}
        for m in MODALITIES:
            if self.budget[m] < 2:
                raise AvclError(f"method_args.stella.core_{m}_ratio={ratio[m]} keeps {self.budget[m]} of the "
                                f"{model.num_tokens[m]} {m} tokens: the masked objective needs at least 2")

    # ----- one step ------------------------------------------------------------------------------
    def score(self, x: dict) -> dict:
        """Steps 1-3: no-grad scoring of the current rows (``extract_multimodal_relationship`` in the STELLA code)
        and the AVM matching loss."""
        model, hp = self.model, self.hp
        with torch.no_grad():
            h = model.encode_unimodal(x)
            f = model.fuse(h)
            att = model.avm.attention_logits(f["audio"], f["video"])
            i_a, i_v = patch_importance(att["q_a"], att["k_a"], att["q_v"], att["k_v"], hp.attention_temperature)
            q_a = pooled_queries(att["q_a"], i_a, self.budget["audio"])
            q_v = pooled_queries(att["q_v"], i_v, self.budget["video"])
        avm_loss = model.avm_loss(unimodal=h, fused=f)
        return {"i_audio": i_a, "i_video": i_v, "q_audio": q_a, "q_video": q_v,
                "k_audio": att["k_a"], "k_video": att["k_v"], "avm_loss": avm_loss}

    def select(self, importance: dict, c: dict, replayed_ids: dict | None = None) -> dict:
        """Step 4: pruning ~ Bernoulli(c), then the video and audio selections (as the code's ``stella.py``)."""
        prune = {m: bernoulli_prune(c[m]) for m in MODALITIES}
        ids = {"video": weighted_sample_without_replacement(importance["video"], self.budget["video"], prune["video"]),
               "audio": contiguous_audio_selection(importance["audio"], prune["audio"], *self.model.audio_grid,
                                                   self.hp.audio_chunk, self.budget["audio"])}
        if replayed_ids is not None:
            ids = {m: torch.cat([ids[m], replayed_ids[m]]) for m in MODALITIES}
        return ids

    def training_loss(self, batch):
        model, hp = self.model, self.hp
        x = model.prepare(batch, train=True)
        rows = len(x["audio"])
        s = self.score(x)
        importance = {"audio": s["i_audio"], "video": s["i_video"]}
        replay = None
        if len(self.memory):
            _, replay = self.memory.sample(parallel.per_rank(self.cfg.train.replay_batch_size))  # per rank (STELLA's utils/buffer.py)
            align = torch.arange(rows, device=x["audio"].device) % len(replay["z_audio"])
            # STELLA code: a video patch is scored against the audio queries (and vice versa)
            c = {"video": past_correlation(s["k_video"], replay["q_audio"][align], s["q_audio"],
                                           candidate_mask(s["i_video"], self.budget["video"])),
                 "audio": past_correlation(s["k_audio"], replay["q_video"][align], s["q_video"],
                                           candidate_mask(s["i_audio"], self.budget["audio"]))}
            if hp.store == "clip":
                ids = self.select({m: torch.cat([importance[m], replay[f"i_{m}"]]) for m in MODALITIES},
                                  {m: torch.cat([c[m], replay[f"c_{m}"]]) for m in MODALITIES})
                past_x = {m: replay[m] for m in MODALITIES}
            else:  # STELLA+: the stored selection as is
                stored_ids = {m: replay[f"{m}_ids"] for m in MODALITIES}
                ids = self.select(importance, c, replayed_ids=stored_ids)
                past_x = scatter_patches(model, {m: replay[f"{m}_patches"] for m in MODALITIES}, stored_ids, x)
            x_all = {m: torch.cat([x[m], past_x[m].to(x[m].dtype)]) for m in MODALITIES}
        else:  # first step of the stream: deterministic top-K, no pruning
            c = {m: torch.zeros_like(importance[m]) for m in MODALITIES}
            ids = {m: top_k_selection(importance[m], self.budget[m]) for m in MODALITIES}
            x_all = x
        out = model.ssl_loss(x_all, selected=ids)
        loss = out["loss"] + hp.matching_loss_weight * s["avm_loss"]
        self.log_terms(**ssl_terms(out), avm=s["avm_loss"])
        if replay is not None:
            der = sum(F.mse_loss(out[f"z_{m}"][rows:].float(), replay[f"z_{m}"]) for m in MODALITIES)
            self.log_terms(der=der)
            loss = loss + hp.der_alpha * der
        self.memory.add(self.slot_rows(x, out, s, c, {m: ids[m][:rows] for m in MODALITIES}, rows))
        return loss

    def slot_rows(self, x: dict, out: dict, s: dict, c: dict, ids: dict, rows: int) -> dict:
        """Step 7: what a reservoir slot keeps of each current row (the code's ``utils/buffer.py``), float32, detached."""
        keep = {f"z_{m}": out[f"z_{m}"][:rows].detach().float() for m in MODALITIES}
        keep.update({f"q_{m}": s[f"q_{m}"].float() for m in MODALITIES})
        if self.hp.store == "clip":
            keep.update({m: x[m].detach() for m in MODALITIES})
            keep.update({f"c_{m}": c[m].float() for m in MODALITIES})
            keep.update({f"i_{m}": s[f"i_{m}"].float() for m in MODALITIES})
        else:
            with torch.no_grad():
                patches = self.model.patchify(x)
            for m in MODALITIES:
                keep[f"{m}_patches"] = patches[m].gather(
                    1, ids[m][..., None].expand(-1, -1, patches[m].shape[2])).detach()
                keep[f"{m}_ids"] = ids[m]
        return keep
