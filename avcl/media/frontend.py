"""Audio front-ends for decoded waveforms: Kaldi filterbanks (AudioMAE / CAV-MAE / AV-CIL settings)
or a plain log-mel spectrogram, padded or cut to a fixed number of frames and normalised.

The Kaldi filterbank is kaldi-native-fbank (``avcl.media.audio.kaldi_fbank``), which matches
torchaudio's ``kaldi.fbank`` used by AudioMAE, CAV-MAE and AV-CIL; where it refuses the settings
(mel bins narrower than an FFT bin, e.g. 128 bins at 16 kHz) a numpy port of torchaudio's
computation is used instead (tested equal to kaldi-native-fbank where both work). The normalisation follows
AudioMAE/CAV-MAE: ``(fbank - mean) / (2 * std)`` with the dataset's mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avcl.core.errors import AvclError
from avcl.media.audio import kaldi_fbank


KINDS = ("fbank", "logmel")


@dataclass
class AudioFrontend:
    kind: str = "fbank"  # fbank (Kaldi-compatible) | logmel (Hann STFT, HTK mel, natural log)
    num_bins: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    window: str = "hanning"  # Kaldi window type (fbank only)
    target_frames: int = 1024  # zero-padded or cut to this many frames (0: keep the natural length)
    subtract_mean: bool = True  # remove the waveform's DC offset first (AudioMAE, AV-CIL)
    norm_mean: float = 0.0  # dataset statistics; (x - mean) / (2 * std) when norm_std > 0
    norm_std: float = 0.0

    def check(self) -> None:
        if self.kind not in KINDS:
            raise AvclError(f"audio front-end kind must be one of {list(KINDS)}, got '{self.kind}'")
        if self.num_bins < 1 or self.frame_shift_ms <= 0 or self.frame_length_ms <= 0 or self.target_frames < 0:
            raise AvclError("audio front-end: num_bins >= 1, frame_shift_ms > 0, frame_length_ms > 0, "
                            "target_frames >= 0 required")


WINDOWS = {"hanning": lambda n: 0.5 - 0.5 * np.cos(2 * np.pi * n / (len(n) - 1)),
           "povey": lambda n: (0.5 - 0.5 * np.cos(2 * np.pi * n / (len(n) - 1))) ** 0.85,
           "hamming": lambda n: 0.54 - 0.46 * np.cos(2 * np.pi * n / (len(n) - 1)),
           "rectangular": lambda n: np.ones(len(n))}


def numpy_kaldi_fbank(samples: np.ndarray, sample_rate: int, num_bins: int, frame_shift_ms: float,
                      frame_length_ms: float, window: str) -> np.ndarray:
    """Kaldi's fbank in numpy, as torchaudio's ``kaldi.fbank`` computes it (no dither, no energy,
    snip_edges): used where kaldi-native-fbank refuses settings because some mel bins get no
    FFT bin (e.g. 128 bins at 16 kHz, AudioMAE's setting); those bins are log(float eps), as in torchaudio."""
    if window not in WINDOWS:
        raise AvclError(f"unknown window '{window}' (known: {', '.join(WINDOWS)})")
    shift, length = int(sample_rate * frame_shift_ms / 1000), int(sample_rate * frame_length_ms / 1000)
    n_fft = 1 << (length - 1).bit_length()
    wave = np.asarray(samples, dtype=np.float64) * 32768.0
    count = 1 + (len(wave) - length) // shift if len(wave) >= length else 0
    frames = np.lib.stride_tricks.sliding_window_view(wave, length)[::shift][:count].copy()
    frames -= frames.mean(axis=1, keepdims=True)  # remove DC offset
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()  # pre-emphasis
    frames[:, 0] -= 0.97 * frames[:, 0]
    frames *= WINDOWS[window](np.arange(length))
    power = np.abs(np.fft.rfft(frames, n=n_fft)) ** 2
    mel = lambda hz: 1127.0 * np.log1p(np.asarray(hz) / 700.0)  # noqa: E731
    low, high = mel(20.0), mel(sample_rate / 2)
    delta = (high - low) / (num_bins + 1)
    fft_mels = mel(np.arange(n_fft // 2) * sample_rate / n_fft)
    left = low + np.arange(num_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    rising, falling = (fft_mels - left) / (center - left), (right - fft_mels) / (right - center)
    banks = np.where((fft_mels > left) & (fft_mels < right), np.where(fft_mels <= center, rising, falling), 0.0)
    energies = power[:, :n_fft // 2] @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps)).astype(np.float32)


def log_mel(samples: np.ndarray, sample_rate: int, num_bins: int, frame_shift_ms: float,
            frame_length_ms: float) -> np.ndarray:
    """(frames, num_bins) natural-log mel power spectrogram (Hann window, HTK mel scale)."""
    hop = max(1, round(sample_rate * frame_shift_ms / 1000))
    length = max(2, round(sample_rate * frame_length_ms / 1000))
    n_fft = 1 << (length - 1).bit_length()
    if len(samples) < length:
        samples = np.pad(samples, (0, length - len(samples)))
    count = 1 + (len(samples) - length) // hop
    frames = np.lib.stride_tricks.sliding_window_view(samples, length)[::hop][:count]
    power = np.abs(np.fft.rfft(frames * np.hanning(length).astype(np.float32), n=n_fft)) ** 2
    mel = lambda hz: 1127.0 * np.log1p(hz / 700.0)  # noqa: E731
    edges = 700.0 * np.expm1(np.linspace(mel(20.0), mel(sample_rate / 2), num_bins + 2) / 1127.0)
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    weights = np.maximum(0.0, np.minimum((freqs - lower) / (centre - lower), (upper - freqs) / (upper - centre)))
    return np.log(power @ weights.T + 1e-6).astype(np.float32)


def audio_features(samples: np.ndarray, sample_rate: int, frontend: AudioFrontend) -> np.ndarray:
    """(target_frames, num_bins) float32 features of a mono waveform."""
    samples = np.asarray(samples, dtype=np.float32)
    if frontend.subtract_mean and len(samples):
        samples = samples - samples.mean()
    min_len = round(sample_rate * frontend.frame_length_ms / 1000)
    if len(samples) < min_len:  # silent or very short audio still gives one frame
        samples = np.pad(samples, (0, min_len - len(samples)))
    if frontend.kind == "fbank":
        args = (samples, sample_rate, frontend.num_bins, frontend.frame_shift_ms, frontend.frame_length_ms,
                frontend.window)
        try:
            feats = kaldi_fbank(*args)
        except ValueError:  # kaldi-native-fbank refuses empty mel bins; torchaudio (AudioMAE) allows them
            feats = numpy_kaldi_fbank(*args)
    else:
        feats = log_mel(samples, sample_rate, frontend.num_bins, frontend.frame_shift_ms, frontend.frame_length_ms)
    if frontend.target_frames:
        feats = feats[:frontend.target_frames]
        feats = np.pad(feats, ((0, frontend.target_frames - len(feats)), (0, 0)))
    if frontend.norm_std > 0:
        feats = (feats - frontend.norm_mean) / (2 * frontend.norm_std)
    return feats.astype(np.float32)
