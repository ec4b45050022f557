"""AV-CIL's audio-guided spatial attention (specs/supervised_methods.md 1.4), two implementations.

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
    """``apply(audio_key, visual_pre, tokens, rows)`` -> (u, v, log α[rows]); see the module doc."""

    @staticmethod
    def forward(ctx, audio_key, visual_pre, tokens, rows):
        batch, frames, patches, dim = visual_pre.shape
        visual_key = torch.empty_like(visual_pre)
        spatial = torch.empty_like(visual_pre)
        u = visual_pre.new_empty(batch, frames, dim)
        v = visual_pre.new_empty(batch, frames, dim)
        step = _chunk_rows(visual_pre)
        scratch = visual_pre.new_empty(step, frames, patches, dim)
        for i, j in _chunks(batch, step):
            vk, alpha, tmp = visual_key[i:j], spatial[i:j], scratch[:j - i]
            torch.tanh(visual_pre[i:j], out=vk)
            torch.mul(vk, audio_key[i:j, None, None, :], out=alpha)
            alpha.exp_()  # |score| <= 1: no max-subtraction needed
            alpha.div_(alpha.sum(dim=2, keepdim=True))
            torch.sum(torch.mul(alpha, vk, out=tmp), dim=2, out=u[i:j])
            torch.sum(torch.mul(alpha, tokens[i:j], out=tmp), dim=2, out=v[i:j])
        log_spatial = spatial[rows].log()  # α >= exp(-2) / P > 0
        ctx.save_for_backward(audio_key, visual_key, spatial, tokens, rows)
        return u, v, log_spatial

    @staticmethod
    def backward(ctx, grad_u, grad_v, grad_log_spatial):
        audio_key, visual_key, spatial, tokens, rows = ctx.saved_tensors
        batch, frames, patches, dim = visual_key.shape
        need_tokens = ctx.needs_input_grad[2]
        grad_audio = audio_key.new_zeros(batch, dim)
        grad_pre = torch.empty_like(visual_key)
        grad_tokens = torch.empty_like(tokens) if need_tokens else None
        grad_u, grad_v = grad_u[:, :, None, :], grad_v[:, :, None, :]  # materialised by autograd
        # d log α / d α = 1 / α: route log α's gradient through α, then one softmax backward for all
        grad_alpha_rows = grad_log_spatial / spatial[rows]
        step = _chunk_rows(visual_key)
        work = visual_key.new_empty(step, frames, patches, dim)
        other = torch.empty_like(work)
        for i, j in _chunks(batch, step):
            vk, alpha, gu, gv = visual_key[i:j], spatial[i:j], grad_u[i:j], grad_v[i:j]
            grad_alpha, tmp = work[:j - i], other[:j - i]
            torch.mul(vk, gu, out=grad_alpha)  # dL/dα = gu V̂ + gv V (+ the log α term)
            grad_alpha.addcmul_(tokens[i:j], gv)
            in_chunk = ((rows >= i) & (rows < j)).nonzero().squeeze(1)
            if len(in_chunk):
                grad_alpha.index_add_(0, rows[in_chunk] - i, grad_alpha_rows[in_chunk])
            torch.mul(alpha, grad_alpha, out=tmp)  # softmax backward: ds = α (dα - Σ_p α dα)
            tmp.addcmul_(alpha, tmp.sum(dim=2, keepdim=True), value=-1)
            scores_grad = tmp
            torch.sum(torch.mul(scores_grad, vk, out=grad_alpha), dim=(1, 2), out=grad_audio[i:j])
            torch.mul(scores_grad, audio_key[i:j, None, None, :], out=grad_alpha)  # dL/dV̂
            grad_alpha.addcmul_(alpha, gu)
            torch.mul(vk, vk, out=tmp)  # tanh backward: g (1 - V̂²) = g - g V̂²
            torch.addcmul(grad_alpha, grad_alpha, tmp, value=-1, out=grad_pre[i:j])
            if need_tokens:
                torch.mul(alpha, gv, out=grad_tokens[i:j])
        return grad_audio, grad_pre, grad_tokens, None
