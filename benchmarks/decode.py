"""Decoding speed and memory: avcl's decode + preprocess against bare PyAV decoding.

* ``avcl``: ``decode_clip`` (16 uniform frames, 112 px RGB, audio at 16 kHz mono) and the
  AudioMAE fbank (128 bins, 1024 frames): what ``avcl extract`` workers do per clip;
* ``avcl_decode``: the same without the fbank;
* ``bare``: plain PyAV on the same files: every video frame decoded, the same 16 frames
  converted at the same size, the audio resampled to 16 kHz mono (no selection logic, no fbank).

Ratios above 1 mean avcl is faster (it stops demuxing once the last needed frame and audio
sample are in). Scaling: clips/s of the extraction workers (``prepare``) with 1 and 2 processes.
Memory: peak RSS growth (sampled every 2 ms) and tracemalloc peak while decoding the 30-second
720p clip, in a fresh process, against the ~1.9 GiB its frames would take at full resolution. The last line holds every number as ``name=value`` pairs.

    python benchmarks/decode.py [--clips DIR] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import av
import numpy as np

from avcl.media.decode import DecodeOptions, decode_clip, output_size
from avcl.apps.extract import prepare
from avcl.media.frontend import AudioFrontend, audio_features

OPTS = DecodeOptions(frames=16, size=112, sample_rate=16000)
FRONTEND = AudioFrontend(num_bins=128, target_frames=1024)
LONG_CLIP = "moviepy_big_buck_bunny_0_30.webm"


def bare_pyav(path: str, picked_times: np.ndarray) -> None:
    """Decode every frame, convert the frames at ``picked_times``, resample the whole audio track."""
    wanted = set(np.round(picked_times, 4).tolist())
    with av.open(path) as container:
        streams = [container.streams.video[0]] + list(container.streams.audio[:1])
        streams[0].thread_type = "AUTO"
        resampler = av.AudioResampler(format="flt", layout="mono", rate=OPTS.sample_rate)
        chunks = []
        for frame in container.decode(*streams):
            if isinstance(frame, av.VideoFrame):
                if frame.time is not None and round(frame.time, 4) in wanted:
                    width, height = output_size(frame.width, frame.height, OPTS.size)
                    frame.to_ndarray(width=width, height=height, format="rgb24", interpolation="AREA")
            else:
                chunks += [f.to_ndarray() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]


def avcl_full(path: str) -> None:
    clip = decode_clip(path, OPTS)
    audio_features(clip.audio, OPTS.sample_rate, FRONTEND)


def timed(function, items, repeats: int) -> float:
    """Clips per second over ``repeats`` passes (after one warm-up pass)."""
    for item in items:
        function(*item)
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            function(*item)
    return repeats * len(items) / (time.perf_counter() - start)


def workers_rate(paths: list[str], workers: int, repeats: int) -> float:
    jobs = [(i, p, None, None) for i, p in enumerate(paths * repeats)]
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(prepare, jobs[:workers], [OPTS] * workers, [FRONTEND] * workers))  # start-up
        start = time.perf_counter()
        list(pool.map(prepare, jobs, [OPTS] * len(jobs), [FRONTEND] * len(jobs)))
        return len(jobs) / (time.perf_counter() - start)


MEMORY_PROBE = """
import os, sys, threading, time, tracemalloc
from avcl.media.decode import DecodeOptions, decode_clip
from avcl.media.frontend import AudioFrontend, audio_features
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
opts = DecodeOptions(frames=16, size=112, sample_rate=16000)
decode_clip(sys.argv[1], DecodeOptions(frames=1, size=16, audio=False))  # codecs loaded, threads started
base, peak, running = rss(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()
tracemalloc.start()
clip = decode_clip(sys.argv[1], opts)
audio_features(clip.audio, 16000, AudioFrontend(num_bins=128, target_frames=1024))
traced = tracemalloc.get_traced_memory()[1]
running[0] = False
sampler.join()
print(clip.status, (peak[0] - base) / 2**20, traced / 2**20, peak[0] / 2**20)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(os.environ.get("AVCL_DATA_DIR", "../shared/data")) / "clips"
    parser.add_argument("--clips", default=str(default), help="folder of video files (default: $AVCL_DATA_DIR/clips)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.clips).iterdir() if p.is_file())
    if not paths:
        sys.exit(f"no clips in {args.clips}")
    picked = {p: decode_clip(p, OPTS).frame_times for p in paths}
    results = {"clips": len(paths)}
    results["bare_pyav_clips_per_s"] = timed(bare_pyav, [(p, picked[p]) for p in paths], args.repeats)
    results["avcl_decode_clips_per_s"] = timed(lambda p: decode_clip(p, OPTS), [(p,) for p in paths], args.repeats)
    results["avcl_clips_per_s"] = timed(avcl_full, [(p,) for p in paths], args.repeats)
    results["avcl_decode_vs_bare"] = results["avcl_decode_clips_per_s"] / results["bare_pyav_clips_per_s"]
    results["avcl_vs_bare"] = results["avcl_clips_per_s"] / results["bare_pyav_clips_per_s"]
    long_path = next((p for p in paths if p.endswith(LONG_CLIP)), None)
    if long_path:
        results["long_bare_s"] = 1 / timed(bare_pyav, [(long_path, picked[long_path])], 1)
        results["long_avcl_s"] = 1 / timed(avcl_full, [(long_path,)], 1)
    results["workers1_clips_per_s"] = workers_rate(paths, 1, args.repeats)
    results["workers2_clips_per_s"] = workers_rate(paths, 2, args.repeats)
    results["scaling_1_to_2"] = results["workers2_clips_per_s"] / results["workers1_clips_per_s"]
    if long_path:
        probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, long_path], capture_output=True, text=True,
                               check=True)
        status, grow, traced, peak = probe.stdout.split()
        results["long_status"] = status
        results["long_rss_growth_mib"] = float(grow)  # peak RSS while decoding minus RSS before
        results["long_peak_rss_mib"] = float(peak)  # the whole process (Python, numpy, torch, FFmpeg)
        results["long_tracemalloc_peak_mib"] = float(traced)
        results["long_full_res_frames_mib"] = 720 * 1280 * 720 * 3 / 2**20  # holding every RGB frame
    for name, value in results.items():
        print(f"{name:>28}: {value:.3f}" if isinstance(value, float) else f"{name:>28}: {value}")
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))


if __name__ == "__main__":
    main()
