"""The two-stream audio-visual network: encoders -> fusion -> growing classifier."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples
from avcl.models.encoders import encoder_class
from avcl.models.heads import IncrementalClassifier
from avcl.models.registry import ModelOptions, register_model


@dataclass
class AVNetOptions(ModelOptions):
    """AVNet's keys (and those of the models that reuse its encoders: HAD's, AV-CIL's built-in ones)."""
    audio_encoder: str = "conv1d"
    video_encoder: str = "conv"
    fusion: str = option("concat", choices=("concat", "sum"))  # concat | sum
    embed_dim: int = option(64, range=">=1")  # width of each encoder's tokens
    feature_dim: int = option(128, range=">=1")  # width of the fused feature fed to the classifier


class TokenPool(nn.Module):
    """Per-token MLP then mean over all token axes: (B, ..., D) -> (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.mlp(tokens).flatten(1, -2).amax(dim=1)


class Fusion(nn.Module):
    """Pools each modality's tokens and fuses them into one feature vector.

    ``concat``: concatenate the pooled vectors, then a linear layer + ReLU.
    ``sum``: project each pooled vector (linear + ReLU) and add them.
    A sample whose ``<modality>_mask`` is False contributes zeros for that modality.
    """

    def __init__(self, modalities: list[str], embed_dim: int, feature_dim: int, mode: str):
        super().__init__()
        self.modalities, self.mode = list(modalities), mode
        self.pool = nn.ModuleDict({m: TokenPool(embed_dim) for m in self.modalities})
        if mode == "concat":
            self.proj = nn.Sequential(nn.Linear(embed_dim * len(self.modalities), feature_dim), nn.ReLU())
        else:
            self.proj = nn.ModuleDict({m: nn.Sequential(nn.Linear(embed_dim, feature_dim), nn.ReLU())
                                       for m in self.modalities})

    def forward(self, tokens: dict[str, torch.Tensor], batch: Samples) -> dict[str, torch.Tensor]:
        pooled = {}
        for m in self.modalities:
            vector = self.pool[m](tokens[m])
            if f"{m}_mask" in batch:
                vector = vector * batch[f"{m}_mask"].to(vector.dtype)[:, None]
            pooled[m] = vector
        if self.mode == "concat":
            features = self.proj(torch.cat([pooled[m] for m in self.modalities], dim=1))
        else:
            features = sum(self.proj[m](pooled[m]) for m in self.modalities)
        return {"features": features, **pooled}


@register_model("avnet")
class AVNet(nn.Module):
    """``forward(batch)`` -> {"logits", "features", "audio", "video"} (present modalities only)."""
    options = AVNetOptions

    def __init__(self, cfg, example: Samples):
        super().__init__()
        self.modalities = list(cfg.modalities)
        self.encoders = nn.ModuleDict()
        for m in self.modalities:
            cls = encoder_class(m, getattr(cfg, f"{m}_encoder"))
            if m not in example:
                raise AvclError(f"model.modalities asks for '{m}' but the dataset has no '{m}' field")
            self.encoders[m] = cls(tuple(example[m].shape[1:]), cfg.embed_dim)
        self.fusion = Fusion(self.modalities, cfg.embed_dim, cfg.feature_dim, cfg.fusion)
        self.head = IncrementalClassifier(cfg.feature_dim)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def embed(self, batch: Samples) -> dict[str, torch.Tensor]:
        tokens = {m: self.encoders[m](batch[m]) for m in self.modalities}
        return self.fusion(tokens, batch)

    def forward(self, batch: Samples) -> dict[str, torch.Tensor]:
        out = self.embed(batch)
        out["logits"] = self.head(out["features"])
        return out
