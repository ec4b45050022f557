"""Engine overhead: samples/s of avcl's training loop vs a bare PyTorch loop, same model and batches.

Both loops train the same AVNet (same initial weights) on the same resident tensors with the
same batch order for the same number of epochs; they alternate for ``--repeats`` rounds and
the best round of each is compared. Prints its figures last, on one line, as name=value pairs.

    python benchmarks/engine_overhead.py [--recipe synthetic] [--epochs 5] [--repeats 3]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.scenario import class_incremental
from avcl.engine.trainer import Trainer
from avcl.core.device import autocast_factory, pick_device
from avcl.methods import METHODS
from avcl.models import AVNet


def bare_loop(model, data, epochs, batch_size, lr, seed):
    """What a user would write by hand: shuffle, forward, CE, backward, step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    model.train()
    n = len(data["label"])
    for _ in range(epochs):
        order = torch.randperm(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v[idx] for k, v in data.items()}
            loss = F.cross_entropy(model(batch)["logits"], batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="avdigits")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.recipe, [f"train.epochs={args.epochs}", "methods=[finetune]"] + args.overrides)
    device = pick_device(cfg.train.device)
    dataset = build_dataset(cfg.data, None, cfg.seed)
    task = class_incremental(dataset, 1, shuffle_classes=False).tasks[0]  # one task, all classes
    torch.manual_seed(cfg.seed)
    base = AVNet(cfg.model, task.train)
    base.head.grow(len(task.classes))
    n = len(task.train["label"])
    trainer = Trainer(cfg.train, device, autocast_factory(device, cfg.train.precision))
    best = {"engine": float("inf"), "bare": float("inf")}
    for _ in range(args.repeats):
        for which in ("bare", "engine"):
            model = copy.deepcopy(base).to(device)
            started = time.perf_counter()
            if which == "bare":
                bare_loop(model, task.train, args.epochs, cfg.train.batch_size, cfg.train.lr, cfg.seed)
            else:
                method = METHODS["finetune"](model, METHODS["finetune"].Hparams(), cfg)
                torch.manual_seed(cfg.seed)
                trainer.fit_task(method, task)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[which] = min(best[which], time.perf_counter() - started)
    engine_sps = n * args.epochs / best["engine"]
    bare_sps = n * args.epochs / best["bare"]
    overhead = (best["engine"] / best["bare"] - 1) * 100
    print(f"recipe={cfg.name} device={device} samples={n} epochs={args.epochs} "
          f"engine_samples_per_s={engine_sps:.1f} bare_samples_per_s={bare_sps:.1f} overhead_pct={overhead:.2f}")


if __name__ == "__main__":
    main()
