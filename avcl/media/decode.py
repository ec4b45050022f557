"""Decode video files with PyAV: T sampled frames and the audio track, in one streaming pass.

Memory stays bounded whatever the clip length: frames are decoded one by one, only the frames
that the sampler picks are converted (resized and cropped straight away by ``frame.reformat``),
and the audio is resampled to the target rate and downmixed to mono chunk by chunk.

Frame samplers (``DecodeOptions.sampling``):

* ``uniform``: ``frames`` timestamps evenly spaced from the first to the last frame of the clip
  or window (first frame, evenly spaced frames, last frame: AV-CIL's sampler), the nearest
  decoded frame to each;
* ``fps``: the clip resampled to ``fps`` frames per second (as ``ffmpeg -r`` does before AV-CIL
  picks frames), then ``frames`` of those picked uniformly (all of them when ``frames`` is 0).

Bad files never raise: :func:`decode_clip` returns a :class:`DecodedClip` whose ``status`` is
"ok", "skipped" (no audio track with ``missing_audio="skip"``) or "failed", with a ``reason``
naming what went wrong (not a media file, unreadable, no video stream, truncated, ...).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import av
import numpy as np

from avcl.core.errors import AvclError


OK, SKIPPED, FAILED = "ok", "skipped", "failed"
SAMPLINGS = ("uniform", "fps")
MISSING_AUDIO = ("silent", "skip")


@dataclass
class DecodeOptions:
    """What to take out of a clip (the video/audio part of an extraction preset)."""
    video: bool = True  # decode frames
    audio: bool = True  # decode the audio track
    frames: int = 16  # frames per clip (0 with sampling=fps: every resampled frame)
    sampling: str = "uniform"  # uniform | fps
    fps: float = 10.0  # only for sampling=fps
    size: int = 112  # shorter side resized to this, then center-cropped to size x size (0: keep as is)
    gray: bool = False  # (T, H, W) grayscale instead of (T, H, W, 3) RGB
    sample_rate: int = 16000  # audio resampled to this rate, mono
    missing_audio: str = "silent"  # silent: zeros and audio_present=False | skip: status "skipped"
    truncated_tolerance: float = 0.9  # fail clips whose decoded video ends before this share of the window

    def check(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise AvclError(f"sampling must be one of {list(SAMPLINGS)}, got '{self.sampling}'")
        if self.missing_audio not in MISSING_AUDIO:
            raise AvclError(f"missing_audio must be one of {list(MISSING_AUDIO)}, got '{self.missing_audio}'")
        if self.frames < 0 or (self.frames == 0 and self.sampling != "fps"):
            raise AvclError(f"frames must be >= 1 (0 only with sampling=fps), got {self.frames}")
        if self.sampling == "fps" and self.fps <= 0:
            raise AvclError(f"fps must be > 0 with sampling=fps, got {self.fps}")
        if self.size < 0 or self.sample_rate <= 0:
            raise AvclError(f"size must be >= 0 and sample_rate > 0, got {self.size}, {self.sample_rate}")
        if not (self.video or self.audio):
            raise AvclError("nothing to decode: video and audio are both off")


@dataclass
class DecodedClip:
    """The result of decoding one file; ``status`` says whether ``video``/``audio`` can be used."""
    path: str
    status: str = OK
    reason: str = ""
    video: np.ndarray | None = None  # (T, H, W) or (T, H, W, 3) uint8
    frame_times: np.ndarray | None = None  # (T,) seconds of the picked frames
    audio: np.ndarray | None = None  # (samples,) float32 mono in [-1, 1]
    audio_present: bool = False  # False: the file has no audio track (``audio`` is silence)
    duration: float | None = None  # seconds of the decoded window
    info: dict = field(default_factory=dict)  # codec, size, rates of the source

    @property
    def ok(self) -> bool:
        return self.status == OK


def _failed(path: str, reason: str) -> DecodedClip:
    return DecodedClip(path=path, status=FAILED, reason=reason)


def output_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``size`` (aspect kept)."""
    if size <= 0:
        return width, height
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def _convert(frame: av.VideoFrame, opts: DecodeOptions) -> np.ndarray:
    """Resize (shorter side), center-crop to a square and convert one frame to uint8."""
    width, height = output_size(frame.width, frame.height, opts.size)
    fmt = "gray" if opts.gray else "rgb24"
    image = frame.to_ndarray(width=width, height=height, format=fmt, interpolation="AREA")
    if opts.size > 0:
        top, left = (height - opts.size) // 2, (width - opts.size) // 2
        image = image[top:top + opts.size, left:left + opts.size]
    return np.ascontiguousarray(image)


