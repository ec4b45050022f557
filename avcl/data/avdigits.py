"""AV-Digits: real spoken digits (FSDD) paired with real handwritten digits (MNIST test set).

Each sample is a short audio-visual clip of one digit class:

* audio: one FSDD recording placed at a random offset inside a ``clip_seconds`` window,
  as a Kaldi log-mel filterbank (frames x mel_bins), normalised with train-set statistics;
* video: ``frames`` frames of a ``frame_size``-pixel canvas on which an MNIST digit of the
  same class appears when the speech starts and then moves along a straight line, so the
  frames carry temporal structure aligned with the audio.

FSDD's official split gives the recordings (takes 0-4 test, 5-49 train); the MNIST test
images of each class are split into disjoint train and test pools, so no image is shared
between training and test clips. ``val_fraction`` of the training clips (per class) is held
out as validation. ``held_out_speakers`` (FSDD speaker names) are kept out of the stream: their
train and val clips become ``AVDataset.held_out`` (for the stage before the stream, config
``init``) and their test clips are dropped, so neither the stream nor its evaluation hears them.
Everything is deterministic given the seed. The built tensors are cached (keyed by the
options, the seed and the source files) to skip the ~5 s of decoding next time.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from avcl.core.errors import AvclError
from avcl.core.io import atomic_torch_save
from avcl.core.options import option
from avcl.data import AVDataset, register_dataset
from avcl.data.features import stratified_pick
from avcl.data.sources import (FSDD_URL, MNIST_URLS, default_cache_dir, list_fsdd, load_mnist_test, locate_fsdd,
                               locate_mnist, read_wav)
from avcl.data.stream import ResidencyOptions
from avcl.media.audio import kaldi_fbank


FSDD_TEST_TAKES = 5  # official split: takes 0-4 are the test set


@dataclass
class AVDigitsOptions(ResidencyOptions):
    name: str = "avdigits"
    download: bool = True  # fetch FSDD/MNIST into the cache when no local copy is found
    fsdd_url: str = FSDD_URL
    mnist_images_url: str = MNIST_URLS["t10k-images-idx3-ubyte.gz"]
    mnist_labels_url: str = MNIST_URLS["t10k-labels-idx1-ubyte.gz"]
    val_fraction: float = option(0.1, range="[0,1)")
    clip_seconds: float = option(1.0, range=">0")
    mel_bins: int = option(40, range=">=1")
    frame_shift_ms: float = option(10.0, range=">0")
    frames: int = option(8, range=">=1")
    frame_size: int = option(32, range=">=1")
    digit_size: int = option(20, range=">=1")  # MNIST digits are resized to this many pixels before pasting
    # FSDD speakers kept out of the stream: train+val clips -> AVDataset.held_out, test clips dropped
    held_out_speakers: List[str] = field(default_factory=list)
    cache: bool = True


def _pair_images(labels: np.ndarray, pool: dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """An image index from ``pool[label]`` for every clip, without reuse while the pool lasts."""
    chosen = np.empty(len(labels), dtype=np.int64)
    for digit, candidates in pool.items():
        where = np.flatnonzero(labels == digit)
        order = rng.permutation(candidates)
        chosen[where] = order[np.arange(len(where)) % len(order)]
    return chosen


def render_video(digits: torch.Tensor, onset: np.ndarray, opts: AVDigitsOptions,
                  rng: np.random.Generator) -> torch.Tensor:
    """(N, T, S, S) uint8: each digit appears at its onset frame and moves in a straight line."""
    n, size, room = len(digits), opts.frame_size, opts.frame_size - opts.digit_size
    video = torch.zeros(n, opts.frames, size, size, dtype=torch.uint8)
    start, end = rng.integers(0, room + 1, (n, 2)), rng.integers(0, room + 1, (n, 2))
    for i in range(n):  # dataset construction only; training never loops over samples
        visible = range(int(onset[i]), opts.frames)
        for step, t in enumerate(visible):
            frac = step / max(len(visible) - 1, 1)
            y, x = np.rint(start[i] + frac * (end[i] - start[i])).astype(int)
            video[i, t, y:y + opts.digit_size, x:x + opts.digit_size] = digits[i]
    return video


@register_dataset("avdigits", AVDigitsOptions,
                  "AV-Digits: FSDD spoken digits + MNIST handwritten digits as short AV clips (real data)")
def build_avdigits(opts: AVDigitsOptions, data_root: str | None, seed: int) -> AVDataset:
    found, missing = {}, []  # look for both before refusing: all missing data in one message
    for name, locate in (("fsdd", lambda: locate_fsdd(data_root, download=opts.download, url=opts.fsdd_url)),
                         ("mnist", lambda: locate_mnist(data_root, download=opts.download, urls={
                             "t10k-images-idx3-ubyte.gz": opts.mnist_images_url,
                             "t10k-labels-idx1-ubyte.gz": opts.mnist_labels_url}))):
        try:
            found[name] = locate()
        except AvclError as err:
            missing.append(str(err))
    if missing:
        raise AvclError("; ".join(missing))
    recordings_dir, mnist_dir = found["fsdd"], found["mnist"]
    recordings = list_fsdd(recordings_dir)
    speakers = sorted({speaker for _, _, speaker, _ in recordings})
    unknown = sorted(set(opts.held_out_speakers) - set(speakers))
    if unknown:
        raise AvclError(f"data.held_out_speakers: unknown FSDD speaker(s) {unknown} (known: {', '.join(speakers)})")
    # The options (held_out_speakers included) are part of the key: another choice is another entry.
    key_source = json.dumps({**OmegaConf.to_container(OmegaConf.structured(opts)), "seed": seed, "files": len(recordings),
                             "recordings": str(recordings_dir), "mnist": str(mnist_dir),
                             "version": 3}, sort_keys=True)
    cache_path = default_cache_dir() / "avdigits" / f"{hashlib.sha256(key_source.encode()).hexdigest()[:16]}.pt"
    if opts.cache and cache_path.is_file():
        try:
            return AVDataset(**torch.load(cache_path, weights_only=True))
        except Exception:  # a stale or damaged cache entry is rebuilt, never trusted
            pass
    # the one slow start (tens of seconds): say so, also where no bar is drawn (logs, CI)
    tqdm.write(f"avcl: AV-Digits: building {len(recordings)} clips (filterbanks, digit videos)"
               + (f"; cached in {cache_path.parent} for the next runs" if opts.cache else ""), file=sys.stderr)
    dataset = _build(opts, recordings, mnist_dir, seed)
    if opts.cache:
        atomic_torch_save({"name": dataset.name, "train": dataset.train, "val": dataset.val,
                           "test": dataset.test, "class_names": dataset.class_names,
                           "info": dataset.info, "held_out": dataset.held_out}, cache_path)
    return dataset


def _build(opts: AVDigitsOptions, recordings, mnist_dir, seed: int) -> AVDataset:
    rng = np.random.default_rng(seed)
    images, image_labels = load_mnist_test(mnist_dir)
    labels = np.array([digit for _, digit, _, _ in recordings])
    is_test = np.array([take < FSDD_TEST_TAKES for _, _, _, take in recordings])
    held = np.isin([speaker for _, _, speaker, _ in recordings], list(opts.held_out_speakers))

    # Disjoint MNIST pools: half of each class's images for training clips, half for test clips.
    pools: dict[str, dict[int, np.ndarray]] = {"train": {}, "test": {}}
    for digit in range(10):
        where = rng.permutation(np.flatnonzero(image_labels == digit))
        pools["train"][digit], pools["test"][digit] = where[:len(where) // 2], where[len(where) // 2:]
    image_index = np.empty(len(recordings), dtype=np.int64)
    for split, mask in (("train", ~is_test), ("test", is_test)):
        image_index[mask] = _pair_images(labels[mask], pools[split], rng)

    # Audio: place each recording at a random offset in the clip window, then filterbanks.
    sample_rate = read_wav(recordings[0][0])[1]
    window = int(round(opts.clip_seconds * sample_rate))
    audio, onset = [], np.empty(len(recordings), dtype=np.int64)
    for i, (path, *_rest) in enumerate(tqdm(recordings, desc="AV-Digits: filterbanks", unit="clip",
                                            disable=None, leave=False)):
        wave, rate = read_wav(path)
        if rate != sample_rate:
            raise AvclError(f"{path}: sample rate {rate} Hz differs from the other recordings ({sample_rate} Hz)")
        wave = wave[:window]
        offset = int(rng.integers(0, window - len(wave) + 1))
        clip = np.zeros(window, dtype=np.float32)
        clip[offset:offset + len(wave)] = wave
        audio.append(kaldi_fbank(clip, sample_rate, opts.mel_bins, opts.frame_shift_ms))
        onset[i] = min(int(offset / window * opts.frames), opts.frames - 1)
    audio = torch.from_numpy(np.stack(audio))

    digits = torch.nn.functional.interpolate(
        torch.from_numpy(images[image_index]).float()[:, None], size=opts.digit_size,
        mode="area")[:, 0].round().clamp(0, 255).to(torch.uint8)
    video = render_video(digits, onset, opts, rng)

    is_val = stratified_pick(labels, ~is_test & ~held, opts.val_fraction, rng)
    is_train = ~is_test & ~is_val & ~held
    is_held_out, dropped = ~is_test & held, is_test & held
    is_test = is_test & ~held
    mean = audio[torch.from_numpy(is_train)].mean(dim=(0, 1))
    std = audio[torch.from_numpy(is_train)].std(dim=(0, 1)).clamp_min(1e-5)
    audio = (audio - mean) / std
    label_tensor = torch.from_numpy(labels).long()

    def split(mask: np.ndarray) -> dict[str, torch.Tensor]:
        index = torch.from_numpy(np.flatnonzero(mask))
        return {"audio": audio[index], "video": video[index], "label": label_tensor[index]}

    masks = {"train": is_train, "val": is_val, "test": is_test}
    if held.any():
        masks["held_out"] = is_held_out
    return AVDataset(
        name="avdigits", train=split(is_train), val=split(is_val), test=split(is_test),
        held_out=split(is_held_out) if held.any() else {},
        class_names=[str(d) for d in range(10)],
        info={"audio": f"FSDD v1.0.10, Kaldi fbank {opts.mel_bins} bins, {opts.frame_shift_ms} ms shift, "
                       f"{opts.clip_seconds} s window, train-set normalisation",
              "video": f"MNIST test images, {opts.frames} frames of {opts.frame_size}px",
              "sample_rate": sample_rate,
              "counts": {"train": int(is_train.sum()), "val": int(is_val.sum()), "test": int(is_test.sum())},
              "held_out_speakers": sorted(opts.held_out_speakers),
              **({"held_out_counts": {"held_out": int(is_held_out.sum()), "dropped_test": int(dropped.sum())}}
                 if held.any() else {}),
              # provenance of every clip, so the disjointness of the splits can be checked
              "mnist_index": {name: image_index[mask].tolist() for name, mask in masks.items()},
              "fsdd_file": {name: [recordings[i][0].name for i in np.flatnonzero(mask)]
                            for name, mask in masks.items()}})
