"""Write short clips as MP4 files (H.264 video + AAC audio) with PyAV, atomically.

The index (moov) goes first (``faststart``), so a reader can stream the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import av
import numpy as np

from avcl.core.io import file_mode


def write_clip(path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
               sample_rate: int = 16000, crf: int = 23) -> None:
    """Write ``frames`` ((T, H, W) gray or (T, H, W, 3) RGB uint8; H, W even) and an optional mono
    float waveform in [-1, 1] to ``path``; the file appears only once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        with av.open(tmp, "w", format="mp4", options={"movflags": "faststart"}) as container:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            video.options = {"crf": str(crf), "preset": "veryfast"}
            astream = None
            if audio is not None:
                astream = container.add_stream("aac", rate=sample_rate)
                astream.layout = "mono"
            for image in frames:
                for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    container.mux(packet)
            for packet in video.encode():
                container.mux(packet)
            if astream is not None:
                samples = np.asarray(audio, dtype=np.float32).reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
                frame.sample_rate, frame.pts = sample_rate, 0
                for packet in astream.encode(frame):
                    container.mux(packet)
                for packet in astream.encode():
                    container.mux(packet)
        os.chmod(tmp, file_mode())  # mkstemp makes the file private; a written clip is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
