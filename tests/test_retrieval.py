"""Retrieval metrics on hand-made similarity matrices, and the continual summaries in both forms."""
import math

import pytest
import torch

from avcl.eval.retrieval import (forgetting_authors, forgetting_textbook, ranks, retrieval_scores,
                                 summarize_retrieval)


def test_ranks_of_the_diagonal():
    sim = torch.tensor([[0.9, 0.1, 0.2],    # audio 0: its video is the best -> rank 0
                        [0.8, 0.5, 0.7],    # audio 1: two videos score higher -> rank 2
                        [0.1, 0.9, 0.3]])   # audio 2: one higher -> rank 1
    assert ranks(sim).tolist() == [0, 2, 1]
    assert ranks(sim.T).tolist() == [0, 1, 1]  # video->audio: the columns (0.9 > 0.5 in column 1)


def test_ties_count_against_the_query():
    sim = torch.ones(3, 3)  # every candidate ties: no credit for luck
    assert ranks(sim).tolist() == [2, 2, 2]


def test_two_identical_video_embeddings_rank_the_right_one_second():
    # clips 0 and 1 have the same embeddings: each one's query ties its own video with the other's. avcl: one
    # rank per query, the right answer after the tied wrong one -> ranks [1, 1, 0], R@1 1/3, median rank 2.
    # (STELLA's compute_metrics would count both tied positions of rows 0 and 1: hits [0, 1, 0, 1, 0], R@1 3/5,
    # median rank 1.)
    audio = video = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    sim = audio @ video.T
    assert ranks(sim).tolist() == [1, 1, 0]
    scores = retrieval_scores(sim, [torch.ones(3, dtype=torch.bool)], [1, 2])
    for direction in ("a2v", "v2a"):
        assert scores[direction]["R@1"] == [pytest.approx(1 / 3)]
        assert scores[direction]["R@2"] == [1.0]
        assert scores[direction]["median_rank"] == [2.0]


def test_recall_and_median_rank_per_group():
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],
                        [0.8, 0.5, 0.7, 0.0],
                        [0.1, 0.9, 0.3, 0.0],
                        [0.0, 0.0, 0.0, 1.0]])
    groups = [torch.tensor([True, True, False, False]), torch.tensor([False, False, True, True])]
    scores = retrieval_scores(sim, groups, [1, 2])
    # a2v ranks: [0, 2, 1, 0] -> group 0: R@1 1/2, R@2 1/2; group 1: R@1 1/2, R@2 1
    assert scores["a2v"]["R@1"] == [0.5, 0.5]
    assert scores["a2v"]["R@2"] == [0.5, 1.0]
    # 1-based ranks [1, 3] and [2, 1]: the median of an even count is the mean of the two middle ones (the code's
    # np.median; torch.median's lower middle would give [1, 1])
    assert scores["a2v"]["median_rank"] == [2.0, 1.5]
    # v2a ranks (columns): video 0 -> 0, video 1 -> 1 (0.9 beats 0.5), video 2 -> 1, video 3 -> 0
    assert scores["v2a"]["R@1"] == [0.5, 0.5]


MATRIX = [[0.5, 0.1, 0.2],   # after task 0 (tasks 1, 2 not learned yet)
          [0.3, 0.6, 0.4],   # after task 1
          [0.2, 0.5, 0.7]]   # after task 2


def test_forgetting_textbook_uses_only_evaluations_after_learning():
    # task 0: max(0.5, 0.3) - 0.2 = 0.3; task 1: 0.6 - 0.5 = 0.1 -> mean 0.2
    assert forgetting_textbook(MATRIX) == pytest.approx(0.2)


def test_forgetting_authors_form_takes_every_earlier_row_and_every_task():
    # task 0: max(0.5, 0.3) - 0.2 = 0.3; task 1: max(0.1, 0.6) - 0.5 = 0.1;
    # task 2 (the last, included): max(0.2, 0.4) - 0.7 = -0.3; sum / (T - 1) = 0.1 / 2
    assert forgetting_authors(MATRIX) == pytest.approx(0.05)


def test_forgetting_authors_differs_when_a_task_was_good_before_being_learned():
    matrix = [[0.5, 0.9], [0.5, 0.4]]  # task 1 scored 0.9 before it was learned, 0.4 after
    assert forgetting_textbook(matrix) == pytest.approx(0.0)
    assert forgetting_authors(matrix) == pytest.approx(0.5)


def test_single_evaluation_has_no_forgetting():
    assert forgetting_authors([[0.4, 0.5]]) is None and forgetting_textbook([[0.4, 0.5]]) is None


def test_summary_averages_over_k():
    matrices = {d: {"R@1": MATRIX, "R@5": [[1.0] * 3] * 3, "median_rank": [[1.0] * 3] * 3} for d in ("a2v", "v2a")}
    out = summarize_retrieval(matrices, [1, 5])
    assert out["a2v_R@1"] == pytest.approx((0.2 + 0.5 + 0.7) / 3)
    assert out["a2v_average"] == pytest.approx((out["a2v_R@1"] + 1.0) / 2)
    assert out["v2a_forgetting"] == pytest.approx((0.05 + 0.0) / 2)
    assert out["v2a_forgetting_textbook"] == pytest.approx((0.2 + 0.0) / 2)
    assert not math.isnan(out["a2v_median_rank"])