def _duration(container, stream) -> float | None:
    """Seconds of the video stream from the container's headers, or None when they do not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _scan_duration(path: str) -> float | None:
    """End time of the video stream found by demuxing its packets (no decoding): for files
    whose container does not record a duration."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        end = None
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
            end = stop if end is None else max(end, stop)
        return end


def target_times(opts: DecodeOptions, start: float, end: float, frame_step: float) -> np.ndarray:
    """Timestamps to sample in [start, end); ``frame_step`` is the source's frame interval."""
    last = max(start, end - frame_step)  # the last frame starts one interval before the end
    if opts.sampling == "uniform":
        return np.linspace(start, last, opts.frames)
    grid = start + np.arange(max(1, math.floor((end - start) * opts.fps + 1e-6))) / opts.fps
    if opts.frames == 0:
        return grid
    return grid[np.rint(np.linspace(0, len(grid) - 1, opts.frames)).astype(int)]


class _FramePicker:
    """Assigns every target time the decoded frame nearest to it, converting only those frames."""

    def __init__(self, targets: np.ndarray, opts: DecodeOptions):
        self.targets, self.opts = targets, opts
        self.picked: list[np.ndarray | None] = [None] * len(targets)
        self.times = np.full(len(targets), np.nan)
        self.next = 0  # first target not assigned yet
        self.prev: tuple[float, av.VideoFrame] | None = None
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None  # a frame picked twice is converted once

    def _assign(self, index: int, time: float, frame: av.VideoFrame) -> None:
        if self._last is None or self._last[0] is not frame:
            self._last = (frame, _convert(frame, self.opts))
        self.picked[index], self.times[index] = self._last[1], time

    def push(self, time: float, frame: av.VideoFrame) -> None:
        while self.next < len(self.targets) and self.targets[self.next] <= time:
            target = self.targets[self.next]
            if self.prev is not None and target - self.prev[0] < time - target:
                self._assign(self.next, *self.prev)
            else:
                self._assign(self.next, time, frame)
            self.next += 1
        self.prev = (time, frame)

    @property
    def complete(self) -> bool:
        return self.next >= len(self.targets)

    def finish(self) -> np.ndarray | None:
        """Targets past the last decoded frame get the last frame; None when nothing was decoded."""
        if self.prev is None:
            return None
        while self.next < len(self.targets):
            self._assign(self.next, *self.prev)
            self.next += 1
        return np.stack(self.picked)


class _AudioCollector:
    """Resamples the audio track to mono float32 at the target rate and keeps the window's samples."""

    def __init__(self, rate: int, start: float, end: float | None):
        self.rate, self.start, self.end = rate, start, end
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self.chunks: list[np.ndarray] = []
        self.first_time: float | None = None  # time of the first decoded sample
        self.samples = 0

    def push(self, frame: av.AudioFrame | None) -> None:
        if frame is not None and self.first_time is None:
            self.first_time = float(frame.time) if frame.time is not None else 0.0
        for out in self.resampler.resample(frame):
            chunk = out.to_ndarray().reshape(-1)
            self.chunks.append(chunk)
            self.samples += len(chunk)

    @property
    def time(self) -> float:
        return (self.first_time or 0.0) + self.samples / self.rate

    def finish(self) -> np.ndarray:
        self.push(None)  # flush the resampler
        audio = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        offset = round(((self.first_time or 0.0) - self.start) * self.rate)  # first sample's position in the window
        if offset > 0:
            audio = np.concatenate([np.zeros(offset, np.float32), audio])
        else:
            audio = audio[-offset:]
        if self.end is not None:
            audio = audio[:round((self.end - self.start) * self.rate)]
        return np.ascontiguousarray(audio, dtype=np.float32)


def _error_reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, (PermissionError, IsADirectoryError)):
        return f"unreadable: {err.strerror or err}"
    if isinstance(err, av.error.InvalidDataError):
        return "not a video file, or corrupt (FFmpeg found no valid data)"
    return f"{type(err).__name__}: {err}"


