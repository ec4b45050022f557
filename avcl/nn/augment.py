"""Batched image augmentations of (B, T, C, H, W) clips on [0, 1], one random draw per clip from torch's RNG (no
per-sample Python): torchvision's semantics re-implemented (torchvision is not a dependency). Used by XKD's views
(avcl.models.xkd) and the official linear-probe protocol's augmented views (avcl.eval.probe)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def grayscale(frames: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (torchvision's ``rgb_to_grayscale``) of (..., 3, H, W) -> (..., 1, H, W); grey input as is."""
    if frames.shape[-3] == 1:
        return frames
    r, g, b = frames.unbind(-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:  # torchvision's _rgb2hsv, (..., 3, H, W)
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(dim=-3).values, x.min(dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = ((maxc == r) * (bc - gc) + ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
         + ((maxc != g) & (maxc != r)) * (4.0 + gc - rc))
    return torch.stack([(h / 6.0 + 1.0) % 1.0, s, maxc], dim=-3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:  # torchvision's _hsv2rgb
    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    table = torch.stack([torch.stack(c, dim=-1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], dim=-1)  # (..., 3, 6)
    rgb = table.gather(-1, i[..., None, None].expand(*i.shape, 3, 1)).squeeze(-1)  # (..., H, W, 3)
    return rgb.movedim(-1, -3)


def color_jitter(frames: torch.Tensor, strength) -> torch.Tensor:
    """torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` on (B, T, C, H, W) frames on [0, 1]:
    factors U(max(0, 1 - s), 1 + s) (hue: a shift U(-s, s)) drawn per clip, the same for its frames; the four
    in one random order per batch (torchvision: per call); contrast blends with each frame's mean luma.
    Saturation and hue act on RGB only."""
    brightness, contrast, saturation, hue = (list(strength) + [0.0] * 4)[:4]
    b, dev = frames.shape[0], frames.device
    rgb = frames.shape[2] == 3

    def factor(s):
        return torch.empty(b, 1, 1, 1, 1, device=dev).uniform_(max(0.0, 1 - s), 1 + s)

    for op in torch.randperm(4).tolist():
        if op == 0 and brightness > 0:
            frames = (frames * factor(brightness)).clamp(0.0, 1.0)
        elif op == 1 and contrast > 0:
            mean = grayscale(frames).mean(dim=(-3, -2, -1), keepdim=True)
            c = factor(contrast)
            frames = (c * frames + (1 - c) * mean).clamp(0.0, 1.0)
        elif op == 2 and saturation > 0 and rgb:
            c = factor(saturation)
            frames = (c * frames + (1 - c) * grayscale(frames)).clamp(0.0, 1.0)
        elif op == 3 and hue > 0 and rgb:
            shift = torch.empty(b, 1, 1, 1, device=dev).uniform_(-hue, hue)
            hsv = _rgb_to_hsv(frames)
            hsv = torch.stack([(hsv[:, :, 0] + shift) % 1.0, hsv[:, :, 1], hsv[:, :, 2]], dim=2)
            frames = _hsv_to_rgb(hsv)
    return frames


def gaussian_blur(frames: torch.Tensor, kernel: int, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian blur of side ``kernel`` with one sigma (B,) per clip, reflect padding (torchvision's
    ``gaussian_blur``) of (B, T, C, H, W) frames: two grouped convolutions."""
    b, t, c, h, w = frames.shape
    half = (kernel - 1) / 2
    xs = torch.linspace(-half, half, kernel, device=frames.device)
    k1 = torch.exp(-0.5 * (xs[None] / sigma[:, None]) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(t * c, dim=0)  # (B*T*C, k)
    x = frames.reshape(1, b * t * c, h, w)
    pad = kernel // 2
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), k1[:, None, None, :], groups=b * t * c)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), k1[:, None, :, None], groups=b * t * c)
    return x.view(b, t, c, h, w)


def random_resized_crop(frames: torch.Tensor, out_hw: tuple[int, int], scale: tuple[float, float],
                        flip: float) -> torch.Tensor:
    """A random square crop per clip (the same for its frames) of area fraction U(scale), anywhere inside
    the frame, resized bilinearly to ``out_hw``, flipped horizontally with probability ``flip``.
    (B, T, C, H, W) -> (B, T, C, *out_hw); one batched ``F.grid_sample``."""
    b, t, c, h, w = frames.shape
    dev = frames.device
    area = torch.empty(b, device=dev).uniform_(scale[0], scale[1])
    side = area.sqrt()  # fraction of the frame side
    shift = (1 - side)[:, None] * (torch.rand(b, 2, device=dev) * 2 - 1)
    sign = torch.where(torch.rand(b, device=dev) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0] = side * sign
    theta[:, 1, 1] = side
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [b, t * c, *out_hw], align_corners=False)
    out = F.grid_sample(frames.reshape(b, t * c, h, w), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(b, t, c, *out_hw)
