"""STELLA: patch scoring and selection (avcl/methods/stella/selection.py) and the method's step."""
import pytest
import torch

from avcl.config import build_config
from avcl.data import build_dataset
from avcl.engine.runner import build_method
from avcl.methods.stella import scatter_patches
from avcl.methods.stella.selection import (bernoulli_prune, candidate_mask, contiguous_audio_selection,
                                           past_correlation, patch_importance, pooled_queries, top_k_selection,
                                           weighted_sample_without_replacement)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def normalised(raw):
    return raw / raw.sum(dim=1, keepdim=True)


# ----- A.5 importance, pooled queries; A.6 step 1 correlation -------------------------------------
def test_importance_sums_to_one_and_matches_the_formula():
    g = gen()
    B, H, La, Lv, d, T = 2, 3, 6, 5, 4, 0.4
    q_a, k_a = torch.randn(B, H, La, d, generator=g), torch.randn(B, H, La, d, generator=g)
    q_v, k_v = torch.randn(B, H, Lv, d, generator=g), torch.randn(B, H, Lv, d, generator=g)
    i_a, i_v = patch_importance(q_a, k_a, q_v, k_v, T)
    assert i_a.shape == (B, La) and i_v.shape == (B, Lv)
    torch.testing.assert_close(i_a.sum(1), torch.ones(B))
    torch.testing.assert_close(i_v.sum(1), torch.ones(B))
    # I_v[j] = 1/(H La) sum_{h,i} softmax_j(q_a[h,i] . k_v[h,j] / sqrt(d) / T), written out for row 1
    ref = torch.zeros(Lv)
    for h in range(H):
        for i in range(La):
            ref += torch.softmax(k_v[1, h] @ q_a[1, h, i] / d ** 0.5 / T, dim=0)
    torch.testing.assert_close(i_v[1], ref / (H * La))


def test_pooled_queries_weight_the_top_k_by_importance():
    g = gen(1)
    q = torch.randn(2, 3, 8, 4, generator=g)
    importance = normalised(torch.rand(2, 8, generator=g))
    pooled = pooled_queries(q, importance, 3)
    for b in range(2):
        top = importance[b].topk(3).indices
        w = importance[b, top]
        ref = (w[None, :, None] * q[b][:, top]).sum(1) / w.sum()
        torch.testing.assert_close(pooled[b], ref)


def test_correlation_in_unit_interval_zero_outside_candidates():
    g = gen(2)
    B, H, L, d = 3, 2, 10, 8
    k = torch.randn(B, H, L, d, generator=g)
    q_past, q_now = torch.randn(B, H, d, generator=g) * 3, torch.randn(B, H, d, generator=g) * 3
    candidates = candidate_mask(torch.rand(B, L, generator=g), 4)
    assert candidates.sum(1).tolist() == [4, 4, 4]
    c = past_correlation(k, q_past, q_now, candidates)
    assert c.shape == (B, L) and (c[~candidates] == 0).all()
    assert (c >= 0).all() and (c <= 1).all() and (c[candidates] > 0).all()
    b, j = candidates.nonzero()[0].tolist()
    ref = torch.sigmoid((k[b, :, j] * (q_past[b] - q_now[b])).sum(-1) / d ** 0.5).mean()
    torch.testing.assert_close(c[b, j], ref)
    # a past query equal to the current one claims nothing more: sigmoid(0) = 1/2
    torch.testing.assert_close(past_correlation(k, q_now, q_now, candidates)[candidates],
                               torch.full((12,), 0.5))


def test_bernoulli_pruning_follows_c():
    c = torch.tensor([[0.0, 1.0, 0.3]]).expand(20000, 3)
    prune = bernoulli_prune(c, gen(3))
    assert not prune[:, 0].any() and prune[:, 1].all()
    assert abs(prune[:, 2].float().mean().item() - 0.3) < 0.015


