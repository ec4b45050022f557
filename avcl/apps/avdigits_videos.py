"""AV-Digits as real video files: FSDD speech + a moving MNIST digit, written as MP4 (H.264 + AAC).

The clips are built as in ``avcl.data.avdigits`` (FSDD's official split: takes 0-4 test, the
rest train; disjoint halves of the MNIST test images for training and test clips; the speech
placed at a random offset in the clip, the digit appearing when the speech starts and moving in
a straight line), but kept as waveform + frames and encoded to files, so that the whole path
files -> decode -> extract -> train runs on real speech and handwriting.

Output: ``OUT/<split>/<digit>/<fsdd name>.mp4`` and ``OUT/manifest.csv`` (path,label,split).
Existing clips are kept (files are written atomically), so an interrupted run can be resumed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from avcl.core.errors import AvclError
from avcl.core.io import atomic_write_text
from avcl.data.avdigits import FSDD_TEST_TAKES, AVDigitsOptions, render_video
from avcl.data.sources import list_fsdd, load_mnist_test, locate_fsdd, locate_mnist, read_wav
from avcl.media.encode import write_clip


@dataclass
class VideoDigitsOptions:
    per_class: int = 0  # training clips per digit (0: every recording, 45 takes x 6 speakers)
    # test clips per digit; 0: every test recording when per_class is 0, else per_class // 4 + 1
    test_per_class: int = 0
    clip_seconds: float = 1.0
    frames: int = 8  # frames per clip (fps = frames / clip_seconds)
    frame_size: int = 64  # even: H.264 with yuv420p needs even sizes
    digit_size: int = 40
    seed: int = 0
    download: bool = False  # fetch FSDD / MNIST into the cache when not found locally


def _choose(recordings, per_class: int, test_per_class: int, rng) -> list[int]:
    """Indices of the recordings to render: ``per_class`` train and ``test_per_class`` test per digit."""
    chosen = []
    for digit in range(10):
        for is_test, count in ((False, per_class), (True, test_per_class)):
            rows = [i for i, (_, d, _, take) in enumerate(recordings)
                    if d == digit and (take < FSDD_TEST_TAKES) == is_test]
            chosen += sorted(rng.permutation(rows)[:count].tolist()) if count else rows
    return chosen


def make_videos(out, opts: VideoDigitsOptions, data_root: str | None = None, progress: bool = True) -> Path:
    """Write the clips and the manifest; returns the manifest's path."""
    if opts.frame_size % 2 or opts.digit_size > opts.frame_size or opts.frames < 1 or opts.clip_seconds <= 0:
        raise AvclError("need an even frame_size >= digit_size, frames >= 1 and clip_seconds > 0")
    if opts.per_class < 0 or opts.test_per_class < 0:
        raise AvclError("--per-class and --test-per-class must be >= 0")
    out = Path(out)
    recordings = list_fsdd(locate_fsdd(data_root, download=opts.download))
    images, image_labels = load_mnist_test(locate_mnist(data_root, download=opts.download))
    rng = np.random.default_rng(opts.seed)
    test_per_class = opts.test_per_class or (opts.per_class // 4 + 1 if opts.per_class else 0)
    chosen = _choose(recordings, opts.per_class, test_per_class, rng)

    pools = {"train": {}, "test": {}}  # disjoint MNIST halves for training and test clips
    for digit in range(10):
        where = rng.permutation(np.flatnonzero(image_labels == digit))
        pools["train"][digit], pools["test"][digit] = where[:len(where) // 2], where[len(where) // 2:]
    render = AVDigitsOptions(frames=opts.frames, frame_size=opts.frame_size, digit_size=opts.digit_size)
    fps = opts.frames / opts.clip_seconds
    if abs(fps - round(fps)) > 1e-9:
        raise AvclError(f"frames / clip_seconds must be a whole frame rate, got {fps}")
    rows = ["path,label,split"]
    used = {"train": {d: 0 for d in range(10)}, "test": {d: 0 for d in range(10)}}
    for index in tqdm(chosen, desc="AV-Digits videos", unit="clip", disable=None if progress else True):
        wav_path, digit, _speaker, take = recordings[index]
        split = "test" if take < FSDD_TEST_TAKES else "train"
        pool = pools[split][digit]
        image = images[pool[used[split][digit] % len(pool)]]
        used[split][digit] += 1
        wave, rate = read_wav(wav_path)
        window = int(round(opts.clip_seconds * rate))
        wave = wave[:window]
        offset = int(rng.integers(0, window - len(wave) + 1))
        audio = np.zeros(window, dtype=np.float32)
        audio[offset:offset + len(wave)] = wave
        onset = np.array([min(int(offset / window * opts.frames), opts.frames - 1)])
        digit_image = torch.nn.functional.interpolate(torch.from_numpy(image).float()[None, None],
                                                      size=opts.digit_size, mode="area")[0]
        digit_image = digit_image.round().clamp(0, 255).to(torch.uint8)
        video = render_video(digit_image, onset, render, rng)[0].numpy()
        relative = Path(split) / str(digit) / f"{wav_path.stem}.mp4"
        if not (out / relative).is_file():
            write_clip(out / relative, video, int(round(fps)), audio, rate)
        rows.append(f"{relative.as_posix()},{digit},{split}")
    manifest = out / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    return manifest
