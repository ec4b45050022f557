"""HAD's hierarchical audio-visual model (reconstructed: HAD has no public code).

Data hierarchy: a video is N snippets. Model hierarchy, as the paper's abstract describes it:

* low level (per snippet): each modality's snippet embedding ``e[m]`` (B, N, D), then a
  per-snippet fusion into the snippet embedding ``h`` (B, N, F);
* high level (per video): ``z`` = MLP(mean over snippets of ``h``), then the growing classifier.

Inputs are either raw clips, cut into ``model.snippets`` equal snippets along time and encoded
by the built-in encoders (``audio_encoder`` / ``video_encoder``, e.g. AV-Digits), or snippet
features (B, N, D) per modality with the ``linear`` encoders (e.g. AVE's ten one-second
snippets). The stages are separate methods so that a method can act between them (HAM).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avcl.core.errors import AvclError
from avcl.core.options import option
from avcl.core.samples import Samples
from avcl.models.avnet import AVNetOptions, TokenPool
from avcl.models.encoders import encoder_class
from avcl.models.heads import IncrementalClassifier
from avcl.models.registry import register_model


@dataclass
class HADOptions(AVNetOptions):
    """HAD's keys: its encoders are AVNet's."""
    snippets: int = option(4, range=">=1")  # raw clips are cut into this many snippets


class SnippetLinear(nn.Module):
    """Snippet features (B, N, D_in) -> (B, N, D): LayerNorm, Linear, ReLU."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class RawSnippets(nn.Module):
    """Cut a raw clip into N snippets along time, encode and pool each: -> (B, N, D)."""

    def __init__(self, encoder_cls, input_shape: tuple[int, ...], snippets: int, dim: int):
        super().__init__()
        self.snippets = snippets
        length = input_shape[0] // snippets
        if length < 1:
            raise AvclError(f"model.snippets={snippets} is more than the {input_shape[0]} time steps of the input")
        self.encoder = encoder_cls((length, *input_shape[1:]), dim)
        self.pool = TokenPool(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.snippets
        length = x.shape[1] // n
        pieces = x[:, :length * n].reshape(b * n, length, *x.shape[2:])  # drop the remainder
        return self.pool(self.encoder(pieces)).reshape(b, n, -1)


@register_model("had")
class HADNet(nn.Module):
    options = HADOptions

    def __init__(self, cfg, example: Samples):
        super().__init__()
        self.modalities = list(cfg.modalities)
        self.low = nn.ModuleDict()
        for m in self.modalities:
            name, shape = getattr(cfg, f"{m}_encoder"), tuple(example[m].shape[1:])
            if name == "linear":  # snippet features (B, N, D) in
                self.low[m] = SnippetLinear(shape[-1], cfg.embed_dim)
            else:
                self.low[m] = RawSnippets(encoder_class(m, name), shape, cfg.snippets,
                                          cfg.embed_dim)
        width = cfg.embed_dim * len(self.modalities)
        self.snippet_fusion = nn.Sequential(nn.Linear(width, cfg.feature_dim), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(cfg.feature_dim, cfg.feature_dim), nn.ReLU())
        self.head = IncrementalClassifier(cfg.feature_dim)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def low_level(self, batch: Samples) -> dict[str, torch.Tensor]:
        """Per-modality snippet embeddings (B, N, D); a missing modality gives zeros."""
        out = {}
        for m in self.modalities:
            e = self.low[m](batch[m])
            if f"{m}_mask" in batch:
                e = e * batch[f"{m}_mask"].to(e.dtype)[:, None, None]
            out[m] = e
        return out

    def snippet_level(self, low: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.snippet_fusion(torch.cat([low[m] for m in self.modalities], dim=-1))

    def video_level(self, snippets: torch.Tensor) -> torch.Tensor:
        return self.video(snippets.mean(dim=1))

    def embed(self, batch: Samples) -> dict[str, torch.Tensor]:
        low = self.low_level(batch)
        snippets = self.snippet_level(low)
        return {"features": self.video_level(snippets), "snippets": snippets, **low}

    def forward(self, batch: Samples) -> dict[str, torch.Tensor]:
        out = self.embed(batch)
        out["logits"] = self.head(out["features"])
        return out
