"""AV-Digits on the real FSDD and MNIST files (skipped unless AVCL_DATA_DIR is set)."""
import re

import pytest
import torch

from avcl.config import load_config
from avcl.data import build_dataset
from avcl.data.features import require_raw
from avcl.core.errors import AvclError
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


def _speaker(name: str) -> str:
    return re.match(r"\d_([a-z]+)_\d+\.wav", name).group(1)


@pytest.fixture(scope="module")
def held_out_george():
    cfg = load_config("avdigits", ["data.held_out_speakers=[george]", "data.cache=false"])
    return build_dataset(cfg.data, None, cfg.seed)


def test_held_out_speakers_never_in_the_stream(dataset, held_out_george):
    files = held_out_george.info["fsdd_file"]
    assert {_speaker(f) for f in files["held_out"]} == {"george"}
    for split in ("train", "val", "test"):  # neither the stream nor its evaluation hears george
        assert "george" not in {_speaker(f) for f in files[split]}
    take = lambda name: int(re.match(r"\d_[a-z]+_(\d+)\.wav", name).group(1))  # noqa: E731
    assert all(take(f) >= 5 for f in files["held_out"])  # george's train+val takes; his test takes are dropped
    held = held_out_george.held_out
    assert held["audio"].shape == (450, 98, 40) and held["video"].shape == (450, 8, 32, 32)
    assert held["video"].dtype == torch.uint8 and sorted(held["label"].unique().tolist()) == list(range(10))
    counts = held_out_george.info["counts"]
    assert counts["test"] == 250 and counts["train"] + counts["val"] == 2250
    assert held_out_george.info["held_out_speakers"] == ["george"]
    assert held_out_george.info["held_out_counts"] == {"held_out": 450, "dropped_test": 50}
    assert dataset.held_out == {} and dataset.info["held_out_speakers"] == []
    require_raw(held_out_george)  # frames and fbank, as the pre-training models read them
    require_raw(held_out_george.held_out)


def test_held_out_speakers_change_the_cache_key(held_out_george, monkeypatch, capsys):
    import avcl.data.avdigits as avdigits
    real_build, built = avdigits._build, []
    monkeypatch.setattr(avdigits, "_build", lambda opts, *a: (built.append(list(opts.held_out_speakers)),
                                                              real_build(opts, *a))[1])
    build = lambda speakers: build_dataset(  # noqa: E731
        load_config("avdigits", [f"data.held_out_speakers=[{speakers}]"]).data, None, 0)
    build("george")
    assert "avcl: AV-Digits: building 3000 clips" in capsys.readouterr().err  # the slow start is announced
    cached = build("george")  # from the cache, held-out split included
    assert built == [["george"]]
    assert "building" not in capsys.readouterr().err
    assert torch.equal(cached.held_out["video"], held_out_george.held_out["video"])
    assert cached.info["fsdd_file"] == held_out_george.info["fsdd_file"]
    other = build("theo")  # another speaker is another cache entry, not george's
    assert built == [["george"], ["theo"]]
    assert {_speaker(f) for f in other.info["fsdd_file"]["held_out"]} == {"theo"}
    assert "george" in {_speaker(f) for f in other.info["fsdd_file"]["train"]}


def test_unknown_held_out_speaker():
    cfg = load_config("avdigits", ["data.held_out_speakers=[george,alice]"])
    with pytest.raises(AvclError, match=r"unknown FSDD speaker\(s\) \['alice'\] \(known: george, jackson, lucas"):
        build_dataset(cfg.data, None, cfg.seed)
