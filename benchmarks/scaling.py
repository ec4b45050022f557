"""Data-parallel scaling: samples/s of one process and of N processes (torchrun) on the same recipe and
the same global batch.

Each side is one whole ``avcl run`` into its own directory: 1 process (``python -m avcl run``) and N
(``torchrun --nproc-per-node N -m avcl run``, gloo on the CPU, NCCL with ``train.device=cuda``).
samples/s = the new-data rows trained (every task's training clips x epochs, replayed rows not
counted) over the run's train time (``train_seconds`` of metrics.json: training and memory updates,
summed over the tasks; evaluation and start-up excluded). On the CPU the one-process side gets
``--threads`` threads (default 1) and each of the N processes ``max(1, threads / N)``: with the default,
every process runs on one core, so the ideal ratio is N. ``--threads CORES`` gives both sides the same
cores instead (one process with every core against N with their share).

    python benchmarks/scaling.py                            # synthetic recipe, er, 1 vs 2 processes, CPU
    python benchmarks/scaling.py --threads 2                # 1 process x 2 threads vs 2 x 1 thread
    python benchmarks/scaling.py --processes 4 --device cuda pretrain/synthetic methods=[finetune]

Arguments after the options are the recipe and its overrides (default below). The last line:
``speedup=`` N processes' samples/s over one process's, then each side's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = ["synthetic", "methods=[er]", "data.num_classes=4", "scenario.num_tasks=2", "data.train_per_class=512",
           "data.val_per_class=4", "data.test_per_class=8", "model.embed_dim=64", "model.feature_dim=128",
           "train.epochs=2", "train.batch_size=128", "train.replay_batch_size=64", "memory.size=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(processes: int, threads: int, args: list[str], device: str, root: Path) -> dict:
    """One whole run with ``processes`` processes; its samples/s from the run directory."""
    out = root / f"p{processes}"
    launcher = ([sys.executable, "-m", "avcl"] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "avcl"])
    cmd = [*launcher, "run", *args, f"train.num_threads={threads}", f"train.device={device}", "--quiet",
           "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{processes} process(es) failed:\n{done.stderr[-3000:]}")
    from omegaconf import OmegaConf
    epochs = int(OmegaConf.load(out / "config.yaml").train.epochs)
    rows = sum(task["train"] for task in json.loads((out / "dataset.json").read_text())["tasks"])
    seconds = 0.0
    for metrics in out.glob("*/metrics.json"):
        if metrics.parent.name != "init":
            seconds += json.loads(metrics.read_text())["train_seconds"]
    methods = sum(1 for m in out.glob("*/metrics.json") if m.parent.name != "init")
    samples = rows * epochs * methods
    result = {"processes": processes, "threads": threads, "samples": samples, "train_s": seconds,
              "samples_per_s": samples / seconds, "wall_s": wall}
    print(f"{processes} process(es) x {threads} thread(s): {result['samples_per_s']:8.1f} samples/s "
          f"({samples} samples in {seconds:.1f} s of training; whole command {wall:.1f} s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="the data-parallel side's processes (default 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of the one-process side (default 1); the N processes get threads / N "
                             "each, at least 1")
    parser.add_argument("--device", default="cpu", help="train.device of both sides (cpu, or cuda: one GPU per rank)")
    args, recipe = parser.parse_known_args()
    recipe = recipe or DEFAULT
    with tempfile.TemporaryDirectory(prefix="avcl-scaling-") as tmp:
        one = measure(1, args.threads, recipe, args.device, Path(tmp))
        many = measure(args.processes, max(1, args.threads // args.processes), recipe, args.device, Path(tmp))
    speedup = many["samples_per_s"] / one["samples_per_s"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")  # a busy machine skews both sides
    print(f"speedup={speedup:.3f} processes={args.processes} device={args.device} cores={os.cpu_count()} "
          f"load_1min={load:.2f} "
          f"samples_per_s_1={one['samples_per_s']:.1f} samples_per_s_{args.processes}={many['samples_per_s']:.1f} "
          f"threads_1={one['threads']} threads_per_process_{args.processes}={many['threads']} "
          f"train_s_1={one['train_s']:.1f} train_s_{args.processes}={many['train_s']:.1f}")


if __name__ == "__main__":
    main()
