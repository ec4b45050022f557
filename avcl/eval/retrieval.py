"""Zero-shot audio<->video retrieval: recall@k, median rank, and their continual-learning summaries.

A retrieval set holds N clips. ``similarity[i, j]`` is the cosine similarity of audio i and video j
(L2-normalised embeddings). Audio->video: query audio i, the right answer is video i; video->audio:
the transpose. Per-task scores restrict the queries to the task's clips but rank each against the
whole retrieval set (FLAVA/STELLA's ``train_algo/retrieval.py``).

Summaries over the retrieval matrix ``a[j][t]`` (metric on task t after learning task j, all T tasks
evaluated after every task, learned or not):

* average: ``A = mean_t a[T-1][t]`` (the same in the authors' scripts and the textbook);
* forgetting, the authors' form (``tools/*/retrieval/*_retrieval_result.py``):
  ``F = 1/(T-1) * sum_{t < T} max_{j < T-1} (a[j][t] - a[T-1][t])``: the maximum runs over every
  evaluation before the last, also those made before task t was learned, and the sum covers all
  tasks, the last included;
* forgetting, the textbook form (Chaudhry et al. 2018): ``1/(T-1) * sum_{t < T-1} max_{j in [t, T-2]}
  (a[j][t] - a[T-1][t])``, only evaluations made after task t was learned.
"""
from __future__ import annotations

import torch

from avcl.eval.metrics import forgetting_standard


DIRECTIONS = ("a2v", "v2a")


def ranks(similarity: torch.Tensor) -> torch.Tensor:
    """(N,) 0-based rank of the right answer (the diagonal) in each row; ties count against the query.

    Exactly tied similarities: the right answer is ranked after every wrong answer tied with it (one rank per
    query, the pessimistic one). STELLA's ``compute_metrics`` (``train_algo/retrieval.py``) instead takes every
    position of the sorted row equal to the right answer's similarity as a hit, so a query with ties counts
    several times (and at its best position) in R@k and the median: ours, kept (only exact float ties differ)."""
    right = similarity.diagonal()[:, None]
    return (similarity > right).sum(dim=1) + ((similarity == right).sum(dim=1) - 1)


def retrieval_scores(similarity: torch.Tensor, query_groups: list[torch.Tensor], recall_at: list[int]
                     ) -> dict[str, dict[str, list[float]]]:
    """Both directions: {"a2v": {"R@1": [per group], ..., "median_rank": [...]}, "v2a": {...}}.

    ``similarity``: (N, N) audio x video. ``query_groups``: boolean (N,) masks, one per group
    (per task); each group's queries are ranked against all N clips.
    """
    out = {}
    for direction, sim in (("a2v", similarity), ("v2a", similarity.T)):
        rank = ranks(sim.float())
        scores = {f"R@{k}": [] for k in recall_at}
        scores["median_rank"] = []
        for group in query_groups:
            r = rank[group]
            for k in recall_at:
                scores[f"R@{k}"].append(float((r < k).float().mean()) if len(r) else float("nan"))
            # the usual median (the mean of the two middle ranks for an even count), as the code's np.median;
            # torch.median would take the lower one
            scores["median_rank"].append(float(r.float().quantile(0.5) + 1) if len(r) else float("nan"))
        out[direction] = scores
    return out


def average_last(matrix: list[list[float]]) -> float:
    """Mean over tasks of the last row."""
    return sum(matrix[-1]) / len(matrix[-1])


def forgetting_authors(matrix: list[list[float]]) -> float | None:
    """The authors' forgetting (module docstring); None with a single evaluation."""
    last = len(matrix) - 1
    if last == 0:
        return None
    tasks = len(matrix[-1])
    return sum(max(matrix[j][t] - matrix[last][t] for j in range(last)) for t in range(tasks)) / last


def forgetting_textbook(matrix: list[list[float]]) -> float | None:
    """Chaudhry et al.'s forgetting on the lower triangle of a full matrix; None with a single evaluation."""
    if len(matrix) == 1:
        return None
    return forgetting_standard([row[:j + 1] for j, row in enumerate(matrix)])


def summarize_retrieval(matrices: dict[str, dict[str, list[list[float]]]], recall_at: list[int]) -> dict:
    """Headline numbers per direction: per-k average and forgetting (both forms), and their mean over k."""
    out = {}
    for direction in DIRECTIONS:
        per_k = {k: matrices[direction][f"R@{k}"] for k in recall_at}
        for k, matrix in per_k.items():
            out[f"{direction}_R@{k}"] = average_last(matrix)
            out[f"{direction}_R@{k}_forgetting"] = forgetting_authors(matrix)
            out[f"{direction}_R@{k}_forgetting_textbook"] = forgetting_textbook(matrix)
        out[f"{direction}_average"] = sum(out[f"{direction}_R@{k}"] for k in recall_at) / len(recall_at)
        for form in ("forgetting", "forgetting_textbook"):
            values = [out[f"{direction}_R@{k}_{form}"] for k in recall_at]
            out[f"{direction}_{form}"] = None if None in values else sum(values) / len(values)
        out[f"{direction}_median_rank"] = average_last(matrices[direction]["median_rank"])
    return out
