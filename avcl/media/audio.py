"""Audio front-ends: Kaldi-compatible log-mel filterbanks through kaldi-native-fbank."""
from __future__ import annotations

import kaldi_native_fbank as knf
import numpy as np


def kaldi_fbank(samples: np.ndarray, sample_rate: int, num_bins: int = 128,
                frame_shift_ms: float = 10.0, frame_length_ms: float = 25.0,
                window: str = "povey") -> np.ndarray:
    """(frames, num_bins) float32 log filterbank energies of a mono float waveform in [-1, 1].

    Kaldi's defaults except for dither (off, so features are deterministic). The waveform is
    scaled to the 16-bit range first, as Kaldi (and torchaudio's kaldi.fbank on int16 audio) sees it.
    """
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_shift_ms = frame_shift_ms
    opts.frame_opts.frame_length_ms = frame_length_ms
    opts.frame_opts.window_type = window
    opts.mel_opts.num_bins = num_bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(float(sample_rate), (samples * 32768.0).astype(np.float32))
    fbank.input_finished()
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)]).astype(np.float32)
