"""AV-CIL training speed: avcl's resident, batch-indexed features vs the official per-sample design.

On the same synthetic features, written in the official Kinetics-Sounds layout (one HDF5
dataset per video id, audio in a pickled dict), one epoch of an AV-CIL step >= 1 (all loss
terms, old model, separate replay batch) is timed

(a) as ``avcl run`` trains: the ``avcil_official`` dataset (features resident in memory),
    avcl's Trainer (batch-indexed tensors), the fused attention kernel, the teacher's outputs
    cached once per step, and (CPU) malloc's heap kept for reuse;
(b) the official design: a per-sample ``torch.utils.data.Dataset`` + ``DataLoader`` that reads
    one HDF5 dataset per video for every sample, plus a second DataLoader for the exemplars,
    the official attention ops and the teacher re-run on every batch (same model, losses,
    batch sizes and optimiser);

and (c) the model FLOP rate of (a) (FLOPs of one step counted by torch's FlopCounterMode,
matmul-like ops only) against the machine's measured float32 matmul peak. It also times
avcl's data path with the official computation, then with avcl's changes added one at a time
(kept heap, fused kernel; the teacher cache gives (a)), to split the gain. Each design runs in
its own process (malloc settings are process-wide).

    python benchmarks/avcil_step.py [--videos 384 --grid 8 49 --dim 768 --device cpu]

The last line holds every number as ``name=value`` pairs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from avcl.config import load_config
from avcl.data.avcil_official import (AUDIO_FILE, VISUAL_H5_FILE, load_pickled_npy, read_protocol,
                                      write_synthetic_layout)
from avcl.core.samples import to_device
from avcl.engine.peak_memory import PeakMemory
from avcl.engine.runner import build_method, make_scenario
from avcl.engine.regime import Regime
from avcl.engine.trainer import Trainer
from avcl.core.device import autocast_factory, keep_cpu_heap

EPOCHS = 3  # each design runs three epochs; the faster of the last two is reported (the first warms up)


class PerVideoDataset(Dataset):
    """The official design: one HDF5 read per sample per epoch (file opened once per Dataset)."""

    def __init__(self, folder: Path, ids: list[str], labels: list[int]):
        self.ids, self.labels = ids, labels
        self.audio = load_pickled_npy(folder / AUDIO_FILE)
        self.h5 = h5py.File(folder / VISUAL_H5_FILE, "r")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        vid = self.ids[i]
        return (torch.from_numpy(np.asarray(self.audio[vid], dtype=np.float32)),
                torch.from_numpy(self.h5[vid][()].astype(np.float32)), self.labels[i])


def step1_method(cfg, scenario, device):
    """An AV-CIL learner at the start of step 1 (step 0 not trained: speed does not depend on it)."""
    method = build_method("avcil", cfg, scenario.tasks[0].train)
    method.model.to(device)
    method.before_task(scenario.tasks[0])
    method.memory.update(to_device(scenario.tasks[0].train, device))  # as a run fills it: from the device
    return method


def avcl_epoch(cfg, scenario, device) -> tuple[float, object, int, float, float]:
    """(last epoch's seconds, the method, steps per epoch, seconds of the once-per-step teacher cache, peak
    memory of the training in MiB: the CUDA allocator's peak on a GPU, the process's RSS on the CPU)."""
    method = step1_method(cfg, scenario, device)
    trainer = Trainer(cfg.train, device, autocast_factory(device, cfg.train.precision), cfg.eval.batch_size)
    ends, cache_seconds = [], []
    build_cache = method.training_data

    def timed_cache(data, replay):
        start = time.perf_counter()
        out = build_cache(data, replay)
        sync(device)
        cache_seconds.append(time.perf_counter() - start)
        return out

    def on_epoch(epoch, loss):
        sync(device)
        ends.append(time.perf_counter())

    method.training_data = timed_cache
    with PeakMemory(device) as peak:
        trainer.fit_task(method, scenario.tasks[1], on_epoch)
    steps = -(-len(scenario.tasks[1].train["label"]) // cfg.train.batch_size)
    return min(b - a for a, b in zip(ends[:-1], ends[1:])), method, steps, cache_seconds[0], peak.mib


def official_epoch(cfg, scenario, folder: Path, ids_of, device, workers: int) -> float:
    method = step1_method(cfg, scenario, device)
    method.before_task(scenario.tasks[1])
    task_ids = [i for i, label in zip(ids_of["train"], ids_of["train_labels"]) if label in scenario.tasks[1].classes]
    task_labels = [label for label in ids_of["train_labels"] if label in scenario.tasks[1].classes]
    # Exemplars: as many task-0 videos as avcl's memory holds (which ones does not change the speed).
    first = [(i, label) for i, label in zip(ids_of["train"], ids_of["train_labels"])
             if label in scenario.tasks[0].classes]
    picks = torch.randperm(len(first))[:len(method.memory)].tolist()
    memory_ids, memory_labels = [first[p][0] for p in picks], [first[p][1] for p in picks]
    train = DataLoader(PerVideoDataset(folder, task_ids, task_labels), batch_size=cfg.train.batch_size,
                       shuffle=True, num_workers=workers)
    exemplars = DataLoader(PerVideoDataset(folder, memory_ids, memory_labels),
                           batch_size=cfg.train.replay_batch_size, shuffle=True, num_workers=workers)
    optimizer = Regime.build(method, cfg.train, device).optimizer
    method.model.train()
    seconds = []
    for _ in range(EPOCHS):
        sync(device)
        start = time.perf_counter()
        official_one_epoch(method, train, exemplars, optimizer, device)
        sync(device)
        seconds.append(time.perf_counter() - start)
    return min(seconds[1:])  # like (a)


def official_one_epoch(method, train, exemplars, optimizer, device) -> None:
    replay = iter(exemplars)
    for audio, video, label in train:
        try:
            e_audio, e_video, e_label = next(replay)
        except StopIteration:  # the exemplar loader is cycled
            replay = iter(exemplars)
            e_audio, e_video, e_label = next(replay)
        batch = {"audio": torch.cat([audio, e_audio]).to(device), "video": torch.cat([video, e_video]).to(device),
                 "label": torch.cat([label, e_label]).to(device),
                 "from_memory": (torch.arange(len(label) + len(e_label)) >= len(label)).to(device)}
        loss = method.training_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def step_flops(method, scenario, cfg, device) -> float:
    """FLOPs of one training step (forward, the teacher's forward unless cached, backward)."""
    train, memory = scenario.tasks[1].train, method.memory.samples
    new, replayed = min(cfg.train.batch_size, len(train["label"])), cfg.train.replay_batch_size
    # the task's rows are on the CPU, the memory's on the device it was filled on
    batch = {k: torch.cat([train[k][:new].to(device), memory[k][:replayed].to(device)]) for k in train}
    batch["from_memory"] = (torch.arange(new + replayed) >= new).to(device)
    if method.teacher is not None:  # rows of the step's teacher cache
        offset = method.teacher["memory_offset"]
        batch["teacher_row"] = torch.cat([torch.arange(new), offset + torch.arange(replayed)]).to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        method.training_loss(batch).backward()
    method.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_peak(device, size: int = 2048, seconds: float = 2.0) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        sync(device) if count % 8 == 0 else None
    sync(device)
    return 2 * size ** 3 * count / (time.perf_counter() - start)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


DESIGNS = {
    # name: (avcl's CPU heap kept, attention kernel, teacher cache)
    "a": (True, "fused", True),  # avcl as `avcl run` runs it
    "b": (False, "reference", False),  # the official design end to end
    # avcl's data path with the official computation, then avcl's changes one at a time
    "a_official_compute": (False, "reference", False),
    "a_kept_heap": (True, "reference", False),
    "a_kept_heap_fused": (True, "fused", False),
}


def measure(args, root: str) -> dict:
    """One design, in this (fresh) process."""
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_heap, kernel, teacher_cache = DESIGNS[args.part]
    device = torch.device(args.device)
    if keep_heap and device.type == "cpu":
        keep_cpu_heap()
    cfg = load_config("avcil/ksounds", [
        f"data.root={root}", "data.dtype=float32", "scenario.num_tasks=2", f"memory.size={args.videos // 2}",
        f"model.visual_grid=[{args.grid[0]},{args.grid[1]}]", f"model.feature_dim={args.dim}",
        f"model.attention_kernel={kernel}", f"method_args.avcil.teacher_cache={teacher_cache}",
        f"train.epochs={EPOCHS}", "train.model_selection=last", f"train.batch_size={args.batch}",
        f"train.replay_batch_size={args.replay_batch}", f"train.device={args.device}", "methods=[avcil]"])
    scenario = make_scenario(cfg)
    if args.part == "b":
        protocol = read_protocol(Path(root) / "kinetics-sounds")
        ids_of = {"train": protocol.ids["train"], "train_labels": protocol.labels["train"]}
        return {"epoch_s": official_epoch(cfg, scenario, Path(root) / "kinetics-sounds", ids_of, device,
                                          args.workers)}
    seconds, method, steps, cache_seconds, peak_mib = avcl_epoch(cfg, scenario, device)
    if args.part != "a":  # the breakdown rows need their time only
        return {"epoch_s": seconds}
    return {"epoch_s": seconds, "teacher_cache_s": cache_seconds, "steps": steps, "peak_memory_mib": peak_mib,
            "step_flops": step_flops(method, scenario, cfg, device), "peak_flops": matmul_peak(device),
            "videos": len(scenario.tasks[1].train["label"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=768, help="training videos (val/test add 1/4 more)")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--grid", type=int, nargs=2, default=[8, 49], metavar=("T", "P"))
    parser.add_argument("--dim", type=int, default=768, help="feature width (official: 768)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--replay-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers in (b)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--part", choices=sorted(DESIGNS), help=argparse.SUPPRESS)  # internal: one design
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(measure(args, args.root)))
        return
    per_class = args.videos // args.classes
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_layout(tmp, "ksounds", num_classes=args.classes,
                               per_class=(per_class, max(1, per_class // 8), max(1, per_class // 8)),
                               audio_dim=args.dim, tokens=args.grid[0] * args.grid[1], video_dim=args.dim)
        for part in DESIGNS:  # each in a fresh process: malloc settings are process-wide
            done = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--part", part, "--root", tmp],
                                  capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"design {part} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            results[part] = json.loads(done.stdout.strip().splitlines()[-1])
    a, b = results["a"], results["b"]
    rate = a["step_flops"] * a["steps"] / a["epoch_s"]
    rows = a["videos"] + a["steps"] * args.replay_batch  # new clips once, plus each step's replayed exemplars
    print(f"grid={args.grid[0]}x{args.grid[1]}x{args.dim} videos_step1={a['videos']} steps={a['steps']} "
          f"device={args.device} threads={args.threads or torch.get_num_threads()} "
          f"a_teacher_cache_once_per_step_s={a['teacher_cache_s']:.3f}")
    print(f"a_avcl_epoch_s={a['epoch_s']:.3f} b_official_epoch_s={b['epoch_s']:.3f} "
          f"b_over_a={b['epoch_s'] / a['epoch_s']:.2f} a_samples_per_s={rows / a['epoch_s']:.1f} "
          f"a_peak_memory_mib={a['peak_memory_mib']:.0f} "
          + "".join(f"{name}_epoch_s={results[name]['epoch_s']:.3f} " for name in
                    ("a_official_compute", "a_kept_heap", "a_kept_heap_fused")) +
          f"step_gflop={a['step_flops'] / 1e9:.4g} achieved_gflops={rate / 1e9:.4g} "
          f"matmul_peak_gflops={a['peak_flops'] / 1e9:.1f} flop_fraction={rate / a['peak_flops']:.3g}")


if __name__ == "__main__":
    main()
