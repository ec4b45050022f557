"""STELLA's patch scoring and selection (STELLA code's ``models/cl_methods/stella.py``), as pure batched tensor ops.

Shapes: B rows, H heads, L tokens of a modality, d head width. Queries and keys are per head,
``(B, H, L, d)``, as the AVM module's ``attention_logits`` returns them. Token ids are positions in
the backbone's token order; audio tokens are time-major (id = t * F + f on a T x F grid).
Everything is vectorised over the batch (no per-row Python loop) and every random draw takes an
optional ``torch.Generator`` (None: the global torch RNG, which the runner seeds and checkpoints).

* :func:`patch_importance`: localized importance I_a, I_v from the AVM cross-attention (the code's
  ``extract_multimodal_relationship``; the paper's Localized Patch Importance Scoring).
* :func:`candidate_mask`, :func:`pooled_queries`: top-K candidate sets and the importance-weighted
  pooled ("summary") query per head (ibid.).
* :func:`past_correlation`: the replay-guided correlation c of every candidate patch (the
  paper's Replay-guided Correlation Assessment).
* :func:`bernoulli_prune`: prune ~ Bernoulli(c) (as the STELLA code).
* :func:`weighted_sample_without_replacement`: probabilistic video selection (the paper's
  Probabilistic Patch Selection), by Gumbel-top-k instead of ``torch.multinomial`` (same distribution:
  the first k of a weighted draw without replacement); pruned tokens only fill the budget when too few unpruned ones remain.
* :func:`contiguous_audio_selection`: the temporally contiguous audio chunk selection (the code's
  ``compute_core_audio_indices``), vectorised as one sort with a composite key.
* :func:`top_k_selection`: the first step's deterministic top-K (empty buffer, no pruning).

Every selection returns exactly ``k`` distinct ids per row, sorted ascending.
"""
from __future__ import annotations

from typing import Optional

import torch


