"""Streaming from a raw store: read speed, memory and step overlap of ``StreamLoader``, and compression.

A synthetic raw store at the ``cav`` geometry (video uint8 (10, 224, 224, 3), audio float16 (1024, 128):
about 1.76 MB per clip) is written from real data: the 30-s 720p clip ``moviepy_big_buck_bunny_0_30.webm``
decoded once at 10 fps (224 px) into a pool of 1-s windows of 10 frames, and its Kaldi fbank (128 bins);
each row is a different window, rolled sideways (video) and shifted in time (audio), so rows differ but
compress like real clips. Then, with the same seeded random permutation of the rows:

* ``read_ratio``: clips/s of ``StreamLoader`` (``--workers`` DataLoader workers, batches of ``--batch-size``)
  over clips/s of bare h5py in one process (each batch sorted, read row by row with ``read_direct`` into a
  preallocated array; a streamed batch is new memory handed to another process). Goal >= 0.8. Best of
  ``--repeats`` alternated passes. The store was just written, so it is likely in the page cache (the output
  says how much of it is, via mincore); ``--drop-cache`` evicts the store's pages (posix_fadvise DONTNEED,
  this file only, no root needed) before every measured pass, for cold reads.
* ``peak_rss_mib``: peak RSS (VmHWM) of a pre-training step loop (``cav`` at pretrain/features' tiny size,
  4 of the 10 frames, ``finetune`` label-free, Adam) fed by StreamLoader for ``--steps`` steps, in its own
  process (its workers' peak is ``workers_rss_mib``); ``rss_growth``: the same on a store of 2N clips over
  the store of N (goal ~1.0: memory does not grow with the store).
* ``step_overlap``: median step time (waiting for the batch included) streamed over resident (the rows the
  steps use loaded as tensors first, batches indexed from them; goal <= 1.15).
* compression ``none`` / ``lzf`` / ``gzip`` on ``--compression-clips`` clips: bytes per clip and single-process
  read clips/s of random batches; ``size_*`` and ``read_*`` are ratios against ``none``.

    python benchmarks/loader.py                                   # 4000 clips (~7 GB, and 14 GB for 2N)
    python benchmarks/loader.py --clips 300 --compression-clips 100 --steps 15
    python benchmarks/loader.py --dir /big/disk --keep --drop-cache

Timings share the machine: the output gives the load average (a busy machine skews every figure). The last
line holds every figure as ``name=value`` pairs.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

CLIP = Path(os.environ.get("AVCL_DATA_DIR", "/work/shared/data")) / "clips" / "moviepy_big_buck_bunny_0_30.webm"
VIDEO, AUDIO = (10, 224, 224, 3), (1024, 128)
GIB, MIB = 2 ** 30, 2 ** 20


def own_peak_mib() -> float:
    """This process's peak RSS: VmHWM (Linux; ru_maxrss would carry the spawning process's peak across exec)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pools() -> tuple[np.ndarray, np.ndarray, str]:
    """(frames (F, 224, 224, 3) uint8 at 10 fps, fbank (frames, 128) float16 normalised, where the audio came from)."""
    from avcl.media.decode import DecodeOptions, decode_clip
    from avcl.media.frontend import AudioFrontend, audio_features
    clip = decode_clip(CLIP, DecodeOptions(frames=0, sampling="fps", fps=10, size=224))
    if not clip.ok:
        sys.exit(f"cannot decode {CLIP}: {clip.reason}")
    try:
        fbank, source = audio_features(clip.audio, 16000, AudioFrontend(num_bins=128, target_frames=0)), "the clip's fbank"
        if len(fbank) < AUDIO[0] + 1:
            raise ValueError(f"only {len(fbank)} fbank frames")
    except Exception as err:  # noqa: BLE001 -- a smooth synthetic fbank instead
        t, f = np.meshgrid(np.arange(3000), np.arange(128), indexing="ij")
        fbank = np.sin(t / 37.0) * np.cos(f / 11.0) + 0.05 * np.random.default_rng(0).standard_normal(t.shape)
        source = f"synthetic (the clip's audio failed: {err})"
    fbank = (fbank - fbank.mean()) / (2 * fbank.std())  # as CAV-MAE normalises
    return clip.video, fbank.astype(np.float16), source