# ----- A.6 step 3a: weighted sampling without replacement ------------------------------------------
def test_weighted_sampling_keeps_k_distinct_and_never_a_pruned_id_while_unpruned_remain():
    g = gen(4)
    weights = normalised(torch.rand(64, 20, generator=g))
    pruned = torch.rand(64, 20, generator=g) < 0.5
    pruned[:, :8] = False  # at least 8 unpruned per row
    ids = weighted_sample_without_replacement(weights, 8, pruned, g)
    assert ids.shape == (64, 8)
    assert all(len(set(row.tolist())) == 8 for row in ids)
    assert not pruned.gather(1, ids).any()
    # too few unpruned: every unpruned id is kept, pruned ones fill the budget
    few = torch.ones(64, 20, dtype=torch.bool)
    few[:, 3:6] = False
    ids = weighted_sample_without_replacement(weights, 8, few, g)
    assert ids.shape == (64, 8) and all(len(set(row.tolist())) == 8 for row in ids)
    assert ((ids >= 3) & (ids < 6)).sum(1).tolist() == [3] * 64


def test_gumbel_top_k_frequencies_match_sampling_without_replacement():
    w = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    n = 40000
    weights = w.expand(n, 5)
    first = weighted_sample_without_replacement(weights, 1, None, gen(5))[:, 0]
    torch.testing.assert_close(torch.bincount(first, minlength=5) / n, w, atol=0.01, rtol=0)
    # inclusion in the first two picks: P(i) = w_i + sum_{j != i} w_j w_i / (1 - w_j)
    exact = torch.tensor([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(5) if j != i) for i in range(5)])
    two = weighted_sample_without_replacement(weights, 2, None, gen(6))
    torch.testing.assert_close(torch.bincount(two.flatten(), minlength=5) / n, exact, atol=0.01, rtol=0)
    # pruning the heaviest id: the first pick is proportional to the others' weights
    pruned = torch.tensor([True, False, False, False, False]).expand(n, 5)
    first = weighted_sample_without_replacement(weights, 1, pruned, gen(7))[:, 0]
    rest = torch.cat([torch.zeros(1), w[1:] / w[1:].sum()])
    torch.testing.assert_close(torch.bincount(first, minlength=5) / n, rest, atol=0.01, rtol=0)


def test_top_k_selection_is_deterministic_top_k():
    importance = torch.tensor([[0.1, 0.4, 0.05, 0.3, 0.15], [0.3, 0.1, 0.2, 0.25, 0.15]])
    assert top_k_selection(importance, 3).tolist() == [[1, 3, 4], [0, 2, 3]]


# ----- A.6 step 3b: contiguous audio selection --------------------------------------------------------
T, F, CHUNK = 32, 4, 4  # 8 chunks of 16 tokens, time-major ids t * F + f


def concentrated(rows, steps=range(12, 20)):
    """Importance almost only on time steps 12..19 (chunks 3 and 4)."""
    importance = torch.full((rows, T, F), 1e-7)
    importance[:, list(steps)] = 1.0
    return normalised(importance.view(rows, T * F))


