"""Synthetic audio-visual classes for fast tests: no files, seconds to build.

Each class has an audio prototype (a smooth time-frequency pattern) and a video prototype
(a blob moving along a class-specific path). A sample is its class prototypes plus Gaussian
noise, independently per modality, so each modality alone is informative but noisy, and the
two together carry more evidence than either: learnable from audio, from video, better from both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from avcl.core.options import option
from avcl.data import AVDataset, register_dataset
from avcl.data.stream import ResidencyOptions


@dataclass
class SyntheticOptions(ResidencyOptions):
    name: str = "synthetic"
    num_classes: int = option(10, range=">=1")
    train_per_class: int = option(60, range=">=1")
    val_per_class: int = 10
    test_per_class: int = option(30, range=">=1")
    held_out_per_class: int = 0  # clips kept out of the stream (AVDataset.held_out, for the init stage)
    audio_frames: int = option(32, range=">=1")
    mel_bins: int = option(20, range=">=1")
    frames: int = option(4, range=">=1")
    frame_size: int = option(16, range=">=1")
    audio_noise: float = 2.0  # noise std relative to a unit-variance prototype
    video_noise: float = 2.6


def _audio_prototypes(opts: SyntheticOptions, gen: torch.Generator) -> torch.Tensor:
    raw = torch.randn(opts.num_classes, 1, opts.audio_frames, opts.mel_bins, generator=gen)
    smooth = torch.nn.functional.avg_pool2d(raw, 3, stride=1, padding=1)[:, 0]
    return (smooth - smooth.mean()) / smooth.std()


def _video_prototypes(opts: SyntheticOptions, gen: torch.Generator) -> torch.Tensor:
    size, steps = opts.frame_size, opts.frames
    grid = torch.arange(size, dtype=torch.float32)
    start = torch.rand(opts.num_classes, 2, generator=gen) * size
    velocity = (torch.rand(opts.num_classes, 2, generator=gen) - 0.5) * size / steps
    t = torch.arange(steps, dtype=torch.float32)[None, :, None]
    centre = (start[:, None] + velocity[:, None] * t) % size  # (C, T, 2)
    dy = (grid[None, None, :] - centre[..., 0:1]) ** 2  # (C, T, H)
    dx = (grid[None, None, :] - centre[..., 1:2]) ** 2  # (C, T, W)
    blob = torch.exp(-(dy[..., :, None] + dx[..., None, :]) / (2 * (size / 6) ** 2))
    return (blob - blob.mean()) / blob.std()


@register_dataset("synthetic", SyntheticOptions,
                  "synthetic audio-visual classes (noisy prototypes), no files; for tests")
def build_synthetic(opts: SyntheticOptions, data_root: str | None, seed: int) -> AVDataset:
    gen = torch.Generator().manual_seed(seed)
    audio_proto, video_proto = _audio_prototypes(opts, gen), _video_prototypes(opts, gen)

    def split(per_class: int) -> dict[str, torch.Tensor]:
        labels = torch.arange(opts.num_classes).repeat_interleave(per_class)
        audio = audio_proto[labels] + opts.audio_noise * torch.randn(
            len(labels), opts.audio_frames, opts.mel_bins, generator=gen)
        video = video_proto[labels] + opts.video_noise * torch.randn(
            len(labels), opts.frames, opts.frame_size, opts.frame_size, generator=gen)
        # Videos are stored as uint8 frames, like decoded video.
        video = ((video * 40 + 128).clamp(0, 255)).to(torch.uint8)
        return {"audio": audio, "video": video, "label": labels}

    return AVDataset(
        name="synthetic", train=split(opts.train_per_class), val=split(opts.val_per_class),
        test=split(opts.test_per_class), class_names=[f"class{c}" for c in range(opts.num_classes)],
        info={"source": "synthetic", "seed": seed},
        held_out=split(opts.held_out_per_class) if opts.held_out_per_class else {})