def make_rows(frames: np.ndarray, fbank: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Row i: a 1-s window of 10 frames (window chosen by i, rolled sideways by i), a shifted fbank window."""
    windows, starts = len(frames) - VIDEO[0] + 1, len(fbank) - AUDIO[0] + 1
    video = np.stack([np.roll(frames[(i * 7) % windows:(i * 7) % windows + VIDEO[0]], (i * 13) % 224, axis=2)
                      for i in rows])
    audio = np.stack([fbank[(i * 37) % starts:(i * 37) % starts + AUDIO[0]] for i in rows])
    return {"video": video, "audio": audio}


def build_store(path: Path, clips: int, pool, compression: str = "none", chunk: int = 32) -> float:
    """Write a complete store of ``clips`` rows in batches of ``chunk``; returns seconds."""
    from tqdm import tqdm
    from avcl.data.store import create_store
    started = time.perf_counter()
    fields = {"video": (VIDEO, "uint8"), "audio": (AUDIO, "float16")}
    with create_store(path, [f"clip{i:06d}" for i in range(clips)], fields, labels=[0] * clips,
                      splits=["train"] * clips, compression=compression) as writer:
        with tqdm(total=clips, desc=f"write {path.name}", unit="clip", file=sys.stderr, mininterval=2) as bar:
            for start in range(0, clips, chunk):
                rows = np.arange(start, min(clips, start + chunk))
                writer.write(rows, make_rows(*pool, rows))
                bar.update(len(rows))
        writer.finalize()
    return time.perf_counter() - started


def cached_fraction(path: Path) -> float | None:
    """Share of ``path``'s pages in the page cache (mincore), None where it cannot be told."""
    try:
        size, page = path.stat().st_size, os.sysconf("SC_PAGE_SIZE")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        with open(path, "rb") as handle:
            addr = libc.mmap(None, size, 1, 1, handle.fileno(), 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        ok = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
        return float((np.frombuffer(vec, np.uint8) & 1).mean()) if ok else None
    except Exception:  # noqa: BLE001 -- not Linux, no libc
        return None


def evict(path: Path, enabled: bool) -> None:
    """--drop-cache: drop this file's clean pages from the page cache (no root needed, nothing else touched)."""
    if enabled:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def batches_of(n: int, batch: int, seed: int, count: int | None = None) -> list[np.ndarray]:
    """Batches of seeded random permutations of ``range(n)``: one epoch, or ``count`` batches (cycling)."""
    rng, out = np.random.default_rng(seed), []
    while True:
        order = rng.permutation(n)
        for start in range(0, n, batch):
            if count is not None and len(out) == count:
                return out
            out.append(order[start:start + batch])
        if count is None:
            return out


def h5py_read(path: Path, batches) -> float:
    """Clips/s of bare h5py in this process: each batch sorted, rows read into preallocated arrays."""
    started = time.perf_counter()
    with h5py.File(path, "r") as h5:
        data = {k: h5[f"features/{k}"] for k in ("video", "audio")}
        out = {k: np.empty((max(map(len, batches)), *d.shape[1:]), d.dtype) for k, d in data.items()}
        for rows in batches:
            for i, r in enumerate(np.sort(rows)):
                for k, d in data.items():
                    d.read_direct(out[k], np.s_[r:r + 1], np.s_[i:i + 1])
    return sum(map(len, batches)) / (time.perf_counter() - started)


def stream_read(path: Path, batches, workers: int, prefetch: int) -> float:
    """Clips/s of StreamLoader over ``batches`` (its workers started by a one-batch epoch first, not timed)."""
    import torch
    from avcl.data.stream import StoreRows, StreamLoader
    video = StoreRows.of(path, "features/video")
    samples = {"video": video, "audio": StoreRows.of(path, "features/audio"), "label": torch.zeros(len(video))}
    loader = StreamLoader(samples, torch.device("cpu"), workers, prefetch)
    for _ in loader.epoch(batches[:1]):
        pass
    started = time.perf_counter()
    clips = sum(len(batch["video"]) for batch in loader.epoch(batches))
    seconds = time.perf_counter() - started
    loader.close()
    return clips / seconds


def step_loop(args) -> dict:
    """One measurement (its own process): --steps timed steps of the tiny cav + finetune, streamed or resident."""
    import gc
    import torch
    from avcl.config import load_config
    from avcl.core.device import autocast_factory
    from avcl.data.scenario import Task
    from avcl.data.store import open_store
    from avcl.data.stream import StoreRows, StreamLoader
    from avcl.engine.runner import build_method
    from avcl.engine.regime import Regime
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, path, store = torch.device(args.device), Path(args.store), open_store(args.store)
    batches = batches_of(len(store), args.batch_size, args.seed, args.warmup + args.steps)
    evict(path, args.drop_cache)
    if args.one == "stream":
        samples = {"video": StoreRows.of(path, "features/video"),
                   "audio": StoreRows.of(path, "features/audio", dtype=torch.float32),
                   "label": torch.zeros(len(store), dtype=torch.long)}
        loader = StreamLoader(samples, device, args.workers, args.prefetch)
        source = loader.epoch(batches)
    else:  # the rows the steps use, resident as tensors (as data.residency=memory holds them)
        used = np.unique(np.concatenate(batches))
        video, audio = store.load("video", used, None).to(device), store.load("audio", used, torch.float32).to(device)
        source = ({"video": video[p], "audio": audio[p], "label": torch.zeros(len(p), dtype=torch.long, device=device)}
                  for p in (torch.from_numpy(np.searchsorted(used, b)).to(device) for b in batches))
    example = {"video": store.load("video", [0, 1], None), "audio": store.load("audio", [0, 1]),
               "label": torch.zeros(2, dtype=torch.long)}
    cfg = load_config("pretrain/features", [f"train.batch_size={args.batch_size}", "methods=[finetune]"])
    method = build_method("finetune", cfg, example)
    method.model.to(device).train()
    method.before_task(Task(0, [0], {}, {}, {}))
    method.optimizer = optimizer = Regime.build(method, cfg.train, device).optimizer
    autocast = autocast_factory(device, None)
    ends = []  # each step's end: a step's time includes waiting for its batch
    for i, batch in enumerate(source):
        with autocast():
            loss = method.training_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
    step_s = float(np.median(np.diff(ends[args.warmup - 1:])))  # the median: robust to a busy machine's hiccups
    if args.one == "stream":  # shut the persistent workers down so that RUSAGE_CHILDREN holds their peak
        del source, batch
        loader.close()
        gc.collect()
    return {"step_s": step_s, "loss": float(loss.detach()), "peak_rss_mib": own_peak_mib(),
            "workers_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
            "params_m": sum(p.numel() for p in method.model.parameters()) / 1e6}


def run_one(mode: str, store: Path, argv: list[str]) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    done = subprocess.run([sys.executable, __file__, *argv, "--one", mode, "--store", str(store)],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"step loop ({mode}, {store.name}) failed:\n{done.stderr[-4000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"steps {mode:>8} {store.name:>14}: {r['step_s']:6.3f} s/step  peak RSS {r['peak_rss_mib']:7.0f} MiB  "
          f"workers' peak {r['workers_rss_mib']:6.0f} MiB  loss {r['loss']:.4f}  ({r['params_m']:.2f} M params)", flush=True)
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=4000, help="clips of the store (the growth store has twice)")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the stores (default: deleted at the end)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--steps", type=int, default=30, help="timed pre-training steps per step loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1)")
    parser.add_argument("--repeats", type=int, default=2, help="read passes of each reader, alternated; the best counts")
    parser.add_argument("--compression-clips", type=int, default=200)
    parser.add_argument("--drop-cache", action="store_true", help="evict the store's pages before each measured pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the step loops (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one step loop
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = max(1, args.warmup)
    if args.one:
        print(json.dumps(step_loop(args)))
        return
    root = Path(args.dir or tempfile.mkdtemp(prefix="avcl-loader-"))
    root.mkdir(parents=True, exist_ok=True)
    argv = sys.argv[1:]
    try:
        started = time.perf_counter()
        frames, fbank, source = pools()
        pool = (frames, fbank)
        print(f"pool: {len(frames)} frames {frames.shape[1:]} at 10 fps, fbank {fbank.shape} from {source} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        store = root / f"store_{args.clips}.h5"
        seconds = build_store(store, args.clips, pool)
        size = store.stat().st_size
        print(f"store: {args.clips} clips, {size / GIB:.2f} GiB ({size / args.clips / MIB:.2f} MiB/clip) written in "
              f"{seconds:.1f} s ({size / MIB / seconds:.0f} MiB/s) at {store}", flush=True)
        cached = cached_fraction(store)
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        print(f"page cache: {'unknown share' if cached is None else f'{100 * cached:.0f}%'} of the store is cached "
              f"(MemAvailable {int(meminfo['MemAvailable'].split()[0]) / 2**20:.1f} GiB); "
              + ("--drop-cache: its pages are evicted before each pass (cold reads)" if args.drop_cache else
                 "reads below are from the page cache, not the disk (--drop-cache for cold reads)"), flush=True)

        batches, h5py_s, stream_s = batches_of(args.clips, args.batch_size, args.seed), 0.0, 0.0
        for _ in range(max(1, args.repeats)):  # alternated, so that a busy spell of the machine hits both
            evict(store, args.drop_cache)
            h5py_s = max(h5py_s, h5py_read(store, batches))
            evict(store, args.drop_cache)
            stream_s = max(stream_s, stream_read(store, batches, args.workers, args.prefetch))
        print(f"read (best of {max(1, args.repeats)}): bare h5py {h5py_s:7.1f} clips/s ({h5py_s * size / args.clips / MIB:.0f} "
              f"MiB/s), StreamLoader ({args.workers} workers) {stream_s:7.1f} clips/s, ratio {stream_s / h5py_s:.3f} "
              f"(goal >= 0.8); load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)

        stream = run_one("stream", store, argv)
        resident = run_one("resident", store, argv)
        big = root / f"store_{2 * args.clips}.h5"
        build_store(big, 2 * args.clips, pool)
        stream2 = run_one("stream", big, argv)
        if not args.keep:
            big.unlink()
        growth, overlap = stream2["peak_rss_mib"] / stream["peak_rss_mib"], stream["step_s"] / resident["step_s"]
        print(f"memory: peak RSS {stream['peak_rss_mib']:.0f} MiB on {size / GIB:.2f} GiB, {stream2['peak_rss_mib']:.0f} "
              f"MiB on twice that: growth {growth:.3f} (goal ~1.0); step streamed / resident {overlap:.3f} "
              f"(goal <= 1.15)", flush=True)

        table = {}
        for compression in ("none", "lzf", "gzip"):
            path = root / f"compression_{compression}.h5"
            build_store(path, args.compression_clips, pool, compression)
            evict(path, args.drop_cache)
            table[compression] = (path.stat().st_size / args.compression_clips,
                                  h5py_read(path, batches_of(args.compression_clips, args.batch_size, args.seed)))
            if not args.keep:
                path.unlink()
        none = table["none"]
        print(f"compression ({args.compression_clips} clips)   MiB/clip   size vs none   read clips/s   read vs none")
        for name, (per_clip, speed) in table.items():
            print(f"  {name:>5}  {per_clip / MIB:22.3f}  {per_clip / none[0]:13.3f}  {speed:13.1f}  {speed / none[1]:13.3f}")
        print(f"wall: {time.perf_counter() - started:.1f} s", flush=True)
        print(" ".join([
            f"clips={args.clips}", f"store_gib={size / GIB:.3f}", f"read_ratio={stream_s / h5py_s:.3f}",
            f"stream_clips_s={stream_s:.1f}", f"h5py_clips_s={h5py_s:.1f}", f"peak_rss_mib={stream['peak_rss_mib']:.0f}",
            f"rss_growth={growth:.3f}", f"step_overlap={overlap:.3f}",
            f"size_lzf={table['lzf'][0] / none[0]:.3f}", f"size_gzip={table['gzip'][0] / none[0]:.3f}",
            f"read_lzf={table['lzf'][1] / none[1]:.3f}", f"read_gzip={table['gzip'][1] / none[1]:.3f}",
            f"workers={args.workers}", f"batch={args.batch_size}", f"steps={args.steps}",
            f"cached={'na' if cached is None else f'{cached:.2f}'}", f"drop_cache={int(args.drop_cache)}",
            f"workers_rss_mib={stream['workers_rss_mib']:.0f}", f"peak_rss_2x_mib={stream2['peak_rss_mib']:.0f}",
            f"resident_rss_mib={resident['peak_rss_mib']:.0f}", f"step_stream_s={stream['step_s']:.3f}",
            f"step_resident_s={resident['step_s']:.3f}", f"load_1min={os.getloadavg()[0]:.2f}",
            f"cores={os.cpu_count()}", f"wall_s={time.perf_counter() - started:.0f}"]))
    finally:  # the stores this run wrote (and the temporary directory), unless --keep
        if not args.keep:
            for path in [*root.glob("store_*.h5"), *root.glob("compression_*.h5")]:
                path.unlink(missing_ok=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
