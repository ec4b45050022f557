"""Self-supervised losses shared by the pre-training methods (CAV-MAE's, FLAVA/STELLA's ``models/objectives.py``;
XKD's MAE, DINO cross-entropy with teacher centring and Gaussian-kernel MMD, XKD's ``models/modules/loss.py``)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from avcl import parallel


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
    """Symmetric InfoNCE between paired rows of ``a`` and ``b`` (B, D) (FLAVA/STELLA's ``models/objectives.py``).

    Row i's term is ½[-log softmax_j(a_i·b_j/τ)_i - log softmax_j(b_i·a_j/τ)_i]; ``reduction="mean"``
    averages the rows (the code's contrastive loss), ``"none"`` returns the (B,) terms. ``normalize``: L2-normalise
    the rows first (the CAV-MAE/STELLA setting).
    """
    with torch.autocast(device_type=a.device.type, enabled=False):  # float32 logits: tau is small
        a, b = a.float(), b.float()
        if normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if parallel.is_gathering():  # several processes: every rank's rows are negatives (as the STELLA code)
            a_all, offset = parallel.all_rows(a)
            b_all, _ = parallel.all_rows(b)
            labels = offset + torch.arange(len(a), device=a.device)
            rows = 0.5 * (F.cross_entropy(a @ b_all.t() / temperature, labels, reduction="none")
                          + F.cross_entropy(b @ a_all.t() / temperature, labels, reduction="none"))
        else:
            logits = a @ b.t() / temperature
            labels = torch.arange(len(a), device=a.device)
            rows = 0.5 * (F.cross_entropy(logits, labels, reduction="none")
                          + F.cross_entropy(logits.t(), labels, reduction="none"))
    if reduction == "none":
        return rows
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return rows.mean()


def dino_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                       student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's cross-entropy with teacher centring (XKD's ``models/modules/loss.py``), averaged over all view pairs.

    ``student`` (Vs, B, K) logits of Vs student views, ``teacher`` (Vt, B, K) of Vt teacher views
    (detached here), ``center`` (K,). p_T = softmax((g_T - c) / teacher_temp),
    log p_S = log_softmax(g_S / student_temp); the loss is the mean over the Vt x Vs pairs (no pair
    skipped: in XKD the two sides are different modalities) of the batch mean of -sum_k p_T log p_S.
    Computed in float32.
    """
    with torch.autocast(device_type=student.device.type, enabled=False):
        p_t = ((teacher.detach().float() - center.float()) / teacher_temp).softmax(dim=-1)  # (Vt, B, K)
        log_p_s = (student.float() / student_temp).log_softmax(dim=-1)  # (Vs, B, K)
        # sum over pairs of sum_k p_T log p_S = einsum over views, batch and classes
        total = torch.einsum("tbk,sbk->", p_t, log_p_s)
        return -total / (p_t.shape[0] * log_p_s.shape[0] * p_t.shape[1])


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float = 0.9) -> None:
    """DINO's centre update in place: c <- momentum * c + (1 - momentum) * mean of the teacher logits over
    every row of every view (``teacher`` (..., K)); with several processes the mean over every rank's
    rows (all-reduced, as XKD's code), so every replica keeps the same centre."""
    mean = parallel.mean_rows(teacher.detach().float().reshape(-1, teacher.shape[-1]).mean(dim=0))
    center.mul_(momentum).add_(mean.to(center.dtype), alpha=1 - momentum)


MMD_GAMMAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3)


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, gammas=MMD_GAMMAS) -> torch.Tensor:
    """Biased (V-statistic) MMD^2 between the rows of ``x`` (N, D) and ``y`` (M, D) with the kernel
    k(a, b) = sum_gamma exp(-gamma ||a - b||^2) (XKD's DomainBed ``MMD_Loss``, ``models/modules/loss.py``):
    mean k(x, x') + mean k(y, y') - 2 mean k(x, y). Squared distances in float32, clamped at 0."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.float(), y.float()
        z = torch.cat([x, y])
        sq = z.pow(2).sum(dim=1)
        dist = (sq[:, None] + sq[None, :] - 2 * z @ z.T).clamp_min(0)  # (N+M, N+M)
        kernel = sum(torch.exp(-g * dist) for g in gammas)
        n = len(x)
        return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()
