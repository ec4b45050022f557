"""STELLA's AVM module (STELLA's ``models/avm_module.py``): one bidirectional cross-attention layer and a matching head.

On the fusion-layer outputs f_a (B, L_a, D) and f_v (B, L_v, D) of the backbone's joint pass
(``CAVModel.fuse``): separate LayerNorms per modality, W_q / W_k / W_v per modality (D -> D, no
bias, the backbone's heads, head dim D / heads); audio queries attend to video keys/values and
video queries to audio keys/values; the matching head is Linear(2D, 2D) + tanh + Linear(2D, 1) on
[mean over tokens of the video-query outputs; mean of the audio-query outputs].

Deviation: the official code flattens the (B, H, L, dh) attention outputs to (B, L, H*dh) without
moving the head axis first, so its "mean over tokens" mixes heads and tokens; here the outputs are
averaged over the tokens of each head (= the mean of the properly merged (B, L, D) outputs).
Initialisation as the code: Linear weights N(0, 0.02), zero biases.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avcl.nn.vit import init_vit_weights


MODALITIES = ("audio", "video")


class AVMModule(nn.Module):
    """``attention_logits(f_a, f_v)`` -> per-head q_a, k_a, q_v, k_v (B, H, L, dh) for STELLA's scores
    (the code's ``extract_multimodal_relationship``: S_av = q_a k_vᵀ * scale);
    ``match_logit(f_a, f_v)`` -> (B,) matching logits."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.ModuleDict({m: nn.LayerNorm(dim) for m in MODALITIES})
        self.to_q = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in MODALITIES})
        self.to_k = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in MODALITIES})
        self.to_v = nn.ModuleDict({m: nn.Linear(dim, dim, bias=False) for m in MODALITIES})
        self.matching = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, 1))
        init_vit_weights(self)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, dh)

    def attention_logits(self, f_a: torch.Tensor, f_v: torch.Tensor) -> dict[str, torch.Tensor]:
        a, v = self.norm["audio"](f_a), self.norm["video"](f_v)
        return {"q_a": self._heads(self.to_q["audio"](a)), "k_a": self._heads(self.to_k["audio"](a)),
                "q_v": self._heads(self.to_q["video"](v)), "k_v": self._heads(self.to_k["video"](v))}

    def match_logit(self, f_a: torch.Tensor, f_v: torch.Tensor) -> torch.Tensor:
        a, v = self.norm["audio"](f_a), self.norm["video"](f_v)
        q_a, k_a, v_a = (self._heads(proj["audio"](a)) for proj in (self.to_q, self.to_k, self.to_v))
        q_v, k_v, v_v = (self._heads(proj["video"](v)) for proj in (self.to_q, self.to_k, self.to_v))
        out_a = F.scaled_dot_product_attention(q_a, k_v, v_v)  # audio queries over video (B, H, L_a, dh)
        out_v = F.scaled_dot_product_attention(q_v, k_a, v_a)  # video queries over audio (B, H, L_v, dh)
        b = f_a.shape[0]
        pooled = torch.cat([out_v.mean(dim=2).reshape(b, -1), out_a.mean(dim=2).reshape(b, -1)], dim=1)
        return self.matching(pooled).squeeze(-1)

    forward = match_logit


def matching_pairs(batch: int, device=None, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The AVM task's pairs (as the STELLA code's AVM training): (labels (B,) float, video_index (B,) long).

    ``batch // 2`` random rows keep their own video (label 1); the others (label 0) get the video of
    another negative row: the negatives, in random order, take their successor's video (one random
    cycle, a derangement of the negatives; vectorised). With B <= 2 every pair is positive (as the code).
    """
    index = torch.arange(batch, device=device)
    labels = torch.ones(batch, device=device)
    if batch <= 2:
        return labels, index
    negatives = torch.randperm(batch, device=device, generator=generator)[batch // 2:]
    labels[negatives] = 0.0
    index[negatives] = negatives.roll(-1)
    return labels, index
