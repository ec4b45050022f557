"""Shared ViT machinery: pre-norm transformer blocks, sin-cos positional embeddings, patching,
random masking, token gathering and the size presets of ``model.vit``.

Every transformer model of avcl (the CAV backbone, later XKD) builds on these pieces:

* ``Block``: pre-norm block (LN -> multi-head self-attention -> residual, LN -> MLP -> residual),
  attention through ``F.scaled_dot_product_attention``; parameter names follow timm/MAE
  (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) so that ImageNet
  MAE weights map one to one. ``modes`` adds extra LayerNorm pairs selected per call (CAV-MAE's
  shared fusion layers: one pair for the joint pass, one per modality-specific pass).
* ``sincos_2d``: MAE's fixed 2-D sin-cos table (first half of the channels encodes the column
  index, second half the row index), row-major token order.
* ``patchify_2d``: (..., C, H, W) -> (..., h*w, ph*pw*C), MAE's patch layout (row-major patches,
  values ordered (pixel row, pixel column, channel)).
* ``random_masking`` / ``split_selected``: per-row random permutations (argsort of uniform noise),
  vectorised over the batch; ``gather_tokens``: rows of a token tensor at per-row ids.
* ``ViTConfig`` (the options of ``model.vit``) and ``resolve_size``: the tiny / small / base presets, any
  field overridable in ``model.vit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option


LN_EPS = 1e-5  # torch's default, as both official codes (XKD's vit2.py, STELLA's cav.py: nn.LayerNorm)


# ----- sizes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTSize:
    width: int
    depth: int  # modality-specific layers per modality
    fusion_depth: int  # shared layers after them
    heads: int
    decoder_width: int
    decoder_depth: int
    decoder_heads: int
    mlp_ratio: float = 4.0

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass
class ViTConfig:
    """A ViT backbone: a size preset (tiny for CPUs, base = ViT-B as the papers), any field overridable."""
    size: str = option("tiny", choices=("tiny", "small", "base"))  # tiny | small | base
    width: Optional[int] = option(None, range=">=1")  # None: the preset's value (and likewise below)
    depth: Optional[int] = option(None, range=">=1")  # modality-specific layers per modality
    fusion_depth: Optional[int] = option(None, range=">=0")  # shared layers after them
    heads: Optional[int] = option(None, range=">=1")
    decoder_width: Optional[int] = option(None, range=">=1")
    decoder_depth: Optional[int] = option(None, range=">=1")
    decoder_heads: Optional[int] = option(None, range=">=1")
    mlp_ratio: float = option(4.0, range=">0")
    video_patch: int = option(16, range=">=1")  # side of the square per-frame patches, pixels
    audio_patch: List[int] = option(factory=lambda: [16, 16], range=">=1")  # [time frames, mel bins]
    frames: int = option(4, range=">=1")  # video frames per clip, sampled uniformly over the window
    video_window: Optional[int] = option(None, range=">=1")  # consecutive frames the window spans; None: the whole clip
    crop_scales: List[float] = option(factory=lambda: [1.0, 0.875, 0.75], range="(0,1]")  # train-time crops
    audio_frames: Optional[int] = option(None, range=">=1")  # fbank frames a clip is padded/cut to; None: as the data
    checkpoint: Optional[str] = None  # ImageNet MAE ViT-B weights: a .pth file or an HF ViTMAEModel dir


SIZE_PRESETS: dict[str, ViTSize] = {
    "tiny": ViTSize(width=192, depth=4, fusion_depth=1, heads=3, decoder_width=128, decoder_depth=2, decoder_heads=4),
    "small": ViTSize(width=384, depth=6, fusion_depth=1, heads=6, decoder_width=256, decoder_depth=4, decoder_heads=8),
    # ViT-B as FLAVA/STELLA: 10 modality-specific + 2 shared layers, MAE's 512 x 8 x 16 decoder
    "base": ViTSize(width=768, depth=10, fusion_depth=2, heads=12, decoder_width=512, decoder_depth=8,
                    decoder_heads=16),
}


def resolve_size(vit_cfg) -> ViTSize:
    """The preset ``model.vit.size`` with every non-None field of ``model.vit`` taking precedence."""
    size = getattr(vit_cfg, "size", "tiny")
    if size not in SIZE_PRESETS:
        raise AvclError(f"model.vit.size must be one of {list(SIZE_PRESETS)}, got '{size}'")
    values = {}
    for f in fields(ViTSize):
        given = getattr(vit_cfg, f.name, None)
        values[f.name] = getattr(SIZE_PRESETS[size], f.name) if given is None else given
    out = ViTSize(**values)
    for key in ("width", "heads", "decoder_width", "decoder_heads"):
        if getattr(out, key) < 1:
            raise AvclError(f"model.vit.{key} must be >= 1, got {getattr(out, key)}")
    for key in ("depth", "fusion_depth", "decoder_depth"):
        if getattr(out, key) < 0:
            raise AvclError(f"model.vit.{key} must be >= 0, got {getattr(out, key)}")
    for width, heads in (("width", "heads"), ("decoder_width", "decoder_heads")):
        if getattr(out, width) % getattr(out, heads):
            raise AvclError(f"model.vit.{width}={getattr(out, width)} is not divisible by "
                            f"model.vit.{heads}={getattr(out, heads)}")
        if getattr(out, width) % 4:
            raise AvclError(f"model.vit.{width}={getattr(out, width)} must be a multiple of 4 "
                            "(2-D sin-cos positional embeddings)")
    if out.mlp_ratio <= 0:
        raise AvclError(f"model.vit.mlp_ratio must be > 0, got {out.mlp_ratio}")
    return out


# ----- blocks ------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; SDPA does the attention."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, dh)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The attention of token 0 (CLS) over all tokens, per head: (B, H, N) (rows sum to 1), computed
        from the same (normalised) input ``forward`` gets (DINO's ``get_last_selfattention``, row 0)."""
        b, n, d = x.shape
        q, k, _ = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q[:, :, :1].float() @ k.float().transpose(-2, -1)).squeeze(2) / (d // self.heads) ** 0.5
        return logits.softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block. ``modes``: names of extra (norm1, norm2) pairs; ``forward(x, mode)``
    uses that pair instead of the default one (CAV-MAE's modality-specific LNs in the shared layers)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, modes: Sequence[str] = (),
                 qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.mode_norms = nn.ModuleDict({
            m: nn.ModuleDict({"norm1": nn.LayerNorm(dim, eps=LN_EPS), "norm2": nn.LayerNorm(dim, eps=LN_EPS)})
            for m in modes})

    def forward(self, x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        if mode is None:
            norm1, norm2 = self.norm1, self.norm2
        else:
            norm1, norm2 = self.mode_norms[mode]["norm1"], self.mode_norms[mode]["norm2"]
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    for block in blocks:
        x = block(x, mode)
    return x


LINEAR_INITS = ("normal", "xavier")


def init_vit_weights(module: nn.Module, std: float = 0.02, linear: str = "normal") -> None:
    """Every Linear ~ N(0, std) (``linear="normal"``: FLAVA's) or xavier-uniform (``"xavier"``: MAE's and XKD's
    ``_init_weights``, "following official JAX ViT") with zero bias, LayerNorms to (1, 0)."""
    if linear not in LINEAR_INITS:
        raise ValueError(f"linear init must be one of {LINEAR_INITS}, got {linear!r}")
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if linear == "xavier":
                nn.init.xavier_uniform_(layer.weight)
            else:
                nn.init.normal_(layer.weight, std=std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.LayerNorm) and layer.weight is not None:  # (non-affine LNs have none)
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


# ----- positional embeddings -------------------------------------------------------------------
def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(p * w_k), cos(p * w_k)], w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, rows: int, cols: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table for a rows x cols grid in row-major token order: (rows*cols, dim) float32."""
    if dim % 4:
        raise AvclError(f"2-D sin-cos positional embeddings need a width divisible by 4, got {dim}")
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, c.flatten()), sincos_1d(dim // 2, r.flatten())], dim=1).float()


# ----- patching --------------------------------------------------------------------------------
def patchify_2d(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(..., C, H, W) -> (..., (H/ph)*(W/pw), ph*pw*C): row-major patches, values in (row, col, channel)
    order (MAE's layout). H and W must be multiples of the patch sides."""
    *lead, c, height, width = x.shape
    ph, pw = patch
    h, w = height // ph, width // pw
    n = len(lead)
    x = x.reshape(*lead, c, h, ph, w, pw)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # (..., h, w, ph, pw, C)
    return x.reshape(*lead, h * w, ph * pw * c)


def unpatchify_2d(x: torch.Tensor, patch: tuple[int, int], grid: tuple[int, int], channels: int) -> torch.Tensor:
    """The inverse of ``patchify_2d``: (..., h*w, ph*pw*C) -> (..., C, h*ph, w*pw)."""
    *lead, _, _ = x.shape
    ph, pw = patch
    h, w = grid
    n = len(lead)
    x = x.reshape(*lead, h, w, ph, pw, channels)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)  # (..., C, h, ph, w, pw)
    return x.reshape(*lead, channels, h * ph, w * pw)


def patchify_frames(video: torch.Tensor, patch: int) -> torch.Tensor:
    """Per-frame 2-D patches: (B, T, C, H, W) -> (B, T*h*w, p*p*C), tokens in (frame, row, col) order."""
    b, t = video.shape[:2]
    out = patchify_2d(video, (patch, patch))  # (B, T, h*w, P)
    return out.reshape(b, t * out.shape[2], out.shape[3])


def patchify_tubelets(video: torch.Tensor, tubelet: tuple[int, int, int]) -> torch.Tensor:
    """Spatio-temporal tubelets: (B, T, C, H, W) -> (B, (T/pt)*(H/ph)*(W/pw), pt*ph*pw*C), tokens in
    (time, row, col) order, values in (frame, pixel row, pixel column, channel) order. T, H and W must be
    multiples of the tubelet sides (XKD's video tokenizer, as its ``xkd.yaml``)."""
    b, t, c, height, width = video.shape
    pt, ph, pw = tubelet
    x = video.reshape(b, t // pt, pt, c, height // ph, ph, width // pw, pw)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, t, h, w, pt, ph, pw, C)
    return x.reshape(b, (t // pt) * (height // ph) * (width // pw), pt * ph * pw * c)


def resize_pos_embed(table: torch.Tensor, grid: Sequence[int], new_grid: Sequence[int],
                     offset: float = 0.0, offset_axes: Optional[Sequence[bool]] = None) -> torch.Tensor:
    """A positional table (1, prod(grid), D) for a token grid, interpolated to ``new_grid``: trilinear for
    3-D grids (video tubelets), bicubic for 2-D grids (audio patches), as XKD's official code. Returned as is
    when the grids are equal; differentiable.

    ``offset=0``: interpolation by output size. ``offset>0``: DINO's shifted scale factor, as XKD's
    ``interpolate_pos_encoding`` (``vit_video.py``, ``vit_audio.py``): axis i is resized by the scale factor
    (n_i + offset) / N_i where ``offset_axes[i]`` (default: every axis) and n_i / N_i elsewhere; the output keeps
    n_i entries (floor), but the sampling positions follow the shifted scale."""
    grid, new_grid = tuple(grid), tuple(new_grid)
    if grid == new_grid:
        return table
    d = table.shape[-1]
    x = table.reshape(1, *grid, d).movedim(-1, 1)  # (1, D, *grid)
    mode = {2: "bicubic", 3: "trilinear"}[len(grid)]
    if offset > 0:
        axes = [True] * len(grid) if offset_axes is None else list(offset_axes)
        scale = tuple((n + offset) / big if shift else n / big for n, big, shift in zip(new_grid, grid, axes))
        x = F.interpolate(x.float(), scale_factor=scale, mode=mode, align_corners=False)
        if tuple(x.shape[2:]) != new_grid:  # n / N can floor to n - 1 on an unshifted axis
            raise AvclError(f"positional interpolation {grid} -> {new_grid} with offset {offset} gave "
                            f"{tuple(x.shape[2:])}")
        x = x.to(table.dtype)
    else:
        x = F.interpolate(x.float(), size=new_grid, mode=mode, align_corners=False).to(table.dtype)
    return x.movedim(1, -1).reshape(1, -1, d)


# ----- masking and gathering -------------------------------------------------------------------
KEEP_ROUNDING = ("floor", "round")


def visible_count(length: int, mask_ratio: float, rounding: str = "floor") -> int:
    """The visible tokens of ``length`` at ``mask_ratio``. ``rounding="floor"`` (CAV/STELLA): floor((1 - mask_ratio)
    * length) with a 1e-6 guard against float round-off (50 at 0.8 is 10, where MAE's and STELLA's
    ``int(L * (1 - mask_ratio))`` give 9 as 1 - 0.8 is 0.1999...); ``"round"``: Python's ``round`` of it, as XKD's
    ``mask.py`` (59 of 392 at 0.85, where floor gives 58)."""
    if rounding not in KEEP_ROUNDING:
        raise ValueError(f"rounding must be one of {KEEP_ROUNDING}, got {rounding!r}")
    if rounding == "round":
        return int(round(length * (1.0 - mask_ratio)))
    return int(math.floor((1.0 - mask_ratio) * length + 1e-6))


def random_masking(batch: int, length: int, keep: int, device=None,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row random split of ``length`` token ids: (keep_ids (B, keep), target_ids (B, length - keep)),
    each row an independent uniform permutation (argsort of uniform noise)."""
    order = torch.rand(batch, length, device=device, generator=generator).argsort(dim=1)
    return order[:, :keep], order[:, keep:]


def split_selected(selected: torch.Tensor, keep: int,
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``keep``-subset of each row of ``selected`` (B, K) ids and the rest: ((B, keep), (B, K - keep))."""
    local_keep, local_rest = random_masking(selected.shape[0], selected.shape[1], keep, selected.device, generator)
    return selected.gather(1, local_keep), selected.gather(1, local_rest)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (B, k) of the tokens ``x`` (B, L, ...) -> (B, k, ...). ``x`` may have a batch dim of 1
    (a positional table), indexed without expanding it."""
    if x.shape[0] == 1 and ids.shape[0] != 1:  # embedding lookup: a much faster backward than indexing
        return F.embedding(ids, x[0].reshape(x.shape[1], -1)).view(*ids.shape, *x.shape[2:])
    index = ids.reshape(*ids.shape, *([1] * (x.dim() - 2))).expand(*ids.shape, *x.shape[2:])
    return x.gather(1, index)


def read_clip_geometry(module, model_name: str, vit, example) -> None:
    """Set ``module``'s clip geometry from an example batch (``{"video": uint8 frames, "audio": fbank}``) and
    ``model.vit``: channels, data_frames, frame_size, mel_bins, audio_frames and the sampling window,
    refusing data or a config that do not fit (AvclError naming the model and key)."""
    for key in ("audio", "video"):
        if key not in example:
            raise AvclError(f"model.name={model_name} needs '{key}' in the data; the dataset has {sorted(example)}")
    video, audio = example["video"], example["audio"]
    if video.dim() == 4:
        module.channels = 1
    elif video.dim() == 5 and video.shape[-1] == 3:
        module.channels = 3
    else:
        raise AvclError(f"model.name={model_name} needs 'video' as (N, T, H, W) gray or (N, T, H, W, 3) RGB frames, "
                        f"got shape {tuple(video.shape)}")
    if audio.dim() != 3:
        raise AvclError(f"model.name={model_name} needs 'audio' as (N, frames, mel_bins) fbank, "
                        f"got shape {tuple(audio.shape)}")
    module.data_frames, height, width = video.shape[1:4]
    module.frame_size = (height, width)
    module.mel_bins = audio.shape[2]
    module.audio_frames = vit.audio_frames or audio.shape[1]
    module.window = vit.video_window or module.data_frames
    if not 1 <= vit.frames <= module.window <= module.data_frames:
        raise AvclError(f"model.vit: need 1 <= frames ({vit.frames}) <= video_window ({module.window}) <= the clips' "
                        f"frames ({module.data_frames})")
