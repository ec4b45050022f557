"""XKD: masked reconstruction with cross-modal knowledge distillation and domain alignment
(Sarkar & Etemad, AAAI 2024; official code ``pritamqu/XKD``): ``model.name=xkd``.

Label-free (``label_free = True``). One file gives the three models of the paper by ``model.xkd.share``:

* ``none`` (XKD): a video student and an audio student, each a ViT (CLS token, learnable positional
  embedding, ``vit.depth + vit.fusion_depth`` pre-norm blocks, final LN) with its DINO head;
* ``students`` (XKD-MAS): one transformer stack shared by both students (and so by both MAE encoders);
  tokenizers, positional embeddings, CLS tokens, final LNs, heads and decoders stay per modality;
  the teachers stay two EMA copies (both of the one shared stack, XKD's ``xkd_mas.py``);
* ``all`` (XKD-MATS): the teachers' stack is shared too; the EMA loops over both modalities, so a shared
  teacher block gets two updates per step (momentum m^2, the code; ``xkd.mats_ema=once``: m).

Inputs (``views``): from a clip's gray (N, T, H, W) or RGB (N, T, H, W, 3) uint8 frames and (N, frames, mel)
fbank: the *global* video view = ``vit.frames`` frames uniformly over a ``vit.video_window`` window
(random start; centred in evaluation), a random resized crop of area ``xkd.global_crop_scale`` resized back
to H x W, flip ``xkd.flip``; the *local* video views (``xkd.local_views_video``) = ``xkd.local_frames``
consecutive frames at the global view's frame stride from a random start, a random crop of area
``xkd.local_crop_scale`` resized to ``xkd.local_size``; every video view then gets colour jitter, greyscale and
Gaussian blur (``xkd.color_jitter/gray/blur``, ``xkd.local_*``; ``datasets/augmentations/video_augmentations.py``);
audio: the fbank padded/cut to ``vit.audio_frames``, normalised with ``xkd.audio_mean/std``, volume jitter g ~
U(1-j, 1+j) on the wave (``xkd.volume_jitter``: one log-mel offset ``audio_power`` ln g); local audio views = a
random window of ``xkd.local_audio_frames`` frames (``xkd.local_volume_jitter``) then BYOL-A's random resize-crop
(``xkd.local_audio_crop``; ``audio_augmentations.py``, ``spec_aug.py``), independent of the video's. All batched
on tensors, one draw per clip, from the torch RNG.
Tokenizers: tubelets ``xkd.tubelet_frames x vit.video_patch^2`` (linear embedding of the flattened
tubelet), audio patches ``vit.audio_patch`` = [time, freq] on a time-major grid. Positional tables are
sized for the global view and interpolated for other grids (trilinear video, bicubic audio).

Objective terms (``loss_terms``; the method weights them, as XKD's official code):

* MAE per modality on the global view: random masking (``xkd.mask_ratio_*``), encoder on the visible
  tokens (+ CLS), the modality's decoder (``vit.decoder_*``; learnable mask token and positional table)
  predicts the hidden patches; MSE with per-patch normalised targets; ``rec = (mae_video + mae_audio) / 2``.
* KD: student outputs g_S = head(mean of the patch tokens) of the masked global view's visible tokens and of
  every local view; teacher outputs g_T = teacher head(refined pool of the teacher's last-layer patch
  tokens) of the teacher view (``xkd.teacher_view``: ``local`` = the first local view, unmasked, as the
  released code; ``global`` = the unmasked global view, as the paper's figure); refinement from both
  teachers' CLS->patch attention (``xkd.refine``, ``avcl.nn.distill``); DINO cross-entropy with centring
  and temperatures (``avcl.nn.losses.dino_cross_entropy``): video teacher -> audio student with
  ``teacher_temp_video``, audio teacher -> video student with ``teacher_temp_audio``, each direction with its
  own centre (buffers ``center_video``, ``center_audio``, updated in training forwards only);
  ``kd = (kd_v2a + kd_a2v) / 2``.
* DA: ``da = (MMD(video student outputs, audio student outputs) + MMD(video teacher, audio teacher)) / 2``
  with the 7-kernel Gaussian MMD (the teacher term has no gradient: it is a constant, as in the code).

``embed`` (evaluation): the unmasked centred global view through the students (``xkd.eval_encoder=teacher``:
the teachers), the mean of the patch tokens after the final LN per modality, L2-normalised; "joint" =
[audio; video] (XKD's audio-visual linear protocol, ``codes/eval/``), "features" = "joint"; "cross_audio" /
"cross_video" = the L2-normalised head outputs of the same pooled features: the one space the two
modalities share (distillation and MMD align it), which the retrieval protocol ranks in (ours: the paper
evaluates no retrieval).

As the code (``pritamqu/XKD``, ``codes/train/models/``): Linear layers of encoders and decoders xavier-uniform
(``vit_video.py``/``vit_audio.py``/``mask_model.py`` ``_init_weights``; ``xkd.init=normal``: N(0, 0.02)), CLS and
mask tokens N(0, 0.02), positional tables trunc. N(0, 0.02), LayerNorm eps 1e-5; decoders without qkv bias or a
final LN (``mask_model.py``; ``xkd.decoder_norm``); one LayerNorm shared by the head's hidden layers
(``modules/projector.py``; ``xkd.head_shared_norm``); local views' positional tables by DINO's shifted scale
(n + 0.1) / N (``interpolate_pos_encoding``; ``xkd.pos_interp_offset``); visible tokens rounded (``mask.py``;
``xkd.keep_rounding``); ``refine=softmax`` per head (``xkd.py`` ``cross_modal_attn``).

Deviations from the code (also in docs/xkd.md): square crops only (aspect ratio 1); colour jitter's four
operations in one random order per batch (torchvision: per call); the audio resize-crop reads the zero canvas
around the crop's edge (one ``grid_sample``; the code resizes the cut crop); the volume offset ignores the
spectrum's eps floor; the decoder embedding / prediction are Linear layers even where the code's are identities
(equal widths); the decoder gets the CLS token and the visible tokens followed by the mask tokens with positions
gathered (MAE unshuffles; identical outputs), and predicts the hidden patches only. With several processes the
DINO centres are all-reduced over the ranks' rows (``parallel.mean_rows``), as the code's.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples
from avcl.models.registry import ModelOptions, register_model
from avcl.nn.augment import color_jitter, gaussian_blur, grayscale, random_resized_crop
from avcl.nn.distill import REFINE_MODES, DINOHead, refine_weights, refined_pool
from avcl.nn.ema import ema_update_pairs
from avcl.nn.losses import dino_cross_entropy, gaussian_mmd, normalized_patch_mse, update_center
from avcl.nn.vit import (KEEP_ROUNDING, LINEAR_INITS, LN_EPS, Block, ViTConfig, gather_tokens, init_vit_weights,
                         patchify_2d, patchify_tubelets, random_masking, read_clip_geometry, resize_pos_embed,
                         resolve_size, run_blocks, visible_count)


MODALITIES = ("video", "audio")
SHARE_MODES = ("none", "students", "all")


@dataclass
class XKDConfig:
    """``model.xkd``: XKD's views, tokenizers, heads, teachers. Encoder and decoder sizes
    come from ``model.vit`` (encoder layers = vit.depth + vit.fusion_depth; base = ViT-B's 12)."""
    share: str = option("none", choices=SHARE_MODES)  # none (XKD) | students (XKD-MAS: one student transformer) | all (XKD-MATS: teachers' too)
    refine: str = option("mean", choices=REFINE_MODES)  # teacher feature refinement from the CLS attention: mean | softmax | none
    teacher_view: str = option("local", choices=("local", "global"))  # local: the first local view, unmasked (the code) | global: the global view (paper figure)
    mats_ema: str = option("twice", choices=("twice", "once"))  # share=all: shared teacher blocks get one EMA update per modality (code, m^2) | once
    eval_encoder: str = option("student", choices=("student", "teacher"))  # the backbone embed() (probes, retrieval) reads: student | teacher
    tubelet_frames: int = 4  # video tubelets: tubelet_frames x vit.video_patch x vit.video_patch
    mask_ratio_video: float = option(0.85, range="[0,1)")
    mask_ratio_audio: float = option(0.8, range="[0,1)")
    norm_pix_loss: bool = True
    qkv_bias: bool = False  # encoder and decoder blocks (the code's ViT_Backbone: qkv_bias=False)
    decoder_norm: bool = False  # a final LN before the decoder's prediction layer (the code has none; MAE has one)
    # Linear layers of encoders and decoders: xavier (the code) | normal (N(0, 0.02))
    init: str = option("xavier", choices=LINEAR_INITS)
    head_shared_norm: bool = True  # the head's two hidden layers share one LayerNorm (the code's DINOHead) | two
    # local views' positional tables: DINO's scale factor (n + offset) / N (the code); 0: interpolation by size
    pos_interp_offset: float = option(0.1, range=">=0")
    keep_rounding: str = option("round", choices=KEEP_ROUNDING)  # visible tokens: round (the code: 59 of 392) | floor
    global_crop_scale: List[float] = option(factory=lambda: [0.2, 1.0])  # area fraction, resized back
    local_frames: int = 8  # local video view: consecutive frames (at the global view's frame stride)
    local_size: int = 96  # local video view side, pixels
    local_crop_scale: List[float] = option(factory=lambda: [0.08, 0.4])
    local_views_video: int = 1  # XKD 1, MAS/MATS 3
    local_views_audio: int = 1
    local_audio_frames: int = 112  # local audio view: fbank frames (a random window)
    flip: float = option(0.5, range="[0,1]")  # horizontal flip probability of every video view
    volume_jitter: float = 0.1  # audio gain U(1-j, 1+j) per clip: global view
    local_volume_jitter: float = 0.2  # and local views
    # waveform: the code's gain g on the wave = an offset audio_power * ln g / audio_std on the normalised log-mel
    # | scale: every normalised value x g
    volume_mode: str = option("waveform", choices=("waveform", "scale"))
    audio_power: float = option(2.0, range=">0")  # the fbank's spectrum power (Kaldi and the code's librosa mel: |X|^2)
    # brightness, contrast, saturation, hue (torchvision's ColorJitter): global view
    color_jitter: List[float] = option(factory=lambda: [0.4, 0.4, 0.4, 0.2], range=">=0")
    local_color_jitter: List[float] = option(factory=lambda: [0.4, 0.4, 0.4, 0.2], range=">=0")  # and local video views
    gray: float = option(0.0, range="[0,1]")  # probability of a greyscale clip (RGB only): global view
    local_gray: float = option(0.2, range="[0,1]")  # and local video views
    blur: float = option(0.0, range="[0,1]")  # probability of a Gaussian blur: global view
    local_blur: float = option(0.5, range="[0,1]")  # and local video views
    blur_sigma: List[float] = option(factory=lambda: [0.1, 2.0], range=">0")  # sigma ~ U(low, high), pixels
    blur_kernel_per: int = option(20, range=">=1")  # kernel side 2 * (view side // this) + 1 (the code's)
    local_audio_crop: bool = True  # local audio views: BYOL-A's random resize-crop (the code's randcrop) ...
    audio_virtual_crop: List[float] = option(factory=lambda: [1.0, 1.5], range=">=1")  # ... zero canvas [freq, time]
    audio_freq_scale: List[float] = option(factory=lambda: [0.6, 1.5], range=">0")  # crop height U(.) x mel bins
    audio_time_scale: List[float] = option(factory=lambda: [0.6, 1.5], range=">0")  # crop width U(.) x frames
    head_hidden: int = option(2048, range=">=1")  # DINO head: width -> hidden -> hidden -> bottleneck -> L2 -> head_dim
    head_bottleneck: int = option(256, range=">=1")
    head_dim: int = option(8192, range=">=1")
    student_temp: float = option(0.1, range=">0")
    teacher_temp_video: float = option(0.1, range=">0")  # final teacher temperatures (video teacher -> audio student) ...
    teacher_temp_audio: float = option(0.07, range=">0")
    warmup_teacher_temp_video: float = option(0.1, range=">0")  # ... reached linearly from these over teacher_temp_warmup
    warmup_teacher_temp_audio: float = option(0.07, range=">0")
    teacher_temp_warmup: float = 0.0  # fraction of the training steps
    center_momentum: float = option(0.9, range="[0,1]")
    audio_mean: float = option(-5.369, range="any")  # fbank normalisation (x - mean) / std (XKD's log-mel statistics)
    audio_std: float = option(4.410, range=">0")
    video_mean: List[float] = option(factory=lambda: [0.485, 0.456, 0.406], range="any")  # per channel, on [0, 1]
    video_std: List[float] = option(factory=lambda: [0.229, 0.224, 0.225], range=">0")


@dataclass
class XKDOptions(ModelOptions):
    """XKD's keys: encoder and decoder sizes from its ViT, the rest in ``model.xkd``."""
    vit: ViTConfig = option(factory=lambda: ViTConfig())  # the transformers' architecture
    xkd: XKDConfig = option(factory=lambda: XKDConfig())  # XKD only


class Encoder(nn.Module):
    """One modality's ViT: tokenizer, CLS token, positional table (for ``grid``), the blocks (possibly
    shared with the other modality), final LN, and its DINO head."""

    def __init__(self, patch_dim: int, grid: tuple[int, ...], width: int, blocks: nn.ModuleList, head: DINOHead,
                 pos_offset: float = 0.0, offset_axes: Optional[tuple[bool, ...]] = None):
        super().__init__()
        self.grid = tuple(grid)
        self.pos_offset, self.offset_axes = pos_offset, offset_axes
        self.patch_embed = nn.Linear(patch_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, math.prod(grid), width))
        self.blocks = blocks
        self.norm = nn.LayerNorm(width, eps=LN_EPS)
        self.head = head

    def forward(self, patches: torch.Tensor, grid: tuple[int, ...], ids: Optional[torch.Tensor] = None,
                cls_attention: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Tokens (B, 1 + k, D) after the final LN (CLS first) of the patches at ``ids`` (None: all) of a
        view with token grid ``grid``; with ``cls_attention`` also the last block's CLS->patch attention
        (B, H, k) (the CLS column dropped)."""
        pos = resize_pos_embed(self.pos_embed, self.grid, grid, self.pos_offset, self.offset_axes)
        if ids is None:
            x = self.patch_embed(patches) + pos
        else:
            x = self.patch_embed(gather_tokens(patches, ids)) + gather_tokens(pos, ids)
        cls = (self.cls_token + self.cls_pos).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        attention = None
        if cls_attention:
            x = run_blocks(self.blocks[:-1], x)
            last = self.blocks[-1]
            attention = last.attn.cls_attention(last.norm1(x))[:, :, 1:]
            x = last(x)
        else:
            x = run_blocks(self.blocks, x)
        return self.norm(x), attention


class Decoder(nn.Module):
    """A modality's MAE decoder: embedding, mask token, positional table, blocks, (``norm``: a final LN),
    prediction (XKD's ``mask_model.py``: ``decoder`` blocks then ``out_proj``, no final LN)."""

    def __init__(self, width: int, size, patch_dim: int, tokens: int, qkv_bias: bool = False, norm: bool = False):
        super().__init__()
        dd = size.decoder_width
        self.embed = nn.Linear(width, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dd))  # CLS first
        self.blocks = nn.ModuleList(Block(dd, size.decoder_heads, size.mlp_ratio, qkv_bias=qkv_bias)
                                    for _ in range(size.decoder_depth))
        self.norm = nn.LayerNorm(dd, eps=LN_EPS) if norm else nn.Identity()
        self.pred = nn.Linear(dd, patch_dim)

    def forward(self, encoded: torch.Tensor, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predictions (B, n_hidden, P) of the hidden patches from the encoder output (B, 1 + k, D)."""
        y = self.embed(encoded)
        b, n, dd = y.shape
        y = torch.cat([y, self.mask_token.to(y.dtype).expand(b, hidden.shape[1], dd)], dim=1)
        ids = torch.cat([torch.zeros_like(visible[:, :1]), visible + 1, hidden + 1], dim=1)
        y = run_blocks(self.blocks, y + gather_tokens(self.pos_embed, ids))
        return self.pred(self.norm(y[:, n:]))


@register_model("xkd")
class XKDModel(nn.Module):
    """XKD / XKD-MAS / XKD-MATS (see the module docstring). ``forward(batch)`` = ``embed(batch)``."""
    options = XKDOptions

    label_free = True
    trained_by = ("xkd",)  # checked when the config is loaded (avcl.config.validate)
    trained_by_why = ("its EMA teachers need the method's schedule; use methods: [xkd] (replay: variants with "
                      "replay: true), and no init stage")

    def __init__(self, cfg, example: Samples):
        super().__init__()
        self.xkd = xc = cfg.xkd
        self.size = size = resolve_size(cfg.vit)
        self._check_choices(xc)
        self._read_geometry(cfg.vit, xc, example)
        d = size.width
        depth = size.depth + size.fusion_depth
        if depth < 1:
            raise AvclError("model.vit.depth + model.vit.fusion_depth must be >= 1 for model.name=xkd")
        patch_dim = {"video": xc.tubelet_frames * self.video_patch ** 2 * self.channels,
                     "audio": self.audio_patch[0] * self.audio_patch[1]}

        def stack():
            return nn.ModuleList(Block(d, size.heads, size.mlp_ratio, qkv_bias=xc.qkv_bias) for _ in range(depth))

        def head():
            return DINOHead(d, xc.head_hidden, xc.head_bottleneck, xc.head_dim, shared_norm=xc.head_shared_norm)

        shared = stack() if xc.share != "none" else None
        # the code shifts every video axis and only the audio time axis (its frequency axis must not change)
        offset_axes = {"video": None, "audio": (True, False)}
        self.student = nn.ModuleDict({
            m: Encoder(patch_dim[m], self.grids[m]["global"], d, shared if shared is not None else stack(), head(),
                       xc.pos_interp_offset, offset_axes[m])
            for m in MODALITIES})
        self.decoder = nn.ModuleDict({m: Decoder(d, size, patch_dim[m], math.prod(self.grids[m]["global"]),
                                                 xc.qkv_bias, xc.decoder_norm)
                                      for m in MODALITIES})
        # XKD's initialisation (vit_video.py / vit_audio.py / mask_model.py ``_init_weights``): Linear layers of
        # encoders and decoders xavier-uniform, zero bias, LN (1, 0); CLS and mask tokens N(0, 0.02), positional
        # tables trunc. N(0, 0.02); the heads keep DINO's own init (trunc. N(0, 0.02)), set by DINOHead
        for m in MODALITIES:
            enc, dec = self.student[m], self.decoder[m]
            for module in (enc.patch_embed, enc.blocks, enc.norm, dec):
                init_vit_weights(module, linear=xc.init)
            nn.init.xavier_uniform_(enc.patch_embed.weight)  # the code's tokenizer init, under either init
            for p in (enc.cls_token, dec.mask_token):
                nn.init.normal_(p, std=0.02)
            for p in (enc.cls_pos, enc.pos_embed, dec.pos_embed):
                nn.init.trunc_normal_(p, std=0.02)
        # teachers: EMA copies (deepcopy keeps a shared stack shared: MATS); MAS: one copy per modality
        if xc.share == "all":
            self.teacher = copy.deepcopy(self.student)
        else:
            self.teacher = nn.ModuleDict({m: copy.deepcopy(self.student[m]) for m in MODALITIES})
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center_video", torch.zeros(xc.head_dim))  # video teacher -> audio student
        self.register_buffer("center_audio", torch.zeros(xc.head_dim))  # audio teacher -> video student

    # ----- configuration -----------------------------------------------------------------------
    @staticmethod
    def _check_choices(xc) -> None:
        """What the fields' own rules (``XKDConfig``, checked by ``build_model``) cannot say: pairs and the views."""
        for key in ("global_crop_scale", "local_crop_scale"):
            lo_hi = list(getattr(xc, key))
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise AvclError(f"bad config: 'model.xkd.{key}' must be [low, high] with 0 < low <= high <= 1, "
                                f"got {lo_hi}")
        for key, n in (("color_jitter", 4), ("local_color_jitter", 4), ("blur_sigma", 2), ("audio_virtual_crop", 2),
                       ("audio_freq_scale", 2), ("audio_time_scale", 2)):
            vals = list(getattr(xc, key))
            if len(vals) != n or (n == 2 and key != "audio_virtual_crop" and vals[0] > vals[1]):
                raise AvclError(f"bad config: 'model.xkd.{key}' must have {n} values"
                                + (" [low, high]" if n == 2 else "") + f", got {vals}")
        if xc.teacher_view == "local" and min(xc.local_views_video, xc.local_views_audio) < 1:
            raise AvclError("model.xkd.teacher_view=local needs at least one local view per modality "
                            "(model.xkd.local_views_video/audio >= 1)")

    def _read_geometry(self, vit, xc, example: Samples) -> None:
        read_clip_geometry(self, "xkd", vit, example)
        video, audio = example["video"], example["audio"]
        height, width = self.frame_size
        frames, pt, p = vit.frames, xc.tubelet_frames, vit.video_patch
        self.video_patch = p
        self.stride = max(self.window // frames, 1)
        span = (xc.local_frames - 1) * self.stride + 1
        if xc.local_views_video and not 1 <= span <= self.data_frames:
            raise AvclError(f"model.xkd.local_frames={xc.local_frames} at the global view's frame stride {self.stride} "
                            f"spans {span} frames: longer than the clips' {self.data_frames} frames")
        if xc.local_views_video and not 1 <= xc.local_size <= min(height, width):
            raise AvclError(f"model.xkd.local_size={xc.local_size} must be between 1 and the frame side "
                            f"{min(height, width)} (data 'video' shape {tuple(video.shape)})")
        if xc.local_views_audio and not 1 <= xc.local_audio_frames <= self.audio_frames:
            raise AvclError(f"model.xkd.local_audio_frames={xc.local_audio_frames} must be between 1 and the global "
                            f"view's {self.audio_frames} audio frames (model.vit.audio_frames)")
        if pt < 1 or frames % pt or (xc.local_views_video and xc.local_frames % pt):
            raise AvclError(f"model.xkd.tubelet_frames={pt} does not divide the views' frames (model.vit.frames="
                            f"{frames}, model.xkd.local_frames={xc.local_frames})")
        if p < 1 or height % p or width % p or (xc.local_views_video and xc.local_size % p):
            raise AvclError(f"model.vit.video_patch={p} does not divide the video views {height}x{width} (data 'video' "
                            f"shape {tuple(video.shape)}) and {xc.local_size}x{xc.local_size} (model.xkd.local_size)")
        self.audio_patch = tuple(vit.audio_patch)
        pa_t, pa_f = self.audio_patch if len(self.audio_patch) == 2 else (0, 0)
        if min(pa_t, pa_f) < 1 or self.audio_frames % pa_t or self.mel_bins % pa_f \
                or (xc.local_views_audio and xc.local_audio_frames % pa_t):
            raise AvclError(f"model.vit.audio_patch={list(vit.audio_patch)} ([time, freq]) does not divide the audio "
                            f"views: {self.audio_frames} frames (model.vit.audio_frames) / {xc.local_audio_frames} "
                            f"(model.xkd.local_audio_frames) x {self.mel_bins} mel bins (data 'audio' shape "
                            f"{tuple(audio.shape)})")
        self.grids = {
            "video": {"global": (frames // pt, height // p, width // p),
                      "local": (xc.local_frames // pt, xc.local_size // p, xc.local_size // p)},
            "audio": {"global": (self.audio_frames // pa_t, self.mel_bins // pa_f),
                      "local": (xc.local_audio_frames // pa_t, self.mel_bins // pa_f)}}
        self.mask_ratio = {"video": xc.mask_ratio_video, "audio": xc.mask_ratio_audio}
        for m in MODALITIES:
            full = math.prod(self.grids[m]["global"])
            keep = visible_count(full, self.mask_ratio[m], xc.keep_rounding)
            if not 1 <= keep < full:
                raise AvclError(f"model.xkd.mask_ratio_{m}={self.mask_ratio[m]} leaves {keep} of {full} {m} tokens "
                                "visible: need at least one visible and one hidden")
        values = list(xc.video_mean), list(xc.video_std)
        for key, vals in zip(("video_mean", "video_std"), values):
            if len(vals) not in (1, 3) or (self.channels == 3 and len(vals) != 3):
                raise AvclError(f"model.xkd.{key} must have 3 values (one per RGB channel) or 1, got {vals}")
            self.register_buffer(key, torch.tensor(vals[:self.channels], dtype=torch.float32).view(1, 1, -1, 1, 1),
                                 persistent=False)
        offsets = ((torch.arange(frames, dtype=torch.float64) + 0.5) * self.window / frames).floor().long()
        self.register_buffer("frame_offsets", offsets, persistent=False)
        self.num_tokens = {m: math.prod(self.grids[m]["global"]) for m in MODALITIES}

    # ----- views ---------------------------------------------------------------------------------
    def _frames(self, video: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Frames ``index`` (B, t) of each clip as float (B, t, C, H, W) on [0, 1]."""
        b = video.shape[0]
        frames = video[torch.arange(b, device=video.device)[:, None], index]
        frames = frames.permute(0, 1, 4, 2, 3) if self.channels == 3 else frames.unsqueeze(2)
        return frames.float().div_(255.0)

    def _audio(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[2] != self.mel_bins:
            raise AvclError(f"model xkd: 'audio' must be (B, frames, {self.mel_bins}) (as the data it was built for), "
                            f"got {tuple(audio.shape)}")
        n, ta = audio.shape[1], self.audio_frames
        audio = audio.float()
        audio = F.pad(audio, (0, 0, 0, ta - n)) if n < ta else audio[:, :ta]
        return (audio - self.xkd.audio_mean) / self.xkd.audio_std

    def _gain(self, x: torch.Tensor, jitter: float) -> torch.Tensor:
        """Volume jitter per clip, g ~ U(1 - jitter, 1 + jitter). ``volume_mode=waveform`` (the code's ``VolJitter``
        scales the wave before the log-mel): log(g^p mel) = log mel + p ln g, i.e. one offset p ln g / audio_std on
        the normalised fbank (the spectrum's eps floor aside); ``scale``: every normalised value x g."""
        if jitter <= 0:
            return x
        g = 1 + (torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) * 2 - 1) * jitter
        if self.xkd.volume_mode == "scale":
            return x * g
        return x + self.xkd.audio_power * g.log() / self.xkd.audio_std

    def _audio_crop(self, x: torch.Tensor) -> torch.Tensor:
        """The code's local-view ``RandomResizeCrop`` (BYOL-A), batched: (B, T, F) normalised fbank placed at the
        centre of a zero canvas of ``audio_virtual_crop`` x its [freq, time] size, a crop of U(audio_freq_scale) x F
        bins by U(audio_time_scale) x T frames (integers, clipped to the canvas) at a random integer offset, resized
        back bicubically (align_corners=True) by one ``grid_sample`` (it reads the canvas, zeros included, around
        the crop's edge where the code's resize clamps to the crop)."""
        xc = self.xkd
        b, t, f = x.shape
        dev = x.device
        out = []
        for size, virtual, scale in ((f, xc.audio_virtual_crop[0], xc.audio_freq_scale),
                                     (t, xc.audio_virtual_crop[1], xc.audio_time_scale)):
            canvas = int(size * virtual)
            side = (torch.empty(b, device=dev).uniform_(*scale) * size).floor().clamp(1, canvas)
            start = (torch.rand(b, device=dev) * (canvas - side + 1)).floor()
            origin = (canvas - size) // 2  # the view's first row/column on the canvas
            # output k of n -> view coordinate start - origin + k (side - 1) / (n - 1), normalised for align_corners
            k = torch.arange(size, device=dev, dtype=torch.float32) / max(size - 1, 1)
            coord = start[:, None] - origin + k[None] * (side[:, None] - 1)
            out.append(coord * 2 / max(size - 1, 1) - 1)
        freq, time = out
        grid = torch.stack([freq[:, None, :].expand(b, t, f), time[:, :, None].expand(b, t, f)], dim=-1)
        return F.grid_sample(x.unsqueeze(1), grid, mode="bicubic", padding_mode="zeros", align_corners=True)[:, 0]

    def _photometric(self, frames: torch.Tensor, jitter, gray: float, blur: float) -> torch.Tensor:
        """The code's ``ColorJitter(*jitter)``, ``RandomGray(gray)``, ``RandomGaussianBlur(p=blur)`` on (B, T, C, H, W)
        frames on [0, 1], one draw per clip (the same for its frames), batched (see ``color_jitter``)."""
        xc = self.xkd
        frames = color_jitter(frames, jitter)
        b, dev = frames.shape[0], frames.device
        if gray > 0 and frames.shape[2] == 3:
            pick = (torch.rand(b, device=dev) < gray).view(b, 1, 1, 1, 1)
            frames = torch.where(pick, grayscale(frames).expand_as(frames), frames)
        side = min(frames.shape[-2:])
        kernel = 2 * (side // xc.blur_kernel_per) + 1
        if blur > 0 and kernel > 1:
            sigma = torch.empty(b, device=dev).uniform_(*xc.blur_sigma)
            pick = (torch.rand(b, device=dev) < blur).view(b, 1, 1, 1, 1)
            frames = torch.where(pick, gaussian_blur(frames, kernel, sigma), frames)
        return frames

    def views(self, batch: Samples, train: bool = True) -> dict:
        """{"video": [global (B, T, C, H, W), local_1, ...], "audio": [global (B, 1, Ta, F), local_1, ...]},
        normalised float32; ``train=False``: the centred global view only, no augmentation."""
        video, xc = batch["video"], self.xkd
        expected = (self.data_frames, *self.frame_size) + ((3,) if self.channels == 3 else ())
        if tuple(video.shape[1:]) != expected:
            raise AvclError(f"model xkd: 'video' rows must be {expected} (as the data it was built for), "
                            f"got {tuple(video.shape[1:])}")
        b, dev = video.shape[0], video.device
        norm = lambda f: (f - self.video_mean) / self.video_std  # noqa: E731
        with torch.autocast(device_type=dev.type, enabled=False):
            spare = self.data_frames - self.window
            start = (torch.randint(0, spare + 1, (b,), device=dev) if train and spare > 0
                     else torch.full((b,), spare // 2, device=dev, dtype=torch.long))
            glob = self._frames(video, start[:, None] + self.frame_offsets.to(dev))
            audio = self._audio(batch["audio"])
            if not train:
                return {"video": [norm(glob)], "audio": [audio.unsqueeze(1)]}
            glob = random_resized_crop(glob, self.frame_size, tuple(xc.global_crop_scale), xc.flip)
            out = {"video": [norm(self._photometric(glob, xc.color_jitter, xc.gray, xc.blur))],
                   "audio": [self._gain(audio, xc.volume_jitter).unsqueeze(1)]}
            span = (xc.local_frames - 1) * self.stride + 1
            steps = torch.arange(xc.local_frames, device=dev) * self.stride
            for _ in range(xc.local_views_video):
                first = torch.randint(0, self.data_frames - span + 1, (b,), device=dev)
                local = self._frames(video, first[:, None] + steps)
                local = random_resized_crop(local, (xc.local_size, xc.local_size), tuple(xc.local_crop_scale), xc.flip)
                out["video"].append(norm(self._photometric(local, xc.local_color_jitter, xc.local_gray, xc.local_blur)))
            la = xc.local_audio_frames
            for _ in range(xc.local_views_audio):
                first = torch.randint(0, self.audio_frames - la + 1, (b, 1), device=dev)
                index = first + torch.arange(la, device=dev)[None]
                window = audio.gather(1, index[:, :, None].expand(-1, -1, self.mel_bins))
                window = self._gain(window, xc.local_volume_jitter)  # the code: gain on the wave, crop on the log-mel
                if xc.local_audio_crop:
                    window = self._audio_crop(window)
                out["audio"].append(window.unsqueeze(1))
        return out

    def patchify(self, m: str, view: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Raw patch values (B, L, P) of a view and its token grid."""
        if m == "video":
            t, _, h, w = view.shape[1:]
            p, pt = self.video_patch, self.xkd.tubelet_frames
            return patchify_tubelets(view, (pt, p, p)), (t // pt, h // p, w // p)
        ta, f = view.shape[2:]
        return patchify_2d(view, self.audio_patch), (ta // self.audio_patch[0], f // self.audio_patch[1])

    # ----- objective ---------------------------------------------------------------------------
    def teacher_temperature(self, m: str, progress: float) -> float:
        """The ``m`` teacher's temperature at training progress in [0, 1] (linear warm-up, then constant)."""
        xc = self.xkd
        final, start = getattr(xc, f"teacher_temp_{m}"), getattr(xc, f"warmup_teacher_temp_{m}")
        if xc.teacher_temp_warmup <= 0 or progress >= xc.teacher_temp_warmup:
            return final
        return start + (final - start) * progress / xc.teacher_temp_warmup

    @torch.no_grad()
    def teacher_outputs(self, views: dict) -> dict[str, torch.Tensor]:
        """Teacher logits (B, K) per modality: the teacher view, refined pooled last-layer patch tokens, head."""
        index = 1 if self.xkd.teacher_view == "local" else 0
        tokens, attention = {}, {}
        for m in MODALITIES:
            patches, grid = self.patchify(m, views[m][index])
            out, attention[m] = self.teacher[m](patches, grid, cls_attention=True)
            tokens[m] = out[:, 1:]
        other = {"video": "audio", "audio": "video"}
        return {m: self.teacher[m].head(refined_pool(
                    tokens[m], refine_weights(attention[m], attention[other[m]], self.xkd.refine)))
                for m in MODALITIES}

    def loss_terms(self, views: dict, progress: float = 1.0, kd: bool = True, da: bool = True) -> dict:
        """The unweighted terms on ``views`` (``views(batch, train=True)``): "mae_video", "mae_audio", "rec";
        with ``kd``/``da``: "kd_v2a" (video teacher -> audio student), "kd_a2v", "kd"; "mmd_student",
        "mmd_teacher", "da" (scalars). The centres are updated in training mode when teachers run."""
        out, students = {}, {}
        for m in MODALITIES:
            patches, grid = self.patchify(m, views[m][0])
            b, length = patches.shape[:2]
            keep = visible_count(length, self.mask_ratio[m], self.xkd.keep_rounding)
            visible, hidden = random_masking(b, length, keep, patches.device)
            encoded, _ = self.student[m](patches, grid, visible)
            out[f"mae_{m}"] = normalized_patch_mse(self.decoder[m](encoded, visible, hidden),
                                                   gather_tokens(patches, hidden), self.xkd.norm_pix_loss).mean()
            if kd or da:
                pooled = [encoded[:, 1:].mean(dim=1)]
                for view in views[m][1:]:
                    p_local, g_local = self.patchify(m, view)
                    pooled.append(self.student[m](p_local, g_local)[0][:, 1:].mean(dim=1))
                students[m] = self.student[m].head(torch.stack(pooled))  # (V, B, K)
        out["rec"] = (out["mae_video"] + out["mae_audio"]) / 2
        if not (kd or da):
            return out
        teacher = self.teacher_outputs(views)
        if kd:
            xc = self.xkd
            out["kd_v2a"] = dino_cross_entropy(students["audio"], teacher["video"][None], self.center_video,
                                               xc.student_temp, self.teacher_temperature("video", progress))
            out["kd_a2v"] = dino_cross_entropy(students["video"], teacher["audio"][None], self.center_audio,
                                               xc.student_temp, self.teacher_temperature("audio", progress))
            out["kd"] = (out["kd_v2a"] + out["kd_a2v"]) / 2
            if self.training:
                update_center(self.center_video, teacher["video"], xc.center_momentum)
                update_center(self.center_audio, teacher["audio"], xc.center_momentum)
        if da:
            k = students["video"].shape[-1]
            out["mmd_student"] = gaussian_mmd(students["video"].reshape(-1, k), students["audio"].reshape(-1, k))
            out["mmd_teacher"] = gaussian_mmd(teacher["video"], teacher["audio"])
            out["da"] = (out["mmd_student"] + out["mmd_teacher"]) / 2
        return out

    def ssl_loss(self, x, *args, **kwargs):
        raise AvclError(f"model.name=xkd is trained by method 'xkd': {self.trained_by_why}")

    # ----- teachers ------------------------------------------------------------------------------
    def teacher_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher, student) parameter pairs in the EMA's order: video branch, then audio branch. Under
        share=all the shared teacher blocks appear twice (updated twice, the code) unless mats_ema=once."""
        pairs = []
        for m in MODALITIES:
            pairs += list(zip(self.teacher[m].parameters(), self.student[m].parameters()))
        if self.xkd.share == "all" and self.xkd.mats_ema == "once":
            seen, unique = set(), []
            for t, s in pairs:
                if id(t) not in seen:
                    seen.add(id(t))
                    unique.append((t, s))
            pairs = unique
        return pairs

    @torch.no_grad()
    def update_teachers(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (backbones and heads)."""
        ema_update_pairs(self.teacher_pairs(), momentum)

    # ----- evaluation ----------------------------------------------------------------------------
    def embed(self, batch: Samples) -> dict[str, torch.Tensor]:
        """L2-normalised mean patch tokens of the centred, unmasked global views per modality, "joint" =
        [audio; video] (see the module docstring)."""
        views = self.views(batch, train=False)
        encoders = self.teacher if self.xkd.eval_encoder == "teacher" else self.student
        out = {}
        for m in MODALITIES:
            patches, grid = self.patchify(m, views[m][0])
            pooled = encoders[m](patches, grid)[0][:, 1:].mean(dim=1)
            out[m] = F.normalize(pooled, dim=-1)
            out[f"cross_{m}"] = F.normalize(encoders[m].head(pooled), dim=-1)  # the space KD + MMD align
        out["joint"] = out["features"] = torch.cat([out["audio"], out["video"]], dim=1)
        return out

    def forward(self, batch: Samples) -> dict[str, torch.Tensor]:
        return self.embed(batch)
