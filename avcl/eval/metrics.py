"""Continual-learning metrics from the accuracy matrix.

``matrix[t][i]`` is the accuracy on the test data of task i after learning task t (i <= t),
predicting over all classes seen so far, with no task id. ``step_accuracy[t]`` is the
accuracy on the test data of all tasks seen at step t (all samples pooled).
"""
from __future__ import annotations


FORGETTING_VARIANTS = ("standard", "avcil")


def average_incremental_accuracy(step_accuracy: list[float]) -> float:
    """Mean of the step accuracies over all steps, the first included."""
    return sum(step_accuracy) / len(step_accuracy)


def forgetting_standard(matrix: list[list[float]]) -> float:
    """Mean over old tasks of (best accuracy before the last step - accuracy at the last step).

    Chaudhry et al. (2018): f_i = max_{l in [i, T-2]} a_{l,i} - a_{T-1,i}, averaged over
    i < T-1. Can be negative when an old task improved. 0 for a single task.
    """
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    drops = [max(matrix[l][i] for l in range(i, last)) - matrix[last][i] for i in range(last)]
    return sum(drops) / len(drops)


def forgetting_avcil(matrix: list[list[float]]) -> float:
    """AV-CIL's average forgetting (its code's ``detailed_test``; repo issue #8): mean over steps t >= 1 of
    F_t = (1/t) sum_{i<t} (max_{l in [i, t-1]} a_{l,i} - a_{t,i}). 0 for a single task."""
    steps = []
    for t in range(1, len(matrix)):
        steps.append(sum(max(matrix[l][i] for l in range(i, t)) - matrix[t][i] for i in range(t)) / t)
    return sum(steps) / len(steps) if steps else 0.0


def backward_transfer(matrix: list[list[float]]) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): mean over i < T-1 of a_{T-1,i} - a_{i,i}."""
    last = len(matrix) - 1
    if last == 0:
        return 0.0
    return sum(matrix[last][i] - matrix[i][i] for i in range(last)) / last


def summarize(matrix: list[list[float]], step_accuracy: list[float], forgetting: str = "standard") -> dict:
    """Every headline metric; ``forgetting`` names the variant reported as "forgetting"."""
    both = {"standard": forgetting_standard(matrix), "avcil": forgetting_avcil(matrix)}
    return {
        "average_incremental_accuracy": average_incremental_accuracy(step_accuracy),
        "last_accuracy": step_accuracy[-1],
        "forgetting": both[forgetting],
        "forgetting_variant": forgetting,
        "forgetting_standard": both["standard"],
        "forgetting_avcil": both["avcil"],
        "bwt": backward_transfer(matrix),
    }
