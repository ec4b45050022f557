"""AV-CIL training speed: avcl's resident, batch-indexed features vs the official per-sample design.

On the same synthetic features, written in the official Kinetics-Sounds layout (one HDF5
dataset per video id, audio in a pickled dict), one epoch of an AV-CIL step >= 1 (all loss
terms, old model, separate replay batch) is timed

(a) through avcl: the ``avcil_official`` dataset (features resident in memory) and avcl's
    Trainer (batch-indexed tensors);
(b) through a per-sample ``torch.utils.data.Dataset`` + ``DataLoader`` that reads one HDF5
    dataset per video for every sample, plus a second DataLoader for the exemplars, as the
    official code does (same model, losses, batch sizes and optimiser);

and (c) the model FLOP rate of (a) (FLOPs of one step counted by torch's FlopCounterMode,
matmul-like ops only) against the machine's measured float32 matmul peak.

    python benchmarks/avcil_step.py [--videos 384 --grid 8 49 --dim 256 --device cpu]

The last line holds every number as ``name=value`` pairs.
"""
from __future__ import annotations

import argparse
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
from avcl.engine.runner import build_method, make_scenario
from avcl.engine.trainer import Trainer, autocast_factory, make_optimizer

EPOCHS = 2  # each design runs two epochs; the second is timed


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
    method.memory.update(scenario.tasks[0].train)
    return method


def avcl_epoch(cfg, scenario, device) -> tuple[float, object, int]:
    method = step1_method(cfg, scenario, device)
    trainer = Trainer(cfg.train, device, autocast_factory(device, cfg.train.bf16), cfg.eval.batch_size)
    ends = []

    def on_epoch(epoch, loss):
        sync(device)
        ends.append(time.perf_counter())

    trainer.fit_task(method, scenario.tasks[1], on_epoch)
    steps = -(-len(scenario.tasks[1].train["label"]) // cfg.train.batch_size)
    return ends[-1] - ends[-2], method, steps  # the last epoch: warm caches, no first-call costs


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
    optimizer = make_optimizer(method.parameters(), cfg.train, cfg.train.lr)
    method.model.train()
    for _ in range(EPOCHS):  # timed: the last one, like (a)
        sync(device)
        start = time.perf_counter()
        official_one_epoch(method, train, exemplars, optimizer, device)
        sync(device)
    return time.perf_counter() - start


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
    """FLOPs of one training step (forward, old-model forward, backward) at the configured batch sizes."""
    train, memory = scenario.tasks[1].train, method.memory.samples
    batch = {k: torch.cat([train[k][:cfg.train.batch_size], memory[k][:cfg.train.replay_batch_size]]).to(device)
             for k in train}
    batch["from_memory"] = (torch.arange(len(batch["label"])) >= min(cfg.train.batch_size, len(train["label"]))).to(device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=384, help="training videos (val/test add 1/4 more)")
    parser.add_argument("--classes", type=int, default=12)
    parser.add_argument("--grid", type=int, nargs=2, default=[8, 49], metavar=("T", "P"))
    parser.add_argument("--dim", type=int, default=256, help="feature width (official: 768)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--replay-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers in (b)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    per_class = args.videos // args.classes
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_synthetic_layout(tmp, "ksounds", num_classes=args.classes,
                                        per_class=(per_class, max(1, per_class // 8), max(1, per_class // 8)),
                                        audio_dim=args.dim, tokens=args.grid[0] * args.grid[1], video_dim=args.dim)
        cfg = load_config("avcil/ksounds", [
            f"data.root={tmp}", "data.dtype=float32", "scenario.num_tasks=2", f"memory.size={args.videos // 2}",
            f"model.visual_grid=[{args.grid[0]},{args.grid[1]}]", f"model.feature_dim={args.dim}",
            f"train.epochs={EPOCHS}", "train.model_selection=last", f"train.batch_size={args.batch}",
            f"train.replay_batch_size={args.replay_batch}", f"train.device={args.device}", "methods=[avcil]"])
        scenario = make_scenario(cfg)
        protocol = read_protocol(folder)
        ids_of = {"train": protocol.ids["train"], "train_labels": protocol.labels["train"]}
        a_seconds, method, steps = avcl_epoch(cfg, scenario, device)
        b_seconds = official_epoch(cfg, scenario, folder, ids_of, device, args.workers)
        flops = step_flops(method, scenario, cfg, device)
        peak = matmul_peak(device)
    rate = flops * steps / a_seconds
    print(f"grid={args.grid[0]}x{args.grid[1]}x{args.dim} videos_step1={len(scenario.tasks[1].train['label'])} "
          f"steps={steps} device={device} threads={torch.get_num_threads()}")
    print(f"a_avcl_epoch_s={a_seconds:.3f} b_official_epoch_s={b_seconds:.3f} b_over_a={b_seconds / a_seconds:.2f} "
          f"step_gflop={flops / 1e9:.2f} achieved_gflops={rate / 1e9:.1f} matmul_peak_gflops={peak / 1e9:.1f} "
          f"flop_fraction={rate / peak:.3f}")


if __name__ == "__main__":
    main()