def decode_clip(path, opts: DecodeOptions | None = None, start: float | None = None,
                end: float | None = None) -> DecodedClip:
    """Decode ``path`` (or its [start, end] seconds window); never raises for a bad file."""
    opts = opts or DecodeOptions()
    path = str(path)
    if not os.path.exists(path):
        return _failed(path, "file not found")
    if os.path.isdir(path):
        return _failed(path, "unreadable: is a directory")
    if not os.access(path, os.R_OK):
        return _failed(path, "unreadable: permission denied")
    if os.path.getsize(path) == 0:
        return _failed(path, "empty file")
    try:
        return _decode(path, opts, start, end)
    except Exception as err:  # noqa: BLE001 -- every failure of a file becomes its status
        return _failed(path, _error_reason(err))


def _decode(path: str, opts: DecodeOptions, start: float | None, end: float | None) -> DecodedClip:
    start = max(0.0, float(start or 0.0))
    with av.open(path) as container:
        if opts.video and not container.streams.video:
            return _failed(path, "no video stream")
        has_audio = bool(container.streams.audio)
        if opts.audio and not has_audio and opts.missing_audio == "skip":
            return DecodedClip(path=path, status=SKIPPED, reason="no audio stream (missing_audio=skip)")
        vstream = container.streams.video[0] if container.streams.video else None
        astream = container.streams.audio[0] if has_audio and opts.audio else None
        info = {"container": container.format.name}
        duration = _duration(container, vstream) if vstream is not None else (
            container.duration / av.time_base if container.duration is not None else None)
        if duration is None and vstream is not None:
            duration = _scan_duration(path)
            info["duration_from"] = "packets"
        if end is None:
            end = duration
        elif duration is not None:
            end = min(float(end), duration)
        if end is not None and end <= start:
            return _failed(path, f"empty window: start {start:.2f} s >= end {end:.2f} s (clip duration {duration})")

        picker = None
        streams = []
        if opts.video and vstream is not None:
            vstream.thread_type = "AUTO"
            rate = float(vstream.average_rate or vstream.guessed_rate or 25)
            info.update(video_codec=vstream.codec_context.name, width=vstream.codec_context.width,
                        height=vstream.codec_context.height, fps=rate)
            if end is None:
                return _failed(path, "unknown duration: no duration in the container and no timestamps")
            picker = _FramePicker(target_times(opts, start, end, 1.0 / rate), opts)
            streams.append(vstream)
        audio = None
        if astream is not None:
            info.update(audio_codec=astream.codec_context.name, audio_rate=astream.codec_context.sample_rate,
                        audio_channels=astream.codec_context.channels)
            audio = _AudioCollector(opts.sample_rate, start, end)
            streams.append(astream)
        if start > 1.0:  # jump near the window; keyframe before it, frames before start are skipped below
            try:
                container.seek(int(start * av.time_base), backward=True)
            except av.error.FFmpegError:
                pass  # unseekable: decode from the beginning
        last_video_time = None
        try:
            for packet in container.demux(streams):
                for frame in packet.decode():
                    time = frame.time
                    if isinstance(frame, av.VideoFrame):
                        if time is None:  # no timestamps: count frames
                            time = 0.0 if last_video_time is None else last_video_time + 1.0 / info["fps"]
                        last_video_time = time
                        if time >= start - 0.5 / info["fps"] and not picker.complete:
                            picker.push(time, frame)
                    elif time is None or end is None or time < end:
                        if time is None or time + frame.samples / frame.sample_rate > start:
                            audio.push(frame)
                if (picker is None or picker.complete) and (audio is None or (end is not None and audio.time >= end)):
                    break
        except av.error.FFmpegError as err:  # corrupt data mid-stream: keep what decoded, judged below
            info["decode_error"] = str(err)
        result = DecodedClip(path=path, info=info, audio_present=has_audio and opts.audio,
                             duration=None if end is None else end - start)
        if picker is not None:
            video = picker.finish()
            detail = f" ({info['decode_error']})" if "decode_error" in info else ""
            if video is None:
                return _failed(path, f"no decodable video frames (corrupt or truncated file){detail}")
            window_end = end - 1.0 / info["fps"]
            if last_video_time < start + opts.truncated_tolerance * (window_end - start) - 0.5:
                return _failed(path, f"truncated: video decodes up to {last_video_time:.2f} s of {end:.2f} s{detail}")
            result.video, result.frame_times = video, picker.times
        if opts.audio:
            if audio is not None:
                result.audio = audio.finish()
            else:  # missing_audio=silent
                result.audio = np.zeros(round((end - start) * opts.sample_rate) if end else 0, np.float32)
        return result
