"""Plots of a run: accuracy after each task per method, and each method's accuracy matrix."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from avcl.engine.checkpoint import atomic_write_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _curves(ax, results: dict[str, dict], values, ylabel: str) -> None:
    for name, metrics in results.items():
        steps = values(metrics)
        ax.plot(range(1, len(steps) + 1), steps, marker="o", label=name)
    ax.set_xlabel("tasks learned")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy_curves(results: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    _curves(ax, results, lambda m: m["step_accuracy"], "accuracy on all seen classes")
    _save(fig, path)


def _matrix(ax, rows: list[list[float]], title: str) -> object:
    """Heat map of a (possibly lower-triangular) matrix of fractions, values written in the cells."""
    grid = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for t, row in enumerate(rows):
        grid[t, :len(row)] = row
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    for t, row in enumerate(rows):
        for i, value in enumerate(row):
            ax.text(i, t, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if value < 0.5 else "black")
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after learning task")
    ax.set_title(title, fontsize=9)
    return image


def plot_accuracy_matrix(metrics: dict, path: Path) -> None:
    rows = metrics["accuracy_matrix"]
    size = max(len(rows), max(len(r) for r in rows))
    fig, ax = plt.subplots(figsize=(1 + 0.7 * size, 0.8 + 0.6 * size))
    fig.colorbar(_matrix(ax, rows, metrics["method"]), ax=ax, fraction=0.046)
    _save(fig, path)


def mean_over_k(metrics: dict, direction: str) -> list[list[float]]:
    """The retrieval matrix of ``direction`` averaged over its R@k (the authors' "Avg" quantity)."""
    by_k = [m for key, m in metrics["retrieval_matrices"][direction].items() if key.startswith("R@")]
    return [[sum(values) / len(values) for values in zip(*rows)] for rows in zip(*by_k)]


def plot_retrieval_matrix(metrics: dict, path: Path) -> None:
    size = len(mean_over_k(metrics, "a2v")[0])
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.4 * size, 0.8 + 0.6 * size))
    for ax, (direction, title) in zip(axes, (("a2v", "audio→video"), ("v2a", "video→audio"))):
        image = _matrix(ax, mean_over_k(metrics, direction), f"{metrics['method']}: {title}, mean R@k")
    fig.colorbar(image, ax=axes, fraction=0.03)
    _save(fig, path)


def plot_retrieval_curves(results: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, direction in zip(axes, ("a2v", "v2a")):
        _curves(ax, results, lambda m: [sum(r) / len(r) for r in mean_over_k(m, direction)],
                f"{direction}: mean R@k over all tasks")
    _save(fig, path)


def plot_run(run_dir: Path, results: dict[str, dict], protocol: str = "accuracy") -> None:
    if protocol == "probe":  # one number per probe after the last task: the table says it all
        return
    if protocol == "retrieval":
        plot_retrieval_curves(results, run_dir / "retrieval.png")
        for name, metrics in results.items():
            plot_retrieval_matrix(metrics, run_dir / name / "retrieval_matrix.png")
        return
    plot_accuracy_curves(results, run_dir / "accuracy.png")
    for name, metrics in results.items():
        plot_accuracy_matrix(metrics, run_dir / name / "accuracy_matrix.png")
