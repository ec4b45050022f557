"""AV-CIL's audio-guided spatial attention (AV-CIL's ``model/audio_visual_model_incremental.py``), two implementations.

Both compute, from the audio key â (B, D) = tanh(W_aa a), the pre-activation visual keys
K = W_va V (B, T, P, D) and the raw tokens V (B, T, P, D):

    V̂ = tanh(K);  α = softmax_p(V̂ ⊙ â);  u = Σ_p α V̂;  v = Σ_p α V

and return u, v (B, T, D) and log α for the requested rows (for attention distillation).

* ``reference_spatial_attention``: plain PyTorch ops, as the official code writes them.
* ``FusedSpatialAttention``: the same numbers from a hand-written forward and backward that
  walk the batch in cache-sized chunks, write into preallocated buffers and skip the softmax's
  max-subtraction (the scores are products of two tanh values, so |score| <= 1 and exp cannot
  overflow). The (B, T, P, D) tensors are the bulk of AV-CIL's work and every op on them is
  memory-bound; this cuts the passes over them and the allocations (benchmarks/avcil_step.py).
  Tested against the reference in float64 (values and gradients).
"""
from __future__ import annotations

import torch


CHUNK_BYTES = 4 << 20  # CPU: a chunk's (b, T, P, D) slices stay cache-resident between ops


def reference_spatial_attention(audio_key: torch.Tensor, visual_pre: torch.Tensor, tokens: torch.Tensor,
                                rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    visual_key = torch.tanh(visual_pre)
    scores = visual_key * audio_key[:, None, None, :]  # element-wise, not a dot product
    spatial = scores.softmax(dim=2)
    return ((spatial * visual_key).sum(dim=2), (spatial * tokens).sum(dim=2),
            scores[rows].log_softmax(dim=2))


def _chunk_rows(like: torch.Tensor) -> int:
    """Samples per chunk: cache-sized on CPU; the whole batch on GPUs (few, large kernels)."""
    if like.device.type != "cpu":
        return len(like)
    return max(1, min(len(like), CHUNK_BYTES // max(1, like[0].numel() * like.element_size())))


def _chunks(batch: int, step: int):
    return ((i, min(i + step, batch)) for i in range(0, batch, step))


class FusedSpatialAttention(torch.autograd.Function):
    """``apply(audio_key, visual_pre, tokens, rows)`` -> (u, v, log α[rows]); see the module doc.

    Kept for the backward: V̂, the unnormalised weights E = exp(V̂ ⊙ â) and r = 1 / Σ_p E
    (α = E r: the normalisation is folded into the small (B, T, D) factors instead of a pass
    over E). With h = dL/dα, the softmax backward's Σ_p α h equals gu ⊙ u + gv ⊙ v, so no
    reduction over the patches is needed for it.
    """

    @staticmethod
    def forward(ctx, audio_key, visual_pre, tokens, rows):
        batch, frames, patches, dim = visual_pre.shape
        visual_key = torch.empty_like(visual_pre)
        weights = torch.empty_like(visual_pre)  # E
        u = visual_pre.new_empty(batch, frames, dim)
        v = visual_pre.new_empty(batch, frames, dim)
        step = _chunk_rows(visual_pre)
        scratch = visual_pre.new_empty(step, frames, patches, dim)
        for i, j in _chunks(batch, step):
            vk, e, tmp = visual_key[i:j], weights[i:j], scratch[:j - i]
            torch.tanh(visual_pre[i:j], out=vk)
            torch.mul(vk, audio_key[i:j, None, None, :], out=e)
            e.exp_()  # |score| <= 1: no max-subtraction needed
            torch.sum(torch.mul(e, vk, out=tmp), dim=2, out=u[i:j])
            torch.sum(torch.mul(e, tokens[i:j], out=tmp), dim=2, out=v[i:j])
        inverse_total = weights.sum(dim=2, keepdim=True).reciprocal_()  # r = 1 / Σ_p E, (B, T, 1, D)
        u.mul_(inverse_total.squeeze(2))
        v.mul_(inverse_total.squeeze(2))
        log_spatial = weights[rows].log_().add_(inverse_total[rows].log())  # α >= exp(-2) / P > 0
        ctx.save_for_backward(audio_key, visual_key, weights, inverse_total, tokens, rows, u, v)
        return u, v, log_spatial

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_u, grad_v, grad_log_spatial):
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("FusedSpatialAttention's backward reuses its saved buffers: it runs once "
                               "(retain_graph is not supported; use model.attention_kernel=reference)")
        ctx.backward_done = True
        audio_key, visual_key, weights, inverse_total, tokens, rows, u, v = ctx.saved_tensors
        batch, frames, patches, dim = visual_key.shape
        need_tokens = ctx.needs_input_grad[2]
        # ds = α (h - Σ_p α h) with h = gu V̂ + gv V, Σ_p α h = gu u + gv v; log α's gradient g adds
        # g - α Σ_p g. Everything per (t, d) is scaled by r here, once, so E stands in for α below.
        centre = grad_u * u + grad_v * v
        centre.index_add_(0, rows, grad_log_spatial.sum(dim=2))
        scale = inverse_total.squeeze(2)
        grad_u, grad_v = (grad_u * scale)[:, :, None, :], (grad_v * scale)[:, :, None, :]
        centre = (centre * scale)[:, :, None, :]
        grad_audio = audio_key.new_empty(batch, dim)
        # dL/dK overwrites V̂ chunk by chunk, after the chunk's last read of V̂: V̂'s memory is
        # already mapped, while a fresh (B, T, P, D) buffer page-faults on first touch
        grad_pre = visual_key
        grad_tokens = torch.empty_like(tokens) if need_tokens else None
        step = _chunk_rows(visual_key)
        work = visual_key.new_empty(step, frames, patches, dim)
        other = torch.empty_like(work)
        for i, j in _chunks(batch, step):
            vk, e, gu, gv = visual_key[i:j], weights[i:j], grad_u[i:j], grad_v[i:j]
            scores_grad, tmp = work[:j - i], other[:j - i]
            torch.mul(vk, gu, out=scores_grad)  # (h - Σ_p α h) r ...
            scores_grad.addcmul_(tokens[i:j], gv).sub_(centre[i:j])
            scores_grad.mul_(e)  # ... x E = ds
            in_chunk = ((rows >= i) & (rows < j)).nonzero().squeeze(1)
            if len(in_chunk):
                scores_grad.index_add_(0, rows[in_chunk] - i, grad_log_spatial[in_chunk])
            torch.sum(torch.mul(scores_grad, vk, out=tmp), dim=(1, 2), out=grad_audio[i:j])
            torch.mul(scores_grad, audio_key[i:j, None, None, :], out=tmp)  # dL/dV̂ = ds â + gu α
            tmp.addcmul_(e, gu)
            torch.mul(vk, vk, out=scores_grad)  # tanh backward: g (1 - V̂²) = g - g V̂²
            torch.addcmul(tmp, tmp, scores_grad, value=-1, out=grad_pre[i:j])
            if need_tokens:
                torch.mul(e, gv, out=grad_tokens[i:j])
        return grad_audio, grad_pre, grad_tokens, None
