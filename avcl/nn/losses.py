"""Self-supervised losses shared by the pre-training methods (CAV-MAE's, spec A.3; XKD's MAE)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def normalized_patch_mse(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool = True,
                         mask: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """MAE's reconstruction loss per row: (B,) = mean over patches of the per-patch mean squared error.

    ``pred``, ``target`` (B, k, P): predictions and raw patch values of the k target patches.
    ``norm_pix``: targets normalised per patch, (t - mean) / sqrt(var + eps) with the unbiased variance
    (MAE's ``norm_pix_loss``). ``mask`` (B, k), optional: only the patches where it is true/non-zero
    count (a row without any gives 0). The mean of the rows equals MAE's mean over all target patches
    when every row has the same number of targets.
    """
    target = target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, k)
    if mask is None:
        return per_patch.mean(dim=1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float, reduction: str = "mean",
             normalize: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (B, D) (spec A.3).

    Row i's term is ½[-log softmax_j(a_i·b_j/τ)_i - log softmax_j(b_i·a_j/τ)_i]; ``reduction="mean"``
    averages the rows (the spec's L_NCE), ``"none"`` returns the (B,) terms. ``normalize``: L2-normalise
    the rows first (the CAV-MAE/STELLA setting).
    """
    with torch.autocast(device_type=a.device.type, enabled=False):  # float32 logits: tau is small
        a, b = a.float(), b.float()
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        logits = a @ b.t() / temperature
        labels = torch.arange(len(a), device=a.device)
        rows = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                      + F.cross_entropy(logits.t(), labels, reduction="none"))
    if reduction == "none":
        return rows
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return rows.mean()
