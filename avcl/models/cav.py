"""The CAV-MAE backbone as FLAVA/STELLA run it (their ``models/cav.py``, ``models/avm_module.py``): ``model.name=cav``.

Label-free (``label_free = True``), no classifier head. Inputs (``prepare``):

* video: ``model.vit.frames`` frames sampled uniformly over a window of ``vit.video_window``
  consecutive frames (the centre of each of T equal segments; random window start in training,
  the centred window in evaluation), gray (N, T, H, W) or RGB (N, T, H, W, 3) uint8 -> [0, 1];
  training: a random multi-scale crop (scale from ``vit.crop_scales``, the same for all frames of a
  clip) resized back to H x W; normalised with ``cav.video_mean/std`` (gray frames: the first value).
* audio: (N, frames, mel) fbank padded with zeros / cut to ``vit.audio_frames``, then
  (x - ``cav.audio_mean``) / ``cav.audio_std``; training: + uniform noise U[0, 1) * s with
  s ~ U(0, ``cav.audio_noise``) per clip, then a random circular time roll (``cav.audio_roll``).

Tokens: per-frame 2-D video patches of ``vit.video_patch`` px (tokens in (frame, row, col) order),
2-D audio patches ``vit.audio_patch`` = [time, freq] on a (time, freq) grid in time-major order
(token = t * freq_steps + f). Patches are embedded by a linear map of the raw patch values (MAE's
(row, col, channel) layout), so any subset of patches can be (re-)embedded.

Encoder: learnable positional embeddings initialised with MAE's 2-D sin-cos table (video: one
frame's table repeated over the frames, no temporal term; audio: the (time, freq) grid), a learnable
modality embedding, ``depth`` modality-specific layers, then a second learnable "inter" positional
embedding (same initialisation) and ``fusion_depth`` shared layers used CAV-MAE style: a joint pass
on [audio; video] (shared LNs inside the layers, final LN ``norm.joint``) and one pass per modality
(the layers' modality-specific LNs, final LN ``norm.audio`` / ``norm.video``).

Objective (``ssl_loss``, the FLAVA/STELLA code's ``models/objectives.py``):
the decoder (shared weights; ``decoder_embed`` on the normalised
joint-pass outputs) decodes audio and video as separate sequences, each with its own mask token,
decoder positional embedding (sin-cos initialised, learnable), modality embedding and linear
prediction head; MAE loss on normalised patch targets (``cav.norm_pix_loss``) of the hidden patches;
symmetric InfoNCE (``cav.temperature``) on the L2-normalised mean-pooled per-modality-pass outputs;
``loss = cav.mae_weight * (mae_audio + mae_video) + cav.contrastive_weight * contrastive``.

Generalisations and deviations from the FLAVA/STELLA code (``models/cav.py``, ``configs/backbone/cav.yaml``):

* Sizes: ``model.vit`` presets tiny / small / base (base = the code's ViT-B 10 + 2 layers, decoder
  512 x 8 x 16), every field overridable; patch sides, frame count, window and fbank length
  configurable; gray frames are supported (one channel) besides RGB.
* Multi-scale crop: one scale per clip for both sides, a continuous uniform offset, bilinear
  resampling in one batched ``F.grid_sample`` (the code's GroupMultiScaleCrop draws the width and
  height scales separately with distortion <= 1, from a fixed grid of offsets, crops whole pixels
  and resizes).
* The decoder sees [visible tokens; mask tokens] with positional embeddings gathered by position
  instead of the tokens unshuffled into position order (identical outputs: attention is
  permutation-equivariant), and applies its final LN and the prediction head to the hidden
  (target) tokens only (the only ones the loss reads).
* Visible count: floor((1 - mask_ratio) * L) with a tolerance against float round-off (the code's
  ``int(L * (1 - r))`` gives 9 for 0.2 * 50); with ``selected`` it is clamped to K - 1.
* InfoNCE negatives: the rows of the batch; under several processes every rank's rows, gathered with their
  gradient (avcl.parallel.all_rows), where the code's ``concat_all_gather`` carries none (only local rows do).
* LayerNorm epsilon 1e-5 (PyTorch's default), as the code, in the backbone and the AVM.
* No dropout / drop-path (the code's defaults are 0). ``model.modalities`` is not used: both audio
  and video are required. The per-term outputs are unweighted; ``loss`` carries the weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples
from avcl.models.avm import AVMModule, matching_pairs
from avcl.models.mae_weights import load_mae_weights
from avcl.models.registry import ModelOptions, register_model
from avcl.nn.losses import info_nce, normalized_patch_mse
from avcl.nn.vit import (LN_EPS, Block, ViTConfig, gather_tokens, init_vit_weights, patchify_2d, patchify_frames,
                         random_masking, read_clip_geometry, resolve_size, run_blocks, sincos_2d, split_selected,
                         visible_count)


MODALITIES = ("audio", "video")


@dataclass
class CAVConfig:
    """``model.cav``: the CAV-MAE objective as FLAVA/STELLA run it and its input normalisation."""
    mask_ratio_audio: float = option(0.8, range="[0,1)")
    mask_ratio_video: float = option(0.8, range="[0,1)")
    norm_pix_loss: bool = True  # reconstruction targets normalised per patch
    mae_weight: float = 1.0  # per modality
    contrastive_weight: float = 0.1
    temperature: float = option(0.05, range=">0")  # InfoNCE
    audio_mean: float = option(0.0, range="any")  # fbank normalisation (x - mean) / std; AudioSet-style fbank: -5.081, 4.4849
    audio_std: float = option(1.0, range=">0")
    video_mean: List[float] = option(factory=lambda: [0.485, 0.456, 0.406], range="any")  # per channel, on [0, 1]
    video_std: List[float] = option(factory=lambda: [0.229, 0.224, 0.225], range=">0")  # (gray frames: first value)
    audio_noise: float = 0.1  # train-time: uniform noise of a random scale up to this, and
    audio_roll: bool = True  # a random circular time roll
    avm: bool = True  # build STELLA's AVM module (trained only by stella and the init stage)


@dataclass
class CAVOptions(ModelOptions):
    """The CAV backbone's keys: its ViT and its objective."""
    vit: ViTConfig = option(factory=lambda: ViTConfig())  # the transformer's architecture
    cav: CAVConfig = option(factory=lambda: CAVConfig())  # the CAV-MAE objective


