"""Self-distillation pieces (DINO; XKD's ``models/modules/projector.py``,
``cross_modal_attn`` and ``align_feats``): the projection head and the teacher's
attention-based feature refinement. The losses are in ``avcl.nn.losses`` (``dino_cross_entropy``,
``update_center``, ``gaussian_mmd``), the EMA schedule in ``avcl.nn.ema`` (``cosine_momentum``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


REFINE_MODES = ("mean", "softmax", "none")


class WeightNormLinear(nn.Module):
    """A bias-free Linear whose rows are normalised to unit norm (weight norm with the gain fixed to 1,
    DINO's ``last_layer`` with ``norm_last_layer=True``)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim_out, dim_in))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """XKD's projector (``models/modules/projector.py``): MLP dim -> hidden -> hidden -> bottleneck
    (LayerNorm + GELU after the
    hidden layers), L2-normalise, weight-normalised Linear bottleneck -> out_dim (gain fixed to 1), then a
    non-affine LayerNorm on the out_dim logits."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, out_dim: int, shared_norm: bool = True):
        super().__init__()
        norm = nn.LayerNorm(hidden)
        # shared_norm: the code builds one LayerNorm and appends it after both hidden layers (one set of weights)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), norm, nn.GELU(),
                                 nn.Linear(hidden, hidden), norm if shared_norm else nn.LayerNorm(hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim)
        self.out_norm = nn.LayerNorm(out_dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.out_norm(self.last_layer(x))


def refine_weights(attn_self: torch.Tensor, attn_other: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Token weights (B, N) of one modality from the teachers' last-layer CLS->patch attention (XKD's ``cross_modal_attn``).

    ``attn_self`` (B, H, N): this modality's attention over its N patches (CLS column removed);
    ``attn_other`` (B, H, M): the other modality's. Per head, the code's cross-modal reweighting
    (the mean of the outer product of the two attention vectors, divided by this modality's mean
    attention) is ``attn_self[j] * mean_i attn_other[i] / mean_j attn_self[j]``; the weights are the head
    average. ``mode="softmax"`` (the code's ``align_feats`` softmax branch): per head a softmax over the patches of
    ``attn_self[j] * mean_i attn_other[i]`` (no division by this modality's mean), then the head average;
    ``"none"``: all ones (plain mean pooling).
    """
    if mode not in REFINE_MODES:
        raise ValueError(f"refine mode must be one of {REFINE_MODES}, got {mode!r}")
    if mode == "none":
        return torch.ones(attn_self.shape[0], attn_self.shape[2], device=attn_self.device)
    a, o = attn_self.float(), attn_other.float()
    if mode == "softmax":
        return (a * o.mean(dim=2, keepdim=True)).softmax(dim=2).mean(dim=1)
    scaled = a * (o.mean(dim=2, keepdim=True) / a.mean(dim=2, keepdim=True).clamp_min(1e-12))
    return scaled.mean(dim=1)  # (B, N)


def refined_pool(tokens: torch.Tensor, weights: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean of the refined tokens s * w_j * x_j (tokens (B, N, D), weights (B, N)) with XKD's
    energy-preserving scale s = ||mean_j x_j|| / ||mean_j w_j x_j||: the pooled vector points along the
    weighted mean and has the norm of the plain mean (XKD's ``align_feats``)."""
    plain = tokens.mean(dim=1)
    weighted = (tokens * weights.to(tokens.dtype)[:, :, None]).mean(dim=1)
    scale = plain.float().norm(dim=1, keepdim=True) / weighted.float().norm(dim=1, keepdim=True).clamp_min(eps)
    return weighted * scale.to(weighted.dtype)
