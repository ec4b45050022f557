"""Decoding with PyAV: samplers, resizing, audio resampling, and every kind of bad file."""
import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from avcl.media.decode import FAILED, OK, SKIPPED, DecodeOptions, decode_clip, target_times
from avcl.media.encode import write_clip
from avcl.media.frontend import AudioFrontend, audio_features
from tests.conftest import DATA_DIR, needs_data

CLIPS = Path(DATA_DIR or "/nonexistent") / "clips"


@pytest.fixture(scope="module")
def ramp(tmp_path_factory):
    """A 2-second 10 fps clip whose frame k is uniformly gray 10*k, with a 440 Hz tone at 16 kHz."""
    path = tmp_path_factory.mktemp("media") / "ramp.mp4"
    frames = np.repeat((np.arange(20) * 10).astype(np.uint8)[:, None, None], 48, 1).repeat(64, 2)
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000).astype(np.float32)
    write_clip(path, frames, 10, tone, 16000)
    return path


def test_uniform_sampler_first_evenly_spaced_last(ramp):
    clip = decode_clip(ramp, DecodeOptions(frames=4, size=32, gray=True))
    assert clip.status == OK and clip.video.shape == (4, 32, 32) and clip.video.dtype == np.uint8
    np.testing.assert_allclose(clip.frame_times, [0.0, 0.6, 1.3, 1.9], atol=1e-6)  # first ... last frame
    np.testing.assert_allclose(clip.video[:, 16, 16], [0, 60, 130, 190], atol=3)  # the right frames
    assert clip.audio_present and clip.audio.shape == (32000,)
    spectrum = np.abs(np.fft.rfft(clip.audio[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) < 2  # the tone survived encode + resample


def test_fps_sampler_window_rgb_and_resample(ramp):
    opts = DecodeOptions(frames=0, sampling="fps", fps=5, size=24, sample_rate=8000)
    clip = decode_clip(ramp, opts, start=0.5, end=1.5)
    assert clip.status == OK and clip.video.shape == (5, 24, 24, 3)
    np.testing.assert_allclose(clip.frame_times, [0.5, 0.7, 0.9, 1.1, 1.3], atol=1e-6)
    assert clip.audio.shape == (8000,)  # 1 s window at 8 kHz
    np.testing.assert_allclose(target_times(DecodeOptions(frames=3, sampling="fps", fps=10), 0, 2, 0.1),
                               [0.0, 1.0, 1.9], atol=1e-9)  # AV-CIL: 10 fps grid, then 3 uniform picks


def test_audio_frontends_shapes_and_normalisation(ramp):
    audio = decode_clip(ramp, DecodeOptions(frames=1)).audio
    fbank = audio_features(audio, 16000, AudioFrontend(num_bins=64, target_frames=300))
    assert fbank.shape == (300, 64) and np.all(fbank[250:] == 0)  # 2 s = ~198 frames, zero-padded
    normed = audio_features(audio, 16000, AudioFrontend(num_bins=64, target_frames=100, norm_mean=-4.0, norm_std=4.0))
    np.testing.assert_allclose(normed, (fbank[:100] + 4.0) / 8.0, rtol=1e-5, atol=1e-5)
    mel = audio_features(audio, 16000, AudioFrontend(kind="logmel", num_bins=40, target_frames=0))
    assert mel.shape[1] == 40 and 190 <= mel.shape[0] <= 200
    peak_bin = mel[50:150].mean(0).argmax()
    assert 5 <= peak_bin <= 15  # 440 Hz sits low on a 40-band mel scale up to 8 kHz


def test_missing_audio_silent_or_skip(tmp_path):
    path = tmp_path / "mute.mp4"
    write_clip(path, np.zeros((10, 32, 32), np.uint8), 10)
    silent = decode_clip(path, DecodeOptions(frames=2, size=16))
    assert silent.status == OK and not silent.audio_present and silent.audio.shape == (16000,)
    assert not silent.audio.any()
    skipped = decode_clip(path, DecodeOptions(frames=2, missing_audio="skip"))
    assert skipped.status == SKIPPED and "no audio stream" in skipped.reason


def test_bad_files_are_reported_not_raised(tmp_path, ramp):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 100)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    data = ramp.read_bytes()
    truncated.write_bytes(data[:len(data) // 3])
    audio_only = tmp_path / "speech.m4a"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    unreadable = tmp_path / "locked.mp4"
    shutil.copy(ramp, unreadable)
    os.chmod(unreadable, 0)
    expected = {corrupt: "not a video", text: "not a video", empty: "empty file",
                tmp_path / "missing.mp4": "file not found", tmp_path: "is a directory", truncated: "",
                audio_only: "no video stream"}
    if os.geteuid() != 0:  # root reads anything
        expected[unreadable] = "permission denied"
    for path, reason in expected.items():
        clip = decode_clip(path, DecodeOptions(frames=4, size=16))
        assert clip.status == FAILED, (path, clip.status)
        assert reason in clip.reason and clip.video is None


def test_truncated_mid_stream_is_failed_with_reason(tmp_path):
    """A file cut in half after its index (faststart) decodes only a prefix: reported as truncated."""
    path = tmp_path / "long.mp4"
    frames = np.random.default_rng(1).integers(0, 256, (60, 32, 32), dtype=np.uint8)
    write_clip(path, frames, 10)
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    clip = decode_clip(cut, DecodeOptions(frames=4, size=16, audio=False))
    assert clip.status == FAILED and "truncated" in clip.reason, clip.reason
    assert decode_clip(path, DecodeOptions(frames=4, size=16, audio=False)).status == OK


@needs_data
def test_every_real_clip_decodes_or_is_reported():
    opts = DecodeOptions(frames=8, size=64)
    results = {p.name: decode_clip(p, opts) for p in sorted(CLIPS.iterdir())}
    assert len(results) == 10
    for name, clip in results.items():
        assert clip.status == OK, (name, clip.reason)
        assert clip.video.shape == (8, 64, 64, 3)
        assert np.all(np.diff(clip.frame_times) >= 0) and clip.frame_times[0] < 0.2
        assert clip.frame_times[-1] > 0.8 * clip.duration - 0.2  # reaches the end of the clip
        assert clip.audio.shape[0] > 0.9 * clip.duration * 16000
        assert clip.audio_present == (name not in {"mmaction2_test.mp4", "mmaction2_demo.mp4"})
    assert results["moviepy_no_duration.webm"].info["duration_from"] == "packets"
    # Media time, not a speed check: the clip's length in seconds, recovered from its packets
    # because the container declares none (the file is a 5-second clip).
    assert 4.5 < results["moviepy_no_duration.webm"].duration < 5.5
    assert results["moviepy_fire2.mp4"].audio_present  # variable frame rate, mono AAC
    assert decode_clip(CLIPS / "mmaction2_demo.mp4", DecodeOptions(missing_audio="skip")).status == SKIPPED


@needs_data
def test_window_of_long_clip_seeks():
    clip = decode_clip(CLIPS / "moviepy_big_buck_bunny_0_30.webm", DecodeOptions(frames=4, size=32), start=20, end=22)
    assert clip.status == OK and 19.9 < clip.frame_times[0] < 20.1 and 21.8 < clip.frame_times[-1] < 22.0
    assert clip.audio.shape == (32000,)


def test_numpy_fbank_matches_kaldi_native_fbank_and_covers_audiomae_settings():
    from avcl.media.audio import kaldi_fbank
    from avcl.media.frontend import numpy_kaldi_fbank
    wave = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
    for rate, bins, window in ((11430, 128, "hanning"), (16000, 64, "povey"), (8000, 40, "hamming")):
        np.testing.assert_allclose(numpy_kaldi_fbank(wave, rate, bins, 10, 25, window),
                                   kaldi_fbank(wave, rate, bins, 10, 25, window), atol=1e-3)
    with pytest.raises(ValueError):  # kaldi-native-fbank refuses AudioMAE's 128 bins at 16 kHz ...
        kaldi_fbank(wave, 16000, 128, 10, 25, "hanning")
    feats = audio_features(wave, 16000, AudioFrontend(num_bins=128, target_frames=1024))  # ... avcl does not
    assert feats.shape == (1024, 128) and np.isfinite(feats).all()
    assert np.allclose(feats[:98, 3], np.log(np.finfo(np.float32).eps))  # an empty mel bin, as in torchaudio