def test_audio_selection_takes_whole_chunks_when_the_budget_allows():
    g = gen(8)
    importance = normalised(torch.rand(50, T * F, generator=g))
    ids = contiguous_audio_selection(importance, None, T, F, CHUNK, 48, g)
    assert ids.shape == (50, 48) and all(len(set(row.tolist())) == 48 for row in ids)
    per_chunk = torch.zeros(50, T // CHUNK, dtype=torch.long).scatter_add_(
        1, ids // (CHUNK * F), torch.ones_like(ids))
    assert set(per_chunk.unique().tolist()) == {0, 16}  # 3 whole chunks, nothing partial


@pytest.mark.parametrize("budget", [24, 22])  # 1.5 chunks; and a cut inside a time step
def test_audio_selection_trims_the_overflowing_chunk_next_to_its_taken_neighbour(budget):
    ids = contiguous_audio_selection(concentrated(300), None, T, F, CHUNK, budget, gen(9))
    assert ids.shape == (300, budget)
    # one contiguous run of tokens inside chunks 3-4: the partial chunk touches the whole one,
    # whichever of the two was drawn first (trimmed at its end, or at its start)
    assert ((ids[:, -1] - ids[:, 0]) == budget - 1).all()
    assert (ids >= 12 * F).all() and (ids < 20 * F).all()
    in_chunk_3 = (ids < 16 * F).sum(1)
    assert set(in_chunk_3.unique().tolist()) == {16, budget - 16}  # both draw orders occurred


def test_audio_selection_trims_either_side_without_taken_neighbours():
    # only chunk 3 matters; with 8 tokens the kept half of it is its start or its end, at random
    ids = contiguous_audio_selection(concentrated(400, range(12, 16)), None, T, F, CHUNK, 8, gen(10))
    assert ((ids[:, -1] - ids[:, 0]) == 7).all()
    starts = ids[:, 0]
    assert set(starts.unique().tolist()) == {12 * F, 14 * F}
    assert 0.4 < (starts == 12 * F).float().mean() < 0.6


def test_audio_selection_trims_a_random_side_when_both_neighbours_are_taken():
    # chunks 3 and 5 come first, chunk 4 (between them) overflows: the code's random.randint(0, 1) branch,
    # a fair coin; the ratios (1 : 1e-15 : 1e-30) make any other chunk order a ~1e-15 event
    rows = 2000
    importance = torch.full((rows, T, F), 1e-30)
    importance[:, 12:16] = importance[:, 20:24] = 1.0
    importance[:, 16:20] = 1e-15
    ids = contiguous_audio_selection(normalised(importance.view(rows, T * F)), None, T, F, CHUNK, 38, gen(12))
    whole = list(range(48, 64)) + list(range(80, 96))
    kept_start = torch.tensor(sorted(whole + list(range(64, 70))))  # trimmed at its end: its first 6 tokens
    kept_end = torch.tensor(sorted(whole + list(range(74, 80))))  # trimmed at its start: its last 6 tokens
    is_start, is_end = (ids == kept_start).all(1), (ids == kept_end).all(1)
    assert (is_start | is_end).all()
    assert 0.45 < is_end.float().mean() < 0.55  # binomial sd ~0.011 at 2000 rows


def test_audio_selection_skips_pruned_tokens_and_stays_contiguous_otherwise():
    g = gen(11)
    rows, budget = 300, 20
    pruned = torch.rand(rows, T * F, generator=g) < 0.2
    ids = contiguous_audio_selection(concentrated(rows), pruned, T, F, CHUNK, budget, g)
    assert ids.shape == (rows, budget) and not pruned.gather(1, ids).any()
    # rows whose chunks 3-4 hold enough unpruned tokens (the others rightly take a third chunk)
    enough = (~pruned[:, 12 * F:20 * F]).sum(1) >= budget
    assert enough.sum() > 250
    ids, pruned = ids[enough], pruned[enough]
    rows = len(ids)
    # between the first and the last selected token, every token is selected or pruned
    position = torch.arange(T * F)
    span = (position >= ids[:, :1]) & (position <= ids[:, -1:])
    selected = torch.zeros(rows, T * F, dtype=torch.bool).scatter_(1, ids, True)
    assert (selected | pruned)[span].all()
    assert (ids >= 12 * F).all() and (ids < 20 * F).all()


def test_audio_selection_fills_with_pruned_tokens_when_too_few_remain():
    g = gen(12)
    pruned = torch.ones(20, T * F, dtype=torch.bool)
    pruned[:, 40:45] = False  # 5 unpruned tokens, budget 12
    ids = contiguous_audio_selection(normalised(torch.rand(20, T * F, generator=g)), pruned, T, F, CHUNK, 12, g)
    assert ids.shape == (20, 12) and all(len(set(row.tolist())) == 12 for row in ids)
    assert ((ids >= 40) & (ids < 45)).sum(1).tolist() == [5] * 20


# ----- the method (tiny CAV on synthetic clips) ------------------------------------------------------
ROWS = 8
TINY_CAV = {"width": 32, "depth": 1, "fusion_depth": 1, "heads": 2, "decoder_width": 32, "decoder_depth": 1,
            "decoder_heads": 2, "video_patch": 4, "audio_patch": [4, 4]}  # 64 video, 8 x 5 audio tokens


def tiny_config(store="clip", memory=16):
    return build_config({
        "data": {"name": "synthetic", "num_classes": 4, "train_per_class": 8, "val_per_class": 1,
                 "test_per_class": 2},
        "model": {"name": "cav", "vit": TINY_CAV}, "methods": ["stella"], "memory": {"size": memory},
        "train": {"batch_size": ROWS, "replay_batch_size": ROWS},
        "method_args": {"stella": {"store": store}}})


@pytest.fixture(scope="module")
def clips():
    data = build_dataset(tiny_config().data, None, 0).train
    return {k: v for k, v in data.items() if k != "label"}


def make(clips, store="clip", seed=0):
    torch.manual_seed(seed)
    return build_method("stella", tiny_config(store), clips)


def batch_of(clips, start=0):
    return {k: v[start:start + ROWS] for k, v in clips.items()}


def record_selections(method, monkeypatch):
    """Wrap ``model.ssl_loss``: the list of its ``selected`` ids and outputs, one entry per call."""
    calls, real = [], method.model.ssl_loss

    def spy(x, selected=None, **kw):
        out = real(x, selected=selected, **kw)
        calls.append({"selected": selected, "out": out, "x": x})
        return out

    monkeypatch.setattr(method.model, "ssl_loss", spy)
    return calls


def test_first_step_is_top_k_without_pruning_and_fills_the_buffer(clips, monkeypatch, one_thread):
    method = make(clips)
    calls = record_selections(method, monkeypatch)
    loss = method.training_loss(batch_of(clips))
    assert loss.isfinite()
    (call,) = calls
    stored = method.memory.rows()
    assert len(method.memory) == ROWS
    for m, k in (("audio", 20), ("video", 32)):
        assert call["selected"][m].shape == (ROWS, k)  # only current rows: nothing to replay yet
        assert torch.equal(call["selected"][m], top_k_selection(stored[f"i_{m}"], k))
        assert (stored[f"c_{m}"] == 0).all()
        torch.testing.assert_close(stored[f"i_{m}"].sum(1), torch.ones(ROWS))
        torch.testing.assert_close(stored[f"z_{m}"], call["out"][f"z_{m}"].detach())
        torch.testing.assert_close(stored[m], call["x"][m])


def test_later_steps_replay_and_score_the_current_rows_against_the_past(clips, monkeypatch, one_thread):
    method = make(clips)
    method.training_loss(batch_of(clips))
    calls = record_selections(method, monkeypatch)
    method.training_loss(batch_of(clips, ROWS))
    (call,) = calls
    assert all(call["selected"][m].shape[0] == 2 * ROWS for m in ("audio", "video"))
    newest = method.memory.rows()
    assert len(method.memory) == 2 * ROWS
    c = newest["c_video"][ROWS:]  # the second batch's rows, scored against the replayed queries
    assert (c > 0).any() and (c >= 0).all() and (c <= 1).all()
    assert ((c > 0).sum(1) <= 32).all()  # non-zero on the 32 candidates at most


def test_replayed_rows_use_their_stored_scores_not_recomputed_ones(clips, monkeypatch, one_thread):
    method = make(clips)
    method.training_loss(batch_of(clips))
    # Stored scores the model would never produce: all the importance on video tokens 32..63 and
    # audio chunk 1 (time steps 4..7 = tokens 20..39), no correlation (nothing pruned).
    i_video = torch.zeros(ROWS, 64)
    i_video[:, 32:] = 1 / 32
    i_audio = torch.zeros(ROWS, 40)
    i_audio[:, 20:] = 1 / 20
    method.memory.write(torch.arange(ROWS), {"i_video": i_video, "i_audio": i_audio,
                                             "c_video": torch.zeros(ROWS, 64), "c_audio": torch.zeros(ROWS, 40)})
    calls = record_selections(method, monkeypatch)
    method.training_loss(batch_of(clips, ROWS))
    selected = calls[0]["selected"]
    assert (selected["video"][ROWS:] == torch.arange(32, 64)).all()
    assert (selected["audio"][ROWS:] == torch.arange(20, 40)).all()
    assert not (selected["video"][:ROWS] == torch.arange(32, 64)).all(1).any()  # the current rows' own scores


def test_replayed_pruning_is_redrawn_from_the_stored_correlation(clips, monkeypatch, one_thread):
    method = make(clips)
    method.training_loss(batch_of(clips))
    c_video = torch.zeros(ROWS, 64)
    c_video[:, :40] = 1.0  # tokens 0..39 always pruned: 24 unpruned left for a budget of 32
    method.memory.write(torch.arange(ROWS), {"c_video": c_video})
    calls = record_selections(method, monkeypatch)
    method.training_loss(batch_of(clips, ROWS))
    replayed = calls[0]["selected"]["video"][ROWS:]
    assert ((replayed >= 40).sum(1) == 24).all()  # every unpruned token, then 8 pruned fill-ins


def test_der_term_pulls_replayed_embeddings_to_the_stored_ones(clips, monkeypatch, one_thread):
    """Same seed, same draws: shifting the stored z_audio by a random v changes the loss by exactly
    der_alpha * (mean((z - z_stored - v)^2) - mean((z - z_stored)^2)) over the replayed rows."""
    method = make(clips)
    method.training_loss(batch_of(clips))
    monkeypatch.setattr(method.memory, "add", lambda rows: None)  # keep the buffer as is
    calls = record_selections(method, monkeypatch)
    generator_state = method.memory.generator.get_state()

    def loss_with(shift):
        stored = method.memory.rows()["z_audio"].clone()
        method.memory.write(torch.arange(ROWS), {"z_audio": stored + shift})
        method.memory.generator.set_state(generator_state)
        torch.manual_seed(1)
        with torch.no_grad():
            loss = method.training_loss(batch_of(clips, ROWS))
        method.memory.write(torch.arange(ROWS), {"z_audio": stored})
        return float(loss), stored

    shift = torch.randn(ROWS, 32, generator=gen(13))
    base, stored = loss_with(0.0)
    shifted, _ = loss_with(shift)
    z_now = calls[0]["out"]["z_audio"][ROWS:]
    torch.testing.assert_close(calls[1]["out"]["z_audio"][ROWS:], z_now)  # the same draws
    method.memory.generator.set_state(generator_state)
    slots, _ = method.memory.sample(ROWS)
    target = stored[slots]
    expected = 0.5 * (((z_now - target - shift[slots]) ** 2).mean() - ((z_now - target) ** 2).mean())
    assert shifted - base == pytest.approx(float(expected), rel=1e-4, abs=1e-5)
    assert shifted > base


def test_avm_loss_equals_the_backbones(clips, one_thread):
    method = make(clips)
    x = method.model.prepare(batch_of(clips), train=False)
    torch.manual_seed(3)
    expected = method.model.avm_loss(x).detach()
    torch.manual_seed(3)
    assert float(method.score(x)["avm_loss"].detach()) == pytest.approx(float(expected), rel=1e-6)


def test_one_step_updates_the_avm_and_the_backbone(clips, one_thread):
    method = make(clips)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    for start in (0, ROWS):  # the first step (top-K) and a replay step
        before = {name: p.detach().clone() for name, p in method.model.named_parameters()}
        loss = method.training_loss(batch_of(clips, start))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        changed = {name for name, p in method.model.named_parameters() if not torch.equal(before[name], p)}
        for name in ("avm.to_q.audio.weight", "avm.matching.2.weight", "patch_embed.video.weight",
                     "blocks.audio.0.attn.qkv.weight", "fusion_blocks.0.attn.qkv.weight", "decoder_pred.audio.weight"):
            assert name in changed, f"{name} not updated at step {start // ROWS}"


# ----- STELLA+ --------------------------------------------------------------------------------------------
def test_scatter_patches_inverts_patchify_and_ssl_loss_reads_only_the_selected_patches(clips, one_thread):
    method = make(clips)
    model = method.model
    x = model.prepare(batch_of(clips), train=True)
    ids = {"audio": top_k_selection(torch.rand(ROWS, 40), 20), "video": top_k_selection(torch.rand(ROWS, 64), 32)}
    patches = model.patchify(x)
    kept = {m: patches[m].gather(1, ids[m][..., None].expand(-1, -1, patches[m].shape[2])) for m in ids}
    rebuilt = scatter_patches(model, kept, ids, x)
    again = model.patchify(rebuilt)
    for m in ids:
        assert rebuilt[m].shape == x[m].shape
        assert torch.equal(again[m].gather(1, ids[m][..., None].expand(-1, -1, again[m].shape[2])), kept[m])
        outside = torch.ones(ROWS, again[m].shape[1], dtype=torch.bool).scatter_(1, ids[m], False)
        assert (again[m][outside] == 0).all()
    torch.manual_seed(4)
    full = model.ssl_loss(x, selected=ids)
    torch.manual_seed(4)
    partial = model.ssl_loss(rebuilt, selected=ids)
    for key in ("loss", "mae_audio", "mae_video", "contrastive", "z_audio", "z_video"):
        torch.testing.assert_close(partial[key], full[key])


def numbers_per_slot(method):
    return sum(v[0].numel() for v in method.memory.storage.values())


def test_stella_plus_stores_the_selected_patches_and_reuses_the_selection(clips, monkeypatch, one_thread):
    clip, plus = make(clips, "clip"), make(clips, "patches")
    clip.training_loss(batch_of(clips))
    calls = record_selections(plus, monkeypatch)
    plus.training_loss(batch_of(clips))
    stored = plus.memory.rows()
    raw = sum(clip.memory.storage[m][0].numel() for m in ("audio", "video"))  # the prepared clip
    kept = sum(stored[f"{m}_patches"][0].numel() for m in ("audio", "video"))
    assert kept * 2 == raw  # half the patches (core ratios 0.5)
    assert numbers_per_slot(plus) < numbers_per_slot(clip)
    assert "c_video" not in stored and "audio" not in stored
    first = calls[0]
    for m in ("audio", "video"):  # each row's selection and the patch values at it
        assert torch.equal(stored[f"{m}_ids"], first["selected"][m])
        patches = plus.model.patchify(first["x"])[m]
        assert torch.equal(stored[f"{m}_patches"],
                           patches.gather(1, first["selected"][m][..., None].expand(-1, -1, patches.shape[2])))
    # at replay the stored ids are used as they are, with the stored patch values
    plus.training_loss(batch_of(clips, ROWS))
    selected, x = calls[1]["selected"], calls[1]["x"]
    slots_order = [int((stored["video_ids"] == row).all(1).nonzero()[0]) for row in selected["video"][ROWS:]]
    assert sorted(slots_order) == list(range(ROWS))
    for m in ("audio", "video"):
        assert torch.equal(selected[m][ROWS:], stored[f"{m}_ids"][slots_order])
        replayed = plus.model.patchify({k: v[ROWS:] for k, v in x.items()})[m]
        values = replayed.gather(1, selected[m][ROWS:, :, None].expand(-1, -1, replayed.shape[2]))
        assert torch.equal(values, stored[f"{m}_patches"][slots_order])
