"""Plots of a run: accuracy after each task per method, and each method's accuracy matrix."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from avcl.engine.checkpoint import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_accuracy_curves(results: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, metrics in results.items():
        steps = metrics["step_accuracy"]
        ax.plot(range(1, len(steps) + 1), steps, marker="o", label=name)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on all seen classes")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_accuracy_matrix(metrics: dict, path: Path) -> None:
    rows = metrics["accuracy_matrix"]
    size = metrics.get("num_tasks", len(rows))
    grid = np.full((size, size), np.nan)
    for t, row in enumerate(rows):
        grid[t, :len(row)] = row
    fig, ax = plt.subplots(figsize=(1 + 0.7 * size, 0.8 + 0.6 * size))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for t, row in enumerate(rows):
        for i, value in enumerate(row):
            ax.text(i, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.5 else "black")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(metrics["method"])
    fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def plot_run(run_dir: Path, results: dict[str, dict]) -> None:
    plot_accuracy_curves(results, run_dir / "accuracy.png")
    for name, metrics in results.items():
        plot_accuracy_matrix(metrics, run_dir / name / "accuracy_matrix.png")