@register_model("cav")
class CAVModel(nn.Module):
    """CAV-MAE backbone (see the module docstring). ``forward(batch)`` = ``embed(batch)``."""
    options = CAVOptions

    label_free = True

    def __init__(self, cfg, example: Samples):
        super().__init__()
        self.vit_cfg, self.cav = cfg.vit, cfg.cav
        self.vit_size = size = resolve_size(cfg.vit)
        self._read_geometry(cfg.vit, example)
        d, dd = size.width, size.decoder_width
        patch_dim = {"audio": self.audio_patch[0] * self.audio_patch[1],
                     "video": self.video_patch ** 2 * self.channels}
        tables = {"audio": sincos_2d(d, *self.audio_grid),
                  "video": sincos_2d(d, self.video_grid[1], self.video_grid[2]).repeat(self.video_grid[0], 1)}
        dec_tables = {"audio": sincos_2d(dd, *self.audio_grid),
                      "video": sincos_2d(dd, self.video_grid[1], self.video_grid[2]).repeat(self.video_grid[0], 1)}

        # encoder
        self.patch_embed = nn.ModuleDict({m: nn.Linear(patch_dim[m], d) for m in MODALITIES})
        self.pos_embed = nn.ParameterDict({m: nn.Parameter(tables[m][None].clone()) for m in MODALITIES})
        self.inter_pos_embed = nn.ParameterDict({m: nn.Parameter(tables[m][None].clone()) for m in MODALITIES})
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, d)) for m in MODALITIES})
        self.blocks = nn.ModuleDict({m: nn.ModuleList(Block(d, size.heads, size.mlp_ratio) for _ in range(size.depth))
                                     for m in MODALITIES})
        self.fusion_blocks = nn.ModuleList(Block(d, size.heads, size.mlp_ratio, modes=MODALITIES)
                                           for _ in range(size.fusion_depth))
        self.norm = nn.ModuleDict({m: nn.LayerNorm(d, eps=LN_EPS) for m in ("joint",) + MODALITIES})
        # decoder
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, dd)) for m in MODALITIES})
        self.decoder_pos_embed = nn.ParameterDict({m: nn.Parameter(dec_tables[m][None].clone()) for m in MODALITIES})
        self.decoder_modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(1, 1, dd)) for m in MODALITIES})
        self.decoder_blocks = nn.ModuleList(Block(dd, size.decoder_heads, size.mlp_ratio)
                                            for _ in range(size.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=LN_EPS)
        self.decoder_pred = nn.ModuleDict({m: nn.Linear(dd, patch_dim[m]) for m in MODALITIES})

        init_vit_weights(self)  # FLAVA: Linear ~ N(0, 0.02), LN (1, 0)
        for m in MODALITIES:  # patch embeddings as the code's conv: xavier-uniform on the flat kernel
            nn.init.xavier_uniform_(self.patch_embed[m].weight)
            for p in (self.modality_embed[m], self.mask_token[m], self.decoder_modality_embed[m]):
                nn.init.normal_(p, std=0.02)
        self.avm = AVMModule(d, size.heads) if cfg.cav.avm else None

        self.checkpoint_notes: list[str] = []
        if cfg.vit.checkpoint:
            self.checkpoint_notes = load_mae_weights(self, cfg.vit.checkpoint)

    # ----- geometry ----------------------------------------------------------------------------
    def _read_geometry(self, vit, example: Samples) -> None:
        read_clip_geometry(self, "cav", vit, example)
        video, audio = example["video"], example["audio"]
        height, width = self.frame_size
        frames = vit.frames
        self.video_patch = p = vit.video_patch
        if p < 1 or height % p or width % p:
            raise AvclError(f"model.vit.video_patch={p} does not divide the video frames {height}x{width} "
                            f"(data 'video' shape {tuple(video.shape)})")
        self.audio_patch = tuple(vit.audio_patch)
        if len(self.audio_patch) != 2 or min(self.audio_patch) < 1 or self.audio_frames % self.audio_patch[0] \
                or self.mel_bins % self.audio_patch[1]:
            raise AvclError(f"model.vit.audio_patch={list(vit.audio_patch)} ([time, freq]) does not divide the "
                            f"audio {self.audio_frames} frames x {self.mel_bins} mel bins (model.vit.audio_frames="
                            f"{vit.audio_frames}, data 'audio' shape {tuple(audio.shape)})")
        self.video_grid = (frames, height // p, width // p)
        self.audio_grid = (self.audio_frames // self.audio_patch[0], self.mel_bins // self.audio_patch[1])
        self.num_tokens = {"audio": self.audio_grid[0] * self.audio_grid[1],
                           "video": frames * self.video_grid[1] * self.video_grid[2]}
        self.mask_ratio = {"audio": self.cav.mask_ratio_audio, "video": self.cav.mask_ratio_video}
        for m in MODALITIES:
            keep = visible_count(self.num_tokens[m], self.mask_ratio[m])
            if not 1 <= keep < self.num_tokens[m]:
                raise AvclError(f"model.cav.mask_ratio_{m}={self.mask_ratio[m]} leaves {keep} of "
                                f"{self.num_tokens[m]} {m} tokens visible: need at least one visible and one hidden")
        for key in ("video_mean", "video_std"):
            values = list(getattr(self.cav, key))
            if len(values) not in (1, 3) or (self.channels == 3 and len(values) != 3):
                raise AvclError(f"model.cav.{key} must have 3 values (one per RGB channel), got {values}")
            values = values[:self.channels]
            self.register_buffer(key, torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1, 1), persistent=False)
        if not vit.crop_scales:  # each value's range is the field's own (build_model checks it)
            raise AvclError("model.vit.crop_scales must hold at least one value in (0, 1], got []")
        self.register_buffer("crop_scales", torch.tensor(list(vit.crop_scales), dtype=torch.float32), persistent=False)
        offsets = ((torch.arange(frames, dtype=torch.float64) + 0.5) * self.window / frames).floor().long()
        self.register_buffer("frame_offsets", offsets, persistent=False)

    # ----- inputs ------------------------------------------------------------------------------
    def prepare(self, batch: Samples, train: bool) -> dict[str, torch.Tensor]:
        """{"audio": (B, 1, Ta, F), "video": (B, T, C, H, W)} float32, normalised (see the module doc)."""
        with torch.autocast(device_type=batch["video"].device.type, enabled=False):  # float32 under any autocast
            return {"audio": self._prepare_audio(batch["audio"], train),
                    "video": self._prepare_video(batch["video"], train)}

    def _prepare_video(self, video: torch.Tensor, train: bool) -> torch.Tensor:
        expected = (self.data_frames, *self.frame_size) + ((3,) if self.channels == 3 else ())
        if tuple(video.shape[1:]) != expected:
            raise AvclError(f"model cav: 'video' rows must be {expected} (as the data it was built for), "
                            f"got {tuple(video.shape[1:])}")
        b, dev = video.shape[0], video.device
        spare = self.data_frames - self.window
        if train and spare > 0:
            start = torch.randint(0, spare + 1, (b,), device=dev)
        else:
            start = torch.full((b,), spare // 2, device=dev, dtype=torch.long)
        frames = video[torch.arange(b, device=dev)[:, None], start[:, None] + self.frame_offsets.to(dev)]
        frames = frames.permute(0, 1, 4, 2, 3) if self.channels == 3 else frames.unsqueeze(2)
        frames = frames.float().div_(255.0)  # (B, T, C, H, W)
        if train and bool((self.crop_scales < 1).any()):
            frames = self._random_crop(frames)
        return (frames - self.video_mean) / self.video_std

    def _random_crop(self, frames: torch.Tensor) -> torch.Tensor:
        """A random square-scale crop per clip (same for its frames), resized back bilinearly."""
        b, t, c, h, w = frames.shape
        dev = frames.device
        scale = self.crop_scales.to(dev)[torch.randint(len(self.crop_scales), (b,), device=dev)]
        shift = (1 - scale)[:, None] * (torch.rand(b, 2, device=dev) * 2 - 1)  # crop centre, normalised coords
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = theta[:, 1, 1] = scale
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, [b, t * c, h, w], align_corners=False)
        out = F.grid_sample(frames.reshape(b, t * c, h, w), grid, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out.view(b, t, c, h, w)

    def _prepare_audio(self, audio: torch.Tensor, train: bool) -> torch.Tensor:
        if audio.dim() != 3 or audio.shape[2] != self.mel_bins:
            raise AvclError(f"model cav: 'audio' must be (B, frames, {self.mel_bins}) (as the data it was built "
                            f"for), got {tuple(audio.shape)}")
        b, n, _ = audio.shape
        ta = self.audio_frames
        audio = audio.float()
        if n < ta:
            audio = F.pad(audio, (0, 0, 0, ta - n))
        elif n > ta:
            audio = audio[:, :ta]
        audio = (audio - self.cav.audio_mean) / self.cav.audio_std
        if train:
            if self.cav.audio_noise > 0:
                level = torch.rand(b, 1, 1, device=audio.device) * self.cav.audio_noise
                audio = audio + torch.rand_like(audio) * level
            if self.cav.audio_roll:
                shift = torch.randint(-ta, ta, (b, 1), device=audio.device)
                index = (torch.arange(ta, device=audio.device)[None] - shift) % ta  # torch.roll per row
                audio = audio.gather(1, index[:, :, None].expand(-1, -1, self.mel_bins))
        return audio.unsqueeze(1)

    def patchify(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw patch values (differentiable): {"audio": (B, La, Pa), "video": (B, Lv, Pv)}."""
        return {"audio": patchify_2d(x["audio"], self.audio_patch),
                "video": patchify_frames(x["video"], self.video_patch)}

    # ----- encoder -------------------------------------------------------------------------------
    def _encode(self, m: str, patches: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        if ids is None:
            x = self.patch_embed[m](patches) + self.pos_embed[m]
            inter = self.inter_pos_embed[m]
        else:
            x = self.patch_embed[m](gather_tokens(patches, ids)) + gather_tokens(self.pos_embed[m], ids)
            inter = gather_tokens(self.inter_pos_embed[m], ids)
        return run_blocks(self.blocks[m], x + self.modality_embed[m]) + inter

    def encode_unimodal(self, x: dict[str, torch.Tensor], ids: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """The modality encoders on the tokens at ``ids[m]`` (B, k) (None: all tokens), positional
        embeddings gathered by id. Returns the fusion-layer input: the modality-layer outputs plus the
        "inter" positional embedding of the same ids, {"audio": (B, k_a, D), "video": (B, k_v, D)}."""
        patches = self.patchify(x)
        ids = ids or {}
        return {m: self._encode(m, patches[m], ids.get(m)) for m in MODALITIES}

    def _joint_pass(self, h: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        la = h["audio"].shape[1]
        x = run_blocks(self.fusion_blocks, torch.cat([h["audio"], h["video"]], dim=1))
        return x[:, :la], x[:, la:]

    def fuse(self, h: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Joint pass of [h_a; h_v] (``encode_unimodal``'s output) through the fusion layers, split back:
        {"audio": f_a, "video": f_v}, before the final LN (the code's AVM input)."""
        f_a, f_v = self._joint_pass(h)
        return {"audio": f_a, "video": f_v}

    def _modality_pass(self, h: torch.Tensor, m: str) -> torch.Tensor:
        return self.norm[m](run_blocks(self.fusion_blocks, h, m))

    # ----- objectives ----------------------------------------------------------------------------
    def mask_tokens(self, batch: int, selected: Optional[dict] = None, device=None) -> tuple[dict, dict]:
        """(visible, hidden): per modality (B, k) token ids, drawn as ``ssl_loss`` draws them (same global
        RNG calls, so a seeded call reproduces its split). ``selected``: see ``ssl_loss``."""
        visible, hidden = {}, {}
        device = self.pos_embed["audio"].device if device is None else device
        for m in MODALITIES:
            full = self.num_tokens[m]
            keep = visible_count(full, self.mask_ratio[m])
            ids = None if selected is None else selected.get(m)
            if ids is None:
                visible[m], hidden[m] = random_masking(batch, full, keep, device)
                continue
            if ids.dim() != 2 or ids.shape[0] != batch or not 2 <= ids.shape[1] <= full:
                raise AvclError(f"ssl_loss: selected['{m}'] must be (B={batch}, K) token ids with 2 <= K <= {full}, "
                                f"got shape {tuple(ids.shape)}")
            visible[m], hidden[m] = split_selected(ids.long(), min(keep, ids.shape[1] - 1))
        return visible, hidden

    def _decode(self, m: str, encoded: torch.Tensor, visible: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Predictions (B, n_hidden, P) for the ``hidden`` positions from the visible tokens' encodings."""
        y = self.decoder_embed(encoded)
        b, k, dd = y.shape
        y = torch.cat([y, self.mask_token[m].to(y.dtype).expand(b, hidden.shape[1], dd)], dim=1)
        y = y + gather_tokens(self.decoder_pos_embed[m], torch.cat([visible, hidden], dim=1)) \
            + self.decoder_modality_embed[m]
        y = run_blocks(self.decoder_blocks, y)
        return self.decoder_pred[m](self.decoder_norm(y[:, k:]))

    def ssl_loss(self, x: dict[str, torch.Tensor], selected: Optional[dict] = None,
                 reduction: str = "mean") -> dict[str, torch.Tensor]:
        """The CAV-MAE objective on prepared input ``x``.

        ``selected=None``: random masking with ``cav.mask_ratio_*`` over all tokens. ``selected`` =
        {"audio": (B, K_a), "video": (B, K_v)} token ids (STELLA's ``modality_guided_masking``): only those patches are used;
        a random visible subset of floor((1 - mask_ratio) * L_full) of them (at most K - 1) is encoded,
        the other selected patches are the targets, the decoder runs on the K selected positions only.
        Returns {"loss", "mae_audio", "mae_video", "contrastive"} (scalars; (B,) per row with
        ``reduction="none"``; the terms unweighted, ``loss`` weighted) and "z_audio", "z_video" (B, D):
        mean-pooled per-modality fusion outputs after the modality LN, not normalised.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        patches = self.patchify(x)
        batch = patches["audio"].shape[0]
        visible, hidden = self.mask_tokens(batch, selected, patches["audio"].device)
        h = {m: self._encode(m, patches[m], visible[m]) for m in MODALITIES}
        joint = self.norm["joint"](torch.cat(self._joint_pass(h), dim=1))
        encoded = {"audio": joint[:, :visible["audio"].shape[1]], "video": joint[:, visible["audio"].shape[1]:]}
        z = {m: self._modality_pass(h[m], m).mean(dim=1) for m in MODALITIES}
        mae = {m: normalized_patch_mse(self._decode(m, encoded[m], visible[m], hidden[m]),
                                       gather_tokens(patches[m], hidden[m]), self.cav.norm_pix_loss)
               for m in MODALITIES}
        nce = info_nce(z["audio"], z["video"], self.cav.temperature, reduction="none")
        loss = self.cav.mae_weight * (mae["audio"] + mae["video"]) + self.cav.contrastive_weight * nce
        out = {"loss": loss, "mae_audio": mae["audio"], "mae_video": mae["video"], "contrastive": nce}
        if reduction == "mean":
            out = {key: value.mean() for key, value in out.items()}
        out["z_audio"], out["z_video"] = z["audio"], z["video"]
        return out

    def masked_embeddings(self, x: dict[str, torch.Tensor], ids: Optional[dict] = None) -> dict[str, torch.Tensor]:
        """Encoder only, masked input: {"audio": (B, D), "video": (B, D)} mean-pooled per-modality fusion
        outputs (as ``ssl_loss``'s z, not normalised). ``ids``: the visible token ids per modality
        (None: a fresh random masking with ``cav.mask_ratio_*``)."""
        patches = self.patchify(x)
        if ids is None:
            ids, _ = self.mask_tokens(patches["audio"].shape[0], None, patches["audio"].device)
        return {m: self._modality_pass(self._encode(m, patches[m], ids[m]), m).mean(dim=1) for m in MODALITIES}

    def embed(self, batch: Samples) -> dict[str, torch.Tensor]:
        """Evaluation features (no augmentation, no masking): "audio" / "video" (B, D) L2-normalised
        mean-pooled per-modality passes (retrieval, as the FLAVA/STELLA code); "joint" (B, 2D) = [mean audio tokens;
        mean video tokens] of the joint pass after its LN (linear probe); "features" = "joint"."""
        h = self.encode_unimodal(self.prepare(batch, train=False))
        f_a, f_v = self._joint_pass(h)
        joint = torch.cat([self.norm["joint"](f_a).mean(dim=1), self.norm["joint"](f_v).mean(dim=1)], dim=1)
        z = {m: F.normalize(self._modality_pass(h[m], m).mean(dim=1), dim=-1) for m in MODALITIES}
        return {"audio": z["audio"], "video": z["video"], "joint": joint, "features": joint}

    def forward(self, batch: Samples) -> dict[str, torch.Tensor]:
        return self.embed(batch)

    # ----- AVM (STELLA) --------------------------------------------------------------------------
    def avm_loss(self, x: Optional[dict[str, torch.Tensor]] = None, unimodal: Optional[dict[str, torch.Tensor]] = None,
                 fused: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """The AVM matching BCE on prepared input ``x`` (STELLA's ``learn_multimodal_relationship``,
        ``models/cl_methods/stella.py``; head in ``models/avm_module.py``): the backbone under no_grad on the
        unmasked tokens. Half the pairs are positive, the other half get the video codes of another negative row
        (deranged among themselves); the codes are paired *before* the joint fusion pass, as the code, so each
        negative pair is fused together (its audio tokens attend to the other clip's video and vice versa).
        Weight 1; gradients reach ``avm`` only.

        ``unimodal``: ``encode_unimodal(x)`` when the caller has it already. ``fused``: ``fuse(unimodal)`` of the
        true pairs, likewise: its rows serve the positive pairs (the same pair fused, so the same values) and
        only the negative pairs go through a fusion pass of their own."""
        if self.avm is None:
            raise AvclError("avm_loss needs the AVM module: set model.cav.avm=true")
        with torch.no_grad():
            h = self.encode_unimodal(x) if unimodal is None else unimodal
            labels, video_index = matching_pairs(h["audio"].shape[0], h["audio"].device)
            if fused is None:
                f = self.fuse({"audio": h["audio"], "video": h["video"][video_index]})
            elif bool(labels.all()):  # no negatives (B <= 2)
                f = fused
            else:
                negatives = (labels == 0).nonzero().flatten()
                own = self.fuse({"audio": h["audio"][negatives], "video": h["video"][video_index[negatives]]})
                f = {m: fused[m].index_copy(0, negatives, own[m].to(fused[m].dtype)) for m in MODALITIES}
        logits = self.avm.match_logit(f["audio"], f["video"])
        return F.binary_cross_entropy_with_logits(logits.float(), labels)
