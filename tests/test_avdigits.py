"""AV-Digits on the real FSDD and MNIST files (skipped unless AVCL_DATA_DIR is set)."""
import re

import pytest
import torch

from avcl.config import load_config
from avcl.data import build_dataset
from conftest import needs_data

pytestmark = needs_data


@pytest.fixture(scope="module")
def dataset():
    cfg = load_config("avdigits")
    return build_dataset(cfg.data, None, cfg.seed)


def test_shapes_and_counts(dataset):
    assert dataset.info["counts"] == {"train": 2430, "val": 270, "test": 300}
    for split in (dataset.train, dataset.val, dataset.test):
        n = len(split["label"])
        assert split["audio"].shape == (n, 98, 40) and split["audio"].dtype == torch.float32
        assert split["video"].shape == (n, 8, 32, 32) and split["video"].dtype == torch.uint8
        assert sorted(split["label"].unique().tolist()) == list(range(10))


def test_official_fsdd_split(dataset):
    take = lambda name: int(re.match(r"\d_[a-z]+_(\d+)\.wav", name).group(1))  # noqa: E731
    assert all(take(f) < 5 for f in dataset.info["fsdd_file"]["test"])
    assert all(take(f) >= 5 for split in ("train", "val") for f in dataset.info["fsdd_file"][split])


def test_train_and_test_images_come_from_disjoint_pools(dataset):
    index = dataset.info["mnist_index"]
    assert not set(index["test"]) & (set(index["train"]) | set(index["val"]))


def test_digit_appears_and_moves(dataset):
    video = dataset.train["video"].float()
    ink = video.sum(dim=(2, 3))  # (N, T)
    assert (ink[:, -1] > 0).all(), "the digit is visible in the last frame of every clip"
    assert (ink[:, 0] == 0).any(), "some clips start before the digit appears"
    centre = lambda frame: (frame.sum(0) * torch.arange(32.0)).sum() / frame.sum()  # noqa: E731
    moved = sum(abs(centre(v[-1]) - centre(v[-2])) > 0 or abs(centre(v[-1]) - centre(v[3])) > 0
                for v in video[:50])
    assert moved > 25


def test_deterministic_from_the_seed(dataset):
    cfg = load_config("avdigits", ["data.cache=false"])
    again = build_dataset(cfg.data, None, cfg.seed)
    assert torch.equal(again.train["video"], dataset.train["video"])
    assert torch.allclose(again.test["audio"], dataset.test["audio"])