# ----- randomness ------------------------------------------------------------------------------
def _uniform(shape, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """U(0, 1) float32 of ``shape`` on ``device``, drawn from ``generator`` (on its own device)."""
    if generator is None or generator.device == torch.device(device):
        return torch.rand(shape, device=device, generator=generator)
    return torch.rand(shape, device=generator.device, generator=generator).to(device)


def _gumbel(shape, device: torch.device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard Gumbel noise, finite everywhere."""
    u = _uniform(shape, device, generator).clamp_(torch.finfo(torch.float32).tiny, 1 - 1e-7)
    return -torch.log(-torch.log(u))


# ----- importance and pooled queries (STELLA's extract_multimodal_relationship) -------------------
def patch_importance(q_a: torch.Tensor, k_a: torch.Tensor, q_v: torch.Tensor, k_v: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Localized patch importance (STELLA's ``extract_multimodal_relationship``): ``I_a`` (B, La) and
    ``I_v`` (B, Lv), each row sums to 1.

    ``I_v[j] = mean_{h,i} softmax_j(S_av[h,i,j] / T)`` with ``S_av = Q_a K_v^T / sqrt(d)`` (audio
    queries attending to video keys), and symmetrically ``I_a[i] = mean_{h,j} softmax_i(S_va[h,j,i] / T)``.
    Computed in float32 (the softmax over hundreds of tokens at T = 0.1 needs it).
    """
    scale = q_a.shape[-1] ** -0.5 / temperature

    def received(q, k):  # attention that the tokens of k receive from the queries q, averaged
        logits = torch.einsum("bhid,bhjd->bhij", q.float(), k.float()) * scale
        return logits.softmax(dim=-1).mean(dim=(1, 2))

    return received(q_v, k_a), received(q_a, k_v)


def candidate_mask(importance: torch.Tensor, k: int) -> torch.Tensor:
    """(B, L) bool: the top-``k`` tokens of each row by importance (the candidate set C of the STELLA code)."""
    ids = importance.topk(k, dim=1).indices
    return torch.zeros_like(importance, dtype=torch.bool).scatter_(1, ids, True)


def pooled_queries(q: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """Importance-weighted mean of the top-``k`` candidate queries, per head (as the STELLA code): (B, H, d).

    ``q_hat^h = sum_{j in C} I[j] Q^h[j] / sum_{j in C} I[j]`` with C the top-``k`` tokens by ``importance``.
    """
    weights = importance.float() * candidate_mask(importance, k)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.einsum("bl,bhld->bhd", weights, q.float())


# ----- correlation with the past and pruning (STELLA code) -------------------------------------
def past_correlation(k: torch.Tensor, q_past: torch.Tensor, q_now: torch.Tensor,
                     candidates: torch.Tensor) -> torch.Tensor:
    """Replay-guided correlation (as the STELLA code): (B, L) in [0, 1], 0 outside ``candidates``.

    ``c[j] = mean_h sigmoid(s <k^h[j], q_past^h> - s <k^h[j], q_now^h>)`` with ``s = 1/sqrt(d)``: the
    probability that token j is claimed more by the past cross-modal query than by the current one.
    ``k``: (B, H, L, d) keys of the scored modality; ``q_past``, ``q_now``: (B, H, d) pooled queries of
    the other modality (row n of ``q_past`` is the replayed row aligned with current row n);
    ``candidates``: (B, L) bool.
    """
    scale = k.shape[-1] ** -0.5
    gap = torch.einsum("bhld,bhd->bhl", k.float(), (q_past.float() - q_now.float())) * scale
    return torch.sigmoid(gap).mean(dim=1) * candidates


def bernoulli_prune(c: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, L) bool: prune[j] ~ Bernoulli(c[j]) independently (as the STELLA code)."""
    return _uniform(c.shape, c.device, generator) < c


# ----- selection (STELLA code) -------------------------------------------------------------------------
def top_k_selection(importance: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) ids of the ``k`` most important tokens, sorted (first step: empty buffer, no pruning)."""
    return importance.topk(k, dim=1).indices.sort(dim=1).values


def weighted_sample_without_replacement(weights: torch.Tensor, k: int, pruned: Optional[torch.Tensor] = None,
                                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, k) distinct ids, sorted: the first ``k`` of a draw without replacement, P proportional to ``weights``.

    Gumbel-top-k: key = log w + Gumbel; the ``k`` largest keys are distributed as the first ``k`` picks
    of sequential weighted sampling without replacement (what the STELLA code's ``torch.multinomial`` does).
    Pruned tokens come after every unpruned one (their key is -inf within the unpruned order), so a
    pruned id is kept only when fewer than ``k`` unpruned ids exist; those fill-ins are drawn among the
    pruned tokens with the same weights. Zero-weight tokens come after the positive-weight ones of
    their group (in random order), as multinomial puts them last. Implemented as a stable sort by group
    (unpruned > 0, unpruned == 0, pruned > 0, pruned == 0) after a sort by key, so nothing depends on
    float magnitudes.
    """
    if k > weights.shape[1]:
        raise ValueError(f"cannot select {k} of {weights.shape[1]} tokens")
    w = weights.float()
    noise = _gumbel(w.shape, w.device, generator)
    positive = w > 0
    key = torch.where(positive, torch.log(w.clamp_min(torch.finfo(torch.float32).tiny)) + noise, noise)
    group = (~positive).long()
    if pruned is not None:
        group = group + 2 * pruned.long()
    order = key.argsort(dim=1, descending=True)
    order = order.gather(1, group.gather(1, order).argsort(dim=1, stable=True))
    return order[:, :k].sort(dim=1).values


def contiguous_audio_selection(importance: torch.Tensor, pruned: Optional[torch.Tensor], time_steps: int,
                               freq_steps: int, chunk: int, budget: int,
                               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, budget) audio token ids, sorted: temporally contiguous chunk selection (the STELLA code's
    ``compute_core_audio_indices``).

    Per row: the importance is summed over the ``freq_steps`` frequency rows (one score per time step)
    and average-pooled into chunks of ``chunk`` time steps (a last, shorter chunk when ``chunk`` does
    not divide ``time_steps``: its score is the mean over its own steps). An order of the chunks is
    drawn without replacement, proportional to the chunk scores (Gumbel-top-k). Walking that order,
    whole chunks are taken (their unpruned tokens) while the running count stays within ``budget``;
    the chunk that overflows contributes only the missing count and is trimmed at its end if only its
    left neighbour chunk was taken, at its start if only its right neighbour was taken, and on a random
    side (a fair coin per row from ``generator``) when both or neither were taken, as the code's
    ``random.randint(0, 1)`` branch; so the kept part touches a taken neighbour; later chunks are dropped.

    Trimming follows the time-major token order inside the chunk: "trimmed at its end" keeps the first
    unpruned tokens in order (t ascending, f ascending), "at its start" keeps the last ones. So whole
    time steps are cut, and the one time step at the cut keeps only part of its frequency bins (the
    low ones when trimmed at the end, the high ones when trimmed at the start) unless the missing
    count is a multiple of the unpruned tokens per step.

    Fill when pruning leaves fewer than ``budget`` unpruned tokens in the whole row: every unpruned
    token is kept and pruned tokens fill the rest, chunk by chunk in the same drawn chunk order and in
    time-major order inside a chunk (the walk simply continues over the pruned tokens).

    Vectorised as one sort per row on the integer key
    ``(pruned, position of the token's chunk in the drawn order, position inside the chunk)`` where the
    position inside the overflowing chunk runs backwards when it is trimmed at its start; the first
    ``budget`` tokens of that order are exactly the walk above.
    """
    batch, length = importance.shape
    if length != time_steps * freq_steps:
        raise ValueError(f"audio importance has {length} tokens, expected {time_steps} x {freq_steps}")
    if budget > length:
        raise ValueError(f"cannot select {budget} of {length} audio tokens")
    device = importance.device
    n_chunks = -(-time_steps // chunk)
    per_chunk = chunk * freq_steps  # token slots per chunk (the last one may be shorter)
    step = torch.arange(time_steps, device=device)
    chunk_of_step = step // chunk  # (T,)
    chunk_of_token = chunk_of_step.repeat_interleave(freq_steps)  # (L,) time-major
    local = torch.arange(length, device=device) - chunk_of_token * per_chunk  # position inside the chunk

    # chunk scores: sum over frequency, mean over the chunk's time steps
    per_step = importance.float().view(batch, time_steps, freq_steps).sum(dim=2)
    steps_in_chunk = torch.bincount(chunk_of_step, minlength=n_chunks).float()
    scores = torch.zeros(batch, n_chunks, device=device).index_add_(1, chunk_of_step, per_step) / steps_in_chunk

    # a chunk order drawn without replacement, proportional to the scores (Gumbel-top-k keys)
    noise = _gumbel(scores.shape, device, generator)
    positive = scores > 0
    key = torch.where(positive, torch.log(scores.clamp_min(torch.finfo(torch.float32).tiny)) + noise, noise - 1e4)
    order = key.argsort(dim=1, descending=True)  # (B, C): chunk id at each rank
    rank = order.argsort(dim=1)  # (B, C): rank of each chunk

    # the walk: unpruned tokens per chunk, cumulated along the drawn order
    keep = torch.ones(batch, length, dtype=torch.bool, device=device) if pruned is None else ~pruned
    available = torch.zeros(batch, n_chunks, device=device, dtype=torch.long).index_add_(1, chunk_of_token,
                                                                                         keep.long())
    cumulative = available.gather(1, order).cumsum(dim=1)  # (B, C) along the order
    over = cumulative > budget
    has_overflow = over.any(dim=1)
    overflow_rank = torch.where(has_overflow, over.long().argmax(dim=1), torch.full_like(has_overflow, n_chunks,
                                                                                          dtype=torch.long))
    overflow_chunk = order.gather(1, overflow_rank.clamp_max(n_chunks - 1)[:, None])[:, 0]
    taken = rank < overflow_rank[:, None]  # (B, C): chunks taken whole
    padded = torch.nn.functional.pad(taken, (1, 1))  # neighbours of the first/last chunk: not taken
    left_taken = padded.gather(1, overflow_chunk[:, None])[:, 0]  # chunk - 1 (shifted by the pad)
    right_taken = padded.gather(1, overflow_chunk[:, None] + 2)[:, 0]  # chunk + 1
    coin = _uniform((batch,), device, generator) < 0.5
    # keep the end next to a lone taken right neighbour; both or neither taken: the code's coin
    trim_start = torch.where(left_taken ^ right_taken, right_taken, coin) & has_overflow

    # one sort: (pruned, chunk rank, position inside the chunk; reversed in a start-trimmed chunk)
    reverse = trim_start[:, None] & (chunk_of_token[None, :] == overflow_chunk[:, None])
    inside = torch.where(reverse, per_chunk - 1 - local[None, :], local[None, :].expand(batch, length))
    token_rank = rank.gather(1, chunk_of_token[None, :].expand(batch, length))
    sort_key = ((~keep).long() * n_chunks + token_rank) * per_chunk + inside
    return sort_key.argsort(dim=1)[:, :budget].sort(dim=1).values
