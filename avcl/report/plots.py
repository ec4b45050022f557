"""Plots of a run: accuracy after each task per method, and each method's accuracy matrix."""
from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib


matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from avcl.core.io import atomic_write_bytes  # noqa: E402


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
    """One curve per method and per other head of it ("icarl [fc]"), as the report's rows."""
    rows = {}
    for name, metrics in results.items():
        rows[name] = metrics
        rows.update({f"{name} [{head}]": m for head, m in metrics.get("heads", {}).items()})
    fig, ax = plt.subplots(figsize=(6, 4))
    _curves(ax, rows, lambda m: m["step_accuracy"], "accuracy on all seen classes")
    _save(fig, path)


def task_labels(run_dir: Path) -> list[str] | None:
    """Each task named by its classes ("seven, two"), from the run's dataset.json; None without it."""
    path = Path(run_dir) / "dataset.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    names = info["class_names"]
    labels = []
    for task in info["tasks"]:
        text = ", ".join(str(names[c]) for c in task["classes"])
        labels.append(text if len(text) <= 24 else text[:22] + "…")
    return labels


def _matrix(ax, rows: list[list[float]], title: str, labels: list[str] | None = None) -> object:
    """Heat map of a (possibly lower-triangular) matrix of fractions, values written in the cells;
    ``labels`` name the tasks (rows and columns) by their classes."""
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
    columns = grid.shape[1]
    if labels and len(labels) >= columns and len(rows) in (len(labels), 1):
        ax.set_xticks(range(columns), labels[:columns], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), labels[:len(rows)] if len(rows) > 1 else ["all tasks"], fontsize=7)
    else:
        ax.set_xticks(range(columns), [str(i + 1) for i in range(columns)])
        ax.set_yticks(range(len(rows)), [str(t + 1) for t in range(len(rows))])
    ax.set_title(title, fontsize=9)
    return image


def plot_accuracy_matrix(metrics: dict, path: Path, labels: list[str] | None = None) -> None:
    rows = metrics["accuracy_matrix"]
    size = max(len(rows), max(len(r) for r in rows))
    width = 1.5 if labels else 0.0  # room for the class names
    fig, ax = plt.subplots(figsize=(1 + width + 0.7 * size, 0.8 + width + 0.6 * size))
    fig.colorbar(_matrix(ax, rows, metrics["method"], labels), ax=ax, fraction=0.046)
    _save(fig, path)


def mean_over_k(metrics: dict, direction: str) -> list[list[float]]:
    """The retrieval matrix of ``direction`` averaged over its R@k (the authors' "Avg" quantity)."""
    by_k = [m for key, m in metrics["retrieval_matrices"][direction].items() if key.startswith("R@")]
    return [[sum(values) / len(values) for values in zip(*rows)] for rows in zip(*by_k)]


def plot_retrieval_matrix(metrics: dict, path: Path, labels: list[str] | None = None) -> None:
    size = len(mean_over_k(metrics, "a2v")[0])
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.4 * size, 0.8 + 0.6 * size))
    for ax, (direction, title) in zip(axes, (("a2v", "audio→video"), ("v2a", "video→audio"))):
        image = _matrix(ax, mean_over_k(metrics, direction), f"{metrics['method']}: {title}, mean R@k", labels)
    fig.colorbar(image, ax=axes, fraction=0.03)
    _save(fig, path)


def plot_retrieval_curves(results: dict[str, dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, direction in zip(axes, ("a2v", "v2a")):
        _curves(ax, results, lambda m: [sum(r) / len(r) for r in mean_over_k(m, direction)],
                f"{direction}: mean R@k over all tasks")
    _save(fig, path)


def plot_run(run_dir: Path, results: dict[str, dict], protocol: str = "accuracy") -> None:
    labels = task_labels(run_dir)
    results = {name: m for name, m in results.items() if m.get("tasks_done", 1)}  # stopped in its first task: nothing
    if protocol == "probe" or not results:  # one number per probe after the last task: the table says it all
        return
    if protocol == "retrieval":
        plot_retrieval_curves(results, run_dir / "retrieval.png")
        for name, metrics in results.items():
            plot_retrieval_matrix(metrics, run_dir / name / "retrieval_matrix.png", labels)
        return
    plot_accuracy_curves(results, run_dir / "accuracy.png")
    for name, metrics in results.items():
        plot_accuracy_matrix(metrics, run_dir / name / "accuracy_matrix.png", labels)


def plot_objective(path: Path, trials, objective: str, direction: str, title: str) -> None:
    """A search's objective (``avcl tune``'s objective.png): every complete trial, the pruned ones at the value
    they stopped at, and the best so far (``direction``: maximize or minimize). ``trials``: Optuna's."""
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.value is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter([t.number for t in done], [t.value for t in done], s=18, label="complete")
    if pruned:
        ax.scatter([t.number for t in pruned], [t.value for t in pruned], s=18, marker="x", color="gray",
                   label="pruned (value when stopped)")
    if done:
        pick = max if direction == "maximize" else min
        best, xs, ys = None, [], []
        for t in sorted(done, key=lambda t: t.number):
            best = t.value if best is None else pick(best, t.value)
            xs.append(t.number)
            ys.append(best)
        ax.step(xs, ys, where="post", color="C1", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(objective + " (validation)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
