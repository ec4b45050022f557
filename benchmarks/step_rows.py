"""What the step benchmarks share: every row measured in its own process, and the figures line.

Each row runs as ``python SCRIPT ARGS --one ROW`` (so no row inherits another's heap), with glibc told
to return freed blocks to the OS at once, and prints its measurement as one JSON line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def measure_rows(script: str, rows, argv: list[str]) -> dict[str, dict]:
    """{row: measurement} of every row, each in a fresh process; one progress line per row."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    results = {}
    for name in rows:
        done = subprocess.run([sys.executable, script, *argv, "--one", name], capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        results[name] = r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{name:>9}: {r['samples_per_s']:8.1f} samples/s   step memory {r['step_mib']:8.1f} MiB   "
              f"process peak {r['peak_mib']:8.1f} MiB   ({r['params_m']:.2f} M parameters)", flush=True)
    return results


def regime_step(method, regime, pool: dict, i: int, batch: int, autocast) -> None:
    """Optimizer step ``i`` as the trainer takes it: ``train.accumulate`` micro-batches of ``batch`` clips cycled
    from ``pool`` (each loss weighted 1 / accumulate), then the regime's step (unscale, clip, step, lr)."""
    import torch  # (slow to import: only the measuring processes need it)

    accumulate = regime.train_cfg.accumulate
    size = len(next(iter(pool.values())))
    device = next(iter(pool.values())).device
    for j in range(accumulate):
        start = (i * accumulate + j) * batch
        pick = torch.arange(start, start + batch, device=device) % size
        with autocast():
            loss = method.training_loss({k: v[pick] for k, v in pool.items()})
        if j == 0:
            regime.optimizer.zero_grad(set_to_none=True)
        regime.backward(loss / accumulate)
    regime.step(False)


def print_figures(results: dict[str, dict], device: str, head: list[str]) -> None:
    """The last line: ``head`` (the ratios and settings), then every row's samples/s and step memory."""
    unit = "cuda_mib" if device.startswith("cuda") else "rss_mib"
    figures = head + [f"{name}_samples_per_s={r['samples_per_s']:.1f}" for name, r in results.items()]
    figures += [f"{name}_step_{unit}={r['step_mib']:.1f}" for name, r in results.items()]
    print(" ".join(figures))
