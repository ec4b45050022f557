"""The task-free reservoir buffer (continual_ssl_baselines.md §1.2)."""
import math

import pytest
import torch

from avcl.memory.reservoir import ReservoirBuffer


def offer_ids(buffer: ReservoirBuffer, ids: torch.Tensor, batch: int) -> None:
    for start in range(0, len(ids), batch):
        chunk = ids[start:start + batch]
        buffer.add({"id": chunk, "x": chunk.float()[:, None].repeat(1, 3)})


def chi_square_bound(dof: int, z: float = 3.09) -> float:
    """Upper 0.1 % point of chi-square(dof), normal approximation (fine for large dof)."""
    return dof + z * math.sqrt(2 * dof)


def test_vectorised_add_equals_the_sequential_algorithm():
    """Same draws, one row at a time: slot n while n < M, else j ~ U{0..n}, kept if j < M."""
    capacity, seed = 50, 7
    buffer = ReservoirBuffer(capacity, seed=seed)
    ids = torch.arange(600)
    sizes = [13, 64, 1, 200, 37, 285]  # batches larger than the capacity too (many in-batch collisions)
    generator = torch.Generator().manual_seed(seed)
    expected, seen, start = [-1] * capacity, 0, 0
    for size in sizes:
        chunk = ids[start:start + size]
        buffer.add({"id": chunk})
        u = torch.rand(size, dtype=torch.float64, generator=generator)
        for i, row in enumerate(chunk.tolist()):
            n = seen + i
            j = n if n < capacity else math.floor(float(u[i]) * (n + 1))
            if j < capacity:
                expected[j] = row
        seen += size
        start += size
        assert buffer.rows()["id"].tolist() == expected[:min(seen, capacity)]
    assert buffer.seen == 600 and len(buffer) == capacity


def test_first_rows_fill_slots_in_order():
    buffer = ReservoirBuffer(10, seed=0)
    offer_ids(buffer, torch.arange(7), batch=3)
    assert len(buffer) == 7 and buffer.seen == 7
    assert buffer.rows()["id"].tolist() == list(range(7))
    assert buffer.rows()["x"][:, 0].tolist() == [float(i) for i in range(7)]


def test_inclusion_is_uniform_over_every_row_offered():
    """1000 ids through a 100-slot reservoir, 300 independent streams: each id is kept with p = 0.1."""
    streams, offered, capacity = 300, 1000, 100
    counts = torch.zeros(offered)
    for s in range(streams):
        buffer = ReservoirBuffer(capacity, seed=1000 + s)
        offer_ids(buffer, torch.arange(offered), batch=48)
        kept = buffer.rows()["id"]
        assert len(kept.unique()) == capacity  # each id offered once: no duplicates
        counts[kept] += 1
    expected = streams * capacity / offered
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(offered - 1), chi2
    # no drift between early and late rows (what a wrong collision rule would cause)
    first, last = counts[:500].mean(), counts[500:].mean()
    assert abs(float(first - last)) < 1.5, (first, last)  # sd of the difference ~0.33


def test_sample_is_uniform_without_replacement():
    buffer = ReservoirBuffer(20, seed=3)
    offer_ids(buffer, torch.arange(20), batch=20)
    hits = torch.zeros(20)
    draws = 2000
    for _ in range(draws):
        slots, rows = buffer.sample(5)
        assert len(slots.unique()) == 5
        assert torch.equal(rows["id"], buffer.storage["id"][slots])
        hits[slots] += 1
    expected = draws * 5 / 20
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_bound(19, z=3.09) + 10, chi2  # small dof: generous bound
    slots, rows = buffer.sample(100)  # k is clamped to the filled size
    assert sorted(slots.tolist()) == list(range(20))


def test_sample_only_filled_slots():
    buffer = ReservoirBuffer(50, seed=0)
    offer_ids(buffer, torch.arange(6), batch=6)
    slots, rows = buffer.sample(50)
    assert sorted(slots.tolist()) == list(range(6))
    assert sorted(rows["id"].tolist()) == list(range(6))


def test_write_overwrites_fields_without_counting_a_presentation():
    buffer = ReservoirBuffer(8, seed=0)
    offer_ids(buffer, torch.arange(8), batch=8)
    slots = torch.tensor([1, 5])
    buffer.write(slots, {"x": torch.full((2, 3), -1.0)})
    assert buffer.seen == 8
    assert (buffer.storage["x"][slots] == -1).all()
    assert buffer.storage["x"][0].tolist() == [0.0, 0.0, 0.0]
    assert buffer.storage["id"][slots].tolist() == [1, 5]
    with pytest.raises(KeyError):
        buffer.write(slots, {"nope": torch.zeros(2)})


def test_rows_are_stored_detached_with_their_dtype():
    buffer = ReservoirBuffer(4, seed=0)
    x = torch.randn(3, 2, requires_grad=True)
    buffer.add({"x": x * 2, "h": torch.ones(3, dtype=torch.bfloat16)})
    assert not buffer.storage["x"].requires_grad
    assert buffer.storage["h"].dtype == torch.bfloat16
    assert torch.equal(buffer.rows()["x"], (x * 2).detach())


def test_capacity_zero_never_stores():
    buffer = ReservoirBuffer(0, seed=0)
    offer_ids(buffer, torch.arange(30), batch=8)
    assert len(buffer) == 0 and buffer.seen == 30
    slots, rows = buffer.sample(4)
    assert len(slots) == 0 and not rows


def test_state_dict_round_trip_gives_identical_future_draws(tmp_path):
    def future(buffer):
        offer_ids(buffer, torch.arange(100, 300), batch=16)
        draws = [buffer.sample(7)[0].tolist() for _ in range(5)]
        return buffer.storage["id"].tolist(), draws

    original = ReservoirBuffer(40, seed=11)
    offer_ids(original, torch.arange(100), batch=16)
    torch.save(original.state_dict(), tmp_path / "buffer.pt")
    resumed = ReservoirBuffer(40, seed=999)  # the seed is overridden by the saved generator state
    resumed.load_state_dict(torch.load(tmp_path / "buffer.pt", weights_only=True))
    assert resumed.seen == 100 and len(resumed) == 40
    assert future(original) == future(resumed)


def test_partially_filled_state_round_trip():
    original = ReservoirBuffer(40, seed=5)
    offer_ids(original, torch.arange(10), batch=4)
    resumed = ReservoirBuffer(40)
    resumed.load_state_dict(original.state_dict())
    assert len(resumed) == 10 and resumed.storage["id"].shape[0] == 40
    offer_ids(original, torch.arange(10, 90), batch=9)
    offer_ids(resumed, torch.arange(10, 90), batch=9)
    assert torch.equal(original.storage["id"], resumed.storage["id"])
