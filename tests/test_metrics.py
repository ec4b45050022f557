"""Metric functions against hand-computed accuracy matrices."""
import pytest

from avcl.eval.metrics import (average_incremental_accuracy, backward_transfer, forgetting_avcil,
                               forgetting_standard, summarize)

# a[t][i]: accuracy on task i after learning task t
MATRIX = [
    [0.9],
    [0.6, 0.8],
    [0.7, 0.5, 0.9],
]
STEPS = [0.9, 0.7, 0.7]


def test_average_incremental_accuracy_includes_first_step():
    assert average_incremental_accuracy(STEPS) == pytest.approx((0.9 + 0.7 + 0.7) / 3)


def test_forgetting_standard_by_hand():
    # task 0: best before last = max(0.9, 0.6) = 0.9, last 0.7 -> 0.2
    # task 1: best before last = 0.8, last 0.5 -> 0.3
    assert forgetting_standard(MATRIX) == pytest.approx((0.2 + 0.3) / 2)


def test_forgetting_avcil_by_hand():
    # F_1 = (0.9 - 0.6) / 1 = 0.3
    # F_2 = ((max(0.9, 0.6) - 0.7) + (0.8 - 0.5)) / 2 = (0.2 + 0.3) / 2 = 0.25
    assert forgetting_avcil(MATRIX) == pytest.approx((0.3 + 0.25) / 2)


def test_forgetting_can_be_negative_when_old_task_improves():
    improved = [[0.5], [0.7, 0.9]]
    assert forgetting_standard(improved) == pytest.approx(-0.2)
    assert forgetting_avcil(improved) == pytest.approx(-0.2)


def test_bwt_by_hand():
    # (0.7 - 0.9 + 0.5 - 0.8) / 2
    assert backward_transfer(MATRIX) == pytest.approx(-0.25)


def test_single_task_has_no_forgetting():
    assert forgetting_standard([[0.8]]) == 0.0
    assert forgetting_avcil([[0.8]]) == 0.0
    assert backward_transfer([[0.8]]) == 0.0


def test_summarize_selects_and_names_the_variant():
    standard = summarize(MATRIX, STEPS, "standard")
    avcil = summarize(MATRIX, STEPS, "avcil")
    assert standard["forgetting"] == pytest.approx(0.25) and standard["forgetting_variant"] == "standard"
    assert avcil["forgetting"] == pytest.approx(0.275) and avcil["forgetting_variant"] == "avcil"
    assert standard["last_accuracy"] == 0.7
    assert standard["forgetting_avcil"] == avcil["forgetting_avcil"]
