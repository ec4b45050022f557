"""Encoders: audio spectrogram -> tokens (B, L, D); video frames -> tokens (B, T, P, D).

Encoders keep tokens (time for audio; time and space for video) so that fusion modules can
attend over them. Register a new encoder in the dicts at the bottom to make it selectable
with ``model.audio_encoder=NAME`` / ``model.video_encoder=NAME``.
"""
from __future__ import annotations

import torch
from torch import nn

from avcl.core.errors import AvclError


class AudioConv1d(nn.Module):
    """1-D convolutions over time, mel bins as channels: (B, F, M) -> (B, F/4, D)."""

    def __init__(self, input_shape: tuple[int, ...], dim: int):
        super().__init__()
        expect_rank("conv1d audio", input_shape, 2, "a (frames, mel bins) filterbank")
        _, mel_bins = input_shape
        self.net = nn.Sequential(
            nn.Conv1d(mel_bins, dim, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv1d(dim, dim, 3, padding=1), nn.GELU())

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.net(audio.transpose(1, 2)).transpose(1, 2)


class FrameConv(nn.Module):
    """A small CNN applied to every frame: (B, T, H, W) uint8 -> (B, T, H/8 * W/8, D)."""

    def __init__(self, input_shape: tuple[int, ...], dim: int):
        super().__init__()
        expect_rank("conv video", input_shape, 3, "uint8 (T, H, W) frames")
        self.net = nn.Sequential(
            nn.Conv2d(1, dim // 4, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(dim // 4, dim // 2, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.dtype != torch.uint8:  # float features are not frames (checked once before a run: check_forward)
            refuse_data("conv video", "uint8 (T, H, W) frames", f"{str(video.dtype).removeprefix('torch.')} features")
        b, t, h, w = video.shape
        frames = video.reshape(b * t, 1, h, w).float() / 255.0  # frames are stored as uint8
        tokens = self.net(frames)  # (B*T, D, h', w')
        return tokens.flatten(2).transpose(1, 2).reshape(b, t, -1, tokens.shape[1])


class FeatureLinear(nn.Module):
    """Pre-extracted features (``avcl extract``: a clip vector (B, D), tokens (B, L, D) / (B, T, P, D)
    or snippets (B, N, D)) -> tokens (B, ..., dim): LayerNorm, Linear, ReLU on the last axis."""

    def __init__(self, input_shape: tuple[int, ...], dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(input_shape[-1]), nn.Linear(input_shape[-1], dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net(x.float())
        return x[:, None] if x.dim() == 2 else x  # a clip vector is one token


def expect_rank(encoder: str, input_shape: tuple[int, ...], rank: int, kind: str) -> None:
    """Refuse data of another rank with one message naming the recipe for extracted features."""
    if len(input_shape) != rank:
        refuse_data(encoder, kind, f"shape {tuple(input_shape)}")


def refuse_data(encoder: str, kind: str, got: str) -> None:
    raise AvclError(f"the {encoder} encoder needs {kind} per clip, but the data has {got}: for features from "
                    "`avcl extract` use recipe `features` (model.audio_encoder=linear model.video_encoder=linear)")


AUDIO_ENCODERS = {"conv1d": AudioConv1d, "linear": FeatureLinear}
VIDEO_ENCODERS = {"conv": FrameConv, "linear": FeatureLinear}


def encoder_class(modality: str, name: str, extra: tuple[str, ...] = ()):
    """The registered encoder class ``name`` for ``modality`` (``model.<modality>_encoder``)."""
    registry = {"audio": AUDIO_ENCODERS, "video": VIDEO_ENCODERS}[modality]
    if name not in registry:
        raise AvclError(f"unknown model.{modality}_encoder '{name}' (known: {', '.join(extra + tuple(registry))})")
    return registry[name]
