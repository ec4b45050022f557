"""Speed and memory of one continual pre-training step: finetune, ER, DER++, LUMP and STELLA.

STELLA's second claim is efficiency (about 45% less GPU memory than its baselines): its decoder
and its replayed rows see only the selected half of the patches. This script measures, on the
same backbone and the same batches, per method:

* ``samples/s``: current clips per second of training steps (replayed rows not counted), after a
  warm-up that also fills the memory so every replay method replays;
* peak memory of a step: on a GPU the CUDA allocator's peak during the timed steps minus what was
  allocated before them (model, optimizer, memory, data); on the CPU the peak resident set
  sampled during the timed steps minus the resident set before them, with glibc told to return
  freed blocks to the OS at once (MALLOC_MMAP_THRESHOLD_), so the figure is the step's working
  memory. Every method runs in its own process, so none inherits another's heap.

Inputs are random clips of the recipe's geometry (the step's cost does not depend on the pixels):
``--geometry avdigits`` (8 gray 32x32 frames, 100x40 fbank, the tiny CPU recipe) or ``--geometry cav``
(16 RGB 224x224 frames, 1024x128 fbank: the paper's inputs, for ``--size base`` on a GPU).

    python benchmarks/pretrain_step.py                         # CPU, pretrain/avdigits' backbone and geometry
    python benchmarks/pretrain_step.py --size tiny             # the tiny preset (width 192, 4 + 1 layers)
    python benchmarks/pretrain_step.py --device cuda --size base --geometry cav --batch 12
    python benchmarks/pretrain_step.py --device cuda --size base --geometry cav --batch 12 \
        --set train.precision=fp16 train.accumulate=2   # fp16 + GradScaler, 2 micro-batches per step

The last line: ``memory_ratio=`` STELLA's step memory over DER++'s, ``speed_ratio=`` STELLA's samples/s
over DER++'s, then each method's figures.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from step_rows import measure_rows, print_figures, regime_step  # benchmarks/step_rows.py

METHODS = ("finetune", "er", "derpp", "lump", "stella")
GEOMETRY = {  # (video frames, height=width, channels, fbank frames, mel bins, model overrides)
    "avdigits": (8, 32, 1, 100, 40, ["model.vit.video_patch=8", "model.vit.audio_patch=[10,8]",
                                     "model.vit.audio_frames=100", "model.vit.video_window=6"]),
    "cav": (16, 224, 3, 1024, 128, ["model.vit.video_patch=16", "model.vit.audio_patch=[16,16]",
                                    "model.vit.audio_frames=1024", "model.vit.video_window=null",
                                    "model.cav.video_mean=[0.485,0.456,0.406]", "model.cav.video_std=[0.229,0.224,0.225]"]),
}


def measure(args) -> dict:
    """One method, in this process: setup, warm-up steps, then timed steps."""
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
    frames, size, channels, audio_frames, mel, overrides = GEOMETRY[args.geometry]
    # --size recipe: the pretrain/avdigits backbone; a preset name drops the recipe's explicit widths
    backbone = [] if args.size == "recipe" else [f"model.vit.size={args.size}"] + [
        f"model.vit.{key}=null" for key in ("width", "depth", "fusion_depth", "heads", "decoder_width",
                                             "decoder_depth", "decoder_heads")]
    cfg = load_config("pretrain/avdigits", overrides + backbone + [
        f"train.batch_size={args.batch}", f"train.replay_batch_size={args.batch}",
        f"memory.size={args.memory}", f"methods=[{args.one}]"] + list(args.set))
    device = torch.device(args.device)
    shape = (frames, size, size) + ((3,) if channels == 3 else ())
    pool = {"video": torch.randint(0, 256, (args.pool,) + shape, dtype=torch.uint8),
            "audio": torch.randn(args.pool, audio_frames, mel)}
    method = build_method(args.one, cfg, {**pool, "label": torch.zeros(args.pool, dtype=torch.long)})
    method.model.to(device).train()
    method.before_task(Task(0, [0], {}, {}, {}))
    regime = Regime.build(method, cfg.train, device)  # the recipe's optimizer step (or --set train.*)
    regime.start_task(args.warmup + args.steps, 1, 0, 1)
    accumulate = cfg.train.accumulate
    method.optimizer = regime.optimizer
    autocast = autocast_factory(device, cfg.train.precision)
    pool = {k: v.to(device) for k, v in pool.items()}

    def step(i: int) -> None:  # one optimizer step: train.accumulate micro-batches of --batch clips
        regime_step(method, regime, pool, i, args.batch, autocast)

    warmup = max(args.warmup, -(-args.memory // args.batch) + 1)  # fill the memory first
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
    else:
        before = rss_bytes()
    with PeakMemory(device, interval=0.005) as peak:
        started = time.perf_counter()
        for i in range(warmup, warmup + args.steps):
            step(i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"method": args.one, "samples_per_s": args.steps * accumulate * args.batch / seconds,
            "step_mib": (peak.peak - before) / 2 ** 20, "peak_mib": peak.mib,
            "params_m": sum(p.numel() for p in method.model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="recipe", choices=("recipe", "tiny", "small", "base"),
                        help="recipe: pretrain/avdigits' backbone (width 96); or a model.vit.size preset")
    parser.add_argument("--geometry", default="avdigits", choices=sorted(GEOMETRY))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory", type=int, default=64, help="reservoir slots (filled before timing)")
    parser.add_argument("--pool", type=int, default=256, help="distinct random clips the batches cycle over")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--set", nargs="*", default=[], metavar="train.KEY=VALUE",
                        help="the optimizer step's options, e.g. train.precision=fp16 train.accumulate=2 (the "
                             "official regimes); samples/s counts every micro-batch's clips")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: measure one method
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    results = measure_rows(__file__, METHODS, sys.argv[1:])
    stella, derpp = results["stella"], results["derpp"]
    print_figures(results, args.device, [
        f"memory_ratio={stella['step_mib'] / derpp['step_mib']:.3f}",
        f"speed_ratio={stella['samples_per_s'] / derpp['samples_per_s']:.3f}",
        f"device={args.device}", f"size={args.size}", f"geometry={args.geometry}", f"batch={args.batch}"])

if __name__ == "__main__":
    main()
