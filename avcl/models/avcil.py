"""AV-CIL's model (Pian et al., ICCV 2023; official ``model/audio_visual_model_incremental.py``): ``model.name=avcil``.

Follows the official ``IncreAudioVisualNet``:

* audio-guided, channel-wise visual attention: â = tanh(W_aa a), V̂ = tanh(W_va V),
  spatial α = softmax over patches of V̂ ⊙ â (one distribution per (t, channel)),
  u = Σ_p α V̂, temporal β = softmax over time of u ⊙ â (one per channel);
  the attention is applied to the *raw* tokens: v̄ = Σ_t β Σ_p α V;
* f^a = ReLU(W_a a), f^v = ReLU(W_v v̄), sum fusion f = f^a + f^v, logits = classifier(f),
  the classifier an IncrementalClassifier (grown by copying old rows and biases);
* ``forward`` also returns L2-normalised f^a / f^v (for D-AVSC), the temporal attention and,
  for the rows asked for, the spatial log-attention (for VAD).
* The spatial attention runs through avcl's fused kernel (``model.attention_kernel=fused``,
  the default; ``reference`` = the plain PyTorch ops of the official code): same numbers,
  1.24x faster AV-CIL steps on CPU (avcl/models/avcil_attention.py, benchmarks/avcil_step.py).
* Modality variants: ``model.modalities=[audio]``: logits from ReLU(W_a a);
  ``[video]``: mean over all tokens -> ReLU(W_v .) -> classifier (no attention).

Deviations / generalisations:

* Any grid and width: ``model.visual_grid`` = [T, P] (official: 8 x 196), feature widths read
  from the example batch (official: 768); the attention width is the visual width Dv (so
  W_aa: Da -> Dv) and the projection width is ``model.feature_dim`` (official: 768).
* ``model.encoders``: "none" (inputs are pre-extracted features: audio (B, Da), video
  (B, T*P, Dv) or (B, T, P, Dv)) or "builtin" (raw clips through avcl's encoders: the video
  encoder's (B, T, P, D) tokens and the audio encoder's tokens mean-pooled over time; these
  encoders are trained with the head, unlike the official frozen AudioMAE / VideoMAE).
* ``<modality>_mask`` fields are not used: every sample must have both modalities.
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
from avcl.models.avcil_attention import FusedSpatialAttention, reference_spatial_attention
from avcl.models.avnet import AVNetOptions
from avcl.models.encoders import encoder_class
from avcl.models.heads import IncrementalClassifier
from avcl.models.registry import register_model


ENCODER_CHOICES = ("none", "builtin")
ATTENTION_KERNELS = {"fused": FusedSpatialAttention.apply, "reference": reference_spatial_attention}


@dataclass
class AVCILOptions(AVNetOptions):
    """AV-CIL's keys (its built-in encoders, ``encoders: builtin``, are AVNet's)."""
    visual_grid: List[int] = option(factory=lambda: [8, 196], range=">=1")  # [T, P] of the video tokens
    encoders: str = option("none", choices=ENCODER_CHOICES)  # none: inputs are features | builtin: raw clips through the encoders above
    attention_kernel: str = option("fused", choices=tuple(ATTENTION_KERNELS))  # fused | reference (plain PyTorch ops, as the official code)


def audio_guided_attention(audio_key: torch.Tensor, visual_pre: torch.Tensor, tokens: torch.Tensor,
                           rows: Optional[torch.Tensor] = None, kernel: str = "fused") -> dict[str, torch.Tensor]:
    """Channel-wise spatial then temporal attention (AV-CIL's ``IncreAudioVisualNet``).

    ``audio_key`` (B, D) = tanh(W_aa a); ``visual_pre`` (B, T, P, D) = W_va V (the keys before
    their tanh); ``tokens`` (B, T, P, D) = V; ``rows``: the samples whose spatial attention is
    returned (None: all). Returns the pooled visual vector (B, D), the spatial log-attention
    of ``rows`` (R, T, P, D) (log of a distribution over P for each t, d), and the temporal
    attention (B, T, D) (a distribution over T for each d) with its pre-softmax scores.
    ``kernel``: a key of ATTENTION_KERNELS, "fused" (avcl's, avcl/models/avcil_attention.py) or
    "reference" (plain ops); the model checks ``model.attention_kernel`` when it is built.
    """
    rows = torch.arange(len(tokens), device=tokens.device) if rows is None else rows
    attended_key, per_frame, spatial_log = ATTENTION_KERNELS[kernel](audio_key, visual_pre, tokens, rows)
    temporal_scores = attended_key * audio_key[:, None, :]
    temporal = temporal_scores.softmax(dim=1)
    pooled = (temporal * per_frame).sum(dim=1)  # attention applied to the raw tokens
    return {"pooled": pooled, "spatial_log_attention": spatial_log, "temporal_attention": temporal,
            "temporal_scores": temporal_scores}


@register_model("avcil")
class AVCILNet(nn.Module):
    """``forward(batch)`` -> {"logits", "features" (f), the features of each modality present:
    "audio_features" (f^a), "visual_pooled" (v̄, or the token mean for video-only models),
    "visual_features" (f^v); and for audio-visual models: "audio_embedding",
    "visual_embedding" (L2-normalised f^a, f^v), "temporal_attention", "temporal_scores" and
    "spatial_log_attention" for the rows ``attention_rows`` asks for (none by default: the
    (R, T, P, D) maps are only needed for attention distillation)}."""
    options = AVCILOptions

    def __init__(self, cfg, example: Samples):
        super().__init__()
        self.modalities = sorted(cfg.modalities)
        self.grid = tuple(int(x) for x in cfg.visual_grid)
        if len(self.grid) != 2 or min(self.grid) < 1:
            raise AvclError(f"model.visual_grid must be [T, P] with T, P >= 1, got {list(cfg.visual_grid)}")
        self.attention_kernel = cfg.attention_kernel
        for m in self.modalities:
            if m not in example:
                raise AvclError(f"model.modalities asks for '{m}' but the dataset has no '{m}' field")
        self.encoders = nn.ModuleDict()
        if cfg.encoders == "builtin":
            dims = {}
            for m in self.modalities:
                encoder = encoder_class(m, getattr(cfg, f"{m}_encoder"))
                self.encoders[m] = encoder(tuple(example[m].shape[1:]), cfg.embed_dim)
                dims[m] = cfg.embed_dim
        else:
            dims = {m: int(example[m].shape[-1]) for m in self.modalities}
        hidden = cfg.feature_dim
        if "audio" in dims:
            self.audio_proj = nn.Linear(dims["audio"], hidden)
        if "video" in dims:
            self.visual_proj = nn.Linear(dims["video"], hidden)
        if len(dims) == 2:
            self.attn_audio_proj = nn.Linear(dims["audio"], dims["video"])
            self.attn_visual_proj = nn.Linear(dims["video"], dims["video"])
        self.head = IncrementalClassifier(hidden)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def _audio(self, batch: Samples) -> torch.Tensor:
        audio = batch["audio"]
        if "audio" in self.encoders:
            return self.encoders["audio"](audio).mean(dim=1)  # (B, L, D) tokens -> clip vector
        if audio.dim() != 2:
            raise AvclError(f"avcil model: audio features must be (batch, dim), got {tuple(audio.shape)}")
        return audio.float()

    def _video(self, batch: Samples) -> torch.Tensor:
        video = batch["video"]
        if "video" in self.encoders:
            video = self.encoders["video"](video)
        else:
            video = video.float()
            if video.dim() == 3:
                video = video.reshape(video.shape[0], *self.grid, video.shape[-1]) \
                    if video.shape[1] == self.grid[0] * self.grid[1] else video
        if video.dim() != 4 or tuple(video.shape[1:3]) != self.grid:
            raise AvclError(f"avcil model: video tokens {tuple(batch['video'].shape)} (-> {tuple(video.shape)}) "
                            f"do not match model.visual_grid {list(self.grid)} (expected (batch, T*P, D) "
                            "or (batch, T, P, D))")
        return video

    def embed(self, batch: Samples, attention_rows: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out = {}
        if self.modalities == ["audio"]:
            out["features"] = out["audio_features"] = F.relu(self.audio_proj(self._audio(batch)))
            return out
        tokens = self._video(batch)
        if self.modalities == ["video"]:
            out["visual_pooled"] = tokens.flatten(1, 2).mean(dim=1)
            out["features"] = out["visual_features"] = F.relu(self.visual_proj(out["visual_pooled"]))
            return out
        audio = self._audio(batch)
        rows = tokens.new_empty(0, dtype=torch.long) if attention_rows is None else attention_rows
        # float32 attention under autocast too: softmaxes and sums over up to 196 patches
        attention = audio_guided_attention(torch.tanh(self.attn_audio_proj(audio)).float(),
                                           self.attn_visual_proj(tokens).float(), tokens.float(), rows,
                                           self.attention_kernel)
        out["visual_pooled"] = attention.pop("pooled")
        f_audio = out["audio_features"] = F.relu(self.audio_proj(audio))
        f_visual = out["visual_features"] = F.relu(self.visual_proj(out["visual_pooled"]))
        out["features"] = f_audio + f_visual
        out["audio_embedding"] = F.normalize(f_audio, dim=1)
        out["visual_embedding"] = F.normalize(f_visual, dim=1)
        out.update(attention)
        return out

    def forward(self, batch: Samples, attention_rows: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        out = self.embed(batch, attention_rows)
        out["logits"] = self.head(out["features"])
        return out
