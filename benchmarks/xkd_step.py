"""Speed and memory of one XKD pre-training step against MAE alone, on the same model and batches.

Rows (each in its own process, so none inherits another's heap): ``xkd`` (MAE + cross-modal KD + MMD,
spec B.7), ``xkd-mas``, ``xkd-mats`` (the shared-transformer variants, 3 local video views) and ``mae``
(the same model with kd_weight = da_weight = 0: no local views through the students' heads, no teachers).
Per row: ``samples/s`` (clips per second of full training steps: forward, backward, Adam step, EMA
update) after warm-up steps, and the step's peak memory: on a GPU the CUDA allocator's peak during the
timed steps minus what was allocated before them; on the CPU the sampled resident set minus the one
before them, with glibc returning freed blocks at once (MALLOC_MMAP_THRESHOLD_).

Inputs are random clips of a geometry (the cost does not depend on the pixels): ``--geometry avdigits``
(8 gray 32x32 frames, 100x40 fbank: recipes/xkd/avdigits' model) or ``--geometry kinetics`` (32 RGB 112x112
frames, 448x80 log-mel: the paper's inputs, with ``--recipe xkd/kinetics`` on a GPU).

    python benchmarks/xkd_step.py                                     # CPU, xkd/avdigits
    python benchmarks/xkd_step.py --device cuda --recipe xkd/kinetics --geometry kinetics --batch 32
    python benchmarks/xkd_step.py --device cuda --recipe xkd/kinetics --geometry kinetics --batch 32 --set train.accumulate=2

The last line: ``speed_ratio=`` XKD's samples/s over MAE's, ``memory_ratio=`` XKD's step memory over MAE's,
then every row's figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from step_rows import measure_rows, print_figures, regime_step  # benchmarks/step_rows.py

ROWS = ("xkd", "xkd-mas", "xkd-mats", "mae")
GEOMETRY = {"avdigits": ((8, 32, 32), 100, 40), "kinetics": ((32, 112, 112, 3), 448, 80)}


def measure(args) -> dict:
    import torch

    from avcl.config import load_config
    from avcl.data.scenario import Task
    from avcl.engine.peak_memory import PeakMemory, rss_bytes
    from avcl.engine.runner import build_method
    from avcl.core.device import autocast_factory
    from avcl.engine.regime import Regime

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    video_shape, audio_frames, mel = GEOMETRY[args.geometry]
    cfg = load_config(args.recipe, [f"train.batch_size={args.batch}", f"methods=[{args.one}]",
                                    "memory.size=0"] + list(args.set)
                      + (["variants.mae={method: xkd, kd_weight: 0.0, da_weight: 0.0}"] if args.one == "mae" else []))
    device = torch.device(args.device)
    pool = {"video": torch.randint(0, 256, (args.pool,) + video_shape, dtype=torch.uint8),
            "audio": torch.randn(args.pool, audio_frames, mel)}
    method = build_method(args.one, cfg, {**pool, "label": torch.zeros(args.pool, dtype=torch.long)})
    method.model.to(device).train()
    method.before_task(Task(0, [0], {"label": torch.zeros(args.batch * (args.warmup + args.steps))}, {}, {}))
    regime = Regime.build(method, cfg.train, device)  # the recipe's optimizer step (or --set train.*)
    regime.start_task(args.warmup + args.steps, 1, 0, 1)
    accumulate = cfg.train.accumulate
    method.optimizer = regime.optimizer
    autocast = autocast_factory(device, cfg.train.precision)
    pool = {k: v.to(device) for k, v in pool.items()}

    def step(i: int) -> None:  # one optimizer step: train.accumulate micro-batches of --batch clips
        regime_step(method, regime, pool, i, args.batch, autocast)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes()
    with PeakMemory(device, interval=0.005) as peak:
        started = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            step(i)
        method.settle_teachers()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"row": args.one, "samples_per_s": args.steps * accumulate * args.batch / seconds,
            "step_mib": (peak.peak - before) / 2 ** 20, "peak_mib": peak.mib,
            "params_m": sum(p.numel() for p in method.model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipe", default="xkd/avdigits", help="the recipe whose model and variants are measured")
    parser.add_argument("--geometry", default="avdigits", choices=sorted(GEOMETRY))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=256, help="distinct random clips the batches cycle over")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE",
                        help="the optimizer step's options, e.g. train.precision=fp16 train.accumulate=2 (the "
                             "official regimes); samples/s counts every micro-batch's clips")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    results = measure_rows(__file__, ROWS, sys.argv[1:])
    xkd, mae = results["xkd"], results["mae"]
    print_figures(results, args.device, [
        f"speed_ratio={xkd['samples_per_s'] / mae['samples_per_s']:.3f}",
        f"memory_ratio={xkd['step_mib'] / max(mae['step_mib'], 1e-9):.3f}",
        f"device={args.device}", f"recipe={args.recipe}", f"geometry={args.geometry}", f"batch={args.batch}"])

if __name__ == "__main__":
    main()
