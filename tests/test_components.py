"""Scenario splits, exemplar memory, the growing head, batching."""
import pytest
import torch
from omegaconf import OmegaConf

from avcl.config import ModelConfig
from avcl.data import AVDataset
from avcl.core.samples import batches, num_samples
from avcl.data.scenario import class_incremental, task_sizes
from avcl.core.errors import AvclError
from avcl.memory.buffer import ExemplarMemory, herding
from avcl.models import AVNet
from avcl.models.heads import IncrementalClassifier


def toy_dataset(num_classes=6, per_class=10):
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    split = {"audio": torch.randn(len(labels), 8, 5), "video": torch.zeros(len(labels), 2, 8, 8, dtype=torch.uint8),
             "label": labels}
    return AVDataset("toy", split, split, split, [f"c{c}" for c in range(num_classes)])


def test_task_sizes_equal_and_base_plus_increments():
    assert task_sizes(10, 5) == [2] * 5
    assert task_sizes(10, 3, first_task_classes=4) == [4, 3, 3]
    with pytest.raises(AvclError, match="num_tasks"):
        task_sizes(10, 3)
    with pytest.raises(AvclError, match="first_task_classes"):
        task_sizes(10, 3, first_task_classes=5)


def test_scenario_remaps_labels_to_contiguous_tasks():
    scenario = class_incremental(toy_dataset(), 3, class_order=[5, 4, 3, 2, 1, 0])
    assert [t.classes for t in scenario.tasks] == [[0, 1], [2, 3], [4, 5]]
    first = scenario.tasks[0]
    assert set(first.train["label"].tolist()) == {0, 1}
    assert num_samples(first.train) == 20
    assert scenario.class_names[:2] == ["c5", "c4"]  # original class 5 is now label 0
    assert scenario.task_of_class().tolist() == [0, 0, 1, 1, 2, 2]


def test_seeded_class_order_is_deterministic_and_validated():
    a = class_incremental(toy_dataset(), 3, seed=1).class_order
    assert a == class_incremental(toy_dataset(), 3, seed=1).class_order
    assert sorted(a) == list(range(6))
    with pytest.raises(AvclError, match="permutation"):
        class_incremental(toy_dataset(), 3, class_order=[0, 0, 1, 2, 3, 4])


def test_batches_cover_every_sample_once():
    data = {"x": torch.arange(10), "label": torch.arange(10)}
    seen = torch.cat([b["x"] for b in batches(data, 3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == list(range(10))


def test_head_growth_keeps_old_rows():
    head = IncrementalClassifier(4, 2)
    old_w, old_b = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    head.grow(5)
    assert head.num_classes == 5
    assert torch.equal(head.fc.weight[:2], old_w) and torch.equal(head.fc.bias[:2], old_b)
    assert head(torch.randn(3, 4)).shape == (3, 5)


def test_memory_quota_is_recomputed_and_old_classes_truncated():
    memory = ExemplarMemory(budget=12, selection="random")
    data = toy_dataset().train
    memory.update({k: v[:20] for k, v in data.items()})  # classes 0, 1: quota 6 each
    assert len(memory) == 12
    first_picks = memory.samples["audio"][memory.samples["label"] == 0].clone()
    memory.update({k: v[20:40] for k, v in data.items()})  # 4 classes: quota 3 each
    assert len(memory) == 12
    assert torch.bincount(memory.samples["label"]).tolist() == [3, 3, 3, 3]
    # old classes keep their earliest picks
    assert torch.equal(memory.samples["audio"][memory.samples["label"] == 0], first_picks[:3])


def test_herding_picks_samples_whose_mean_approaches_the_class_mean():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.1]])
    order = herding(features, 2)
    assert order[0].item() == 2  # closest to the mean direction
    assert len(set(order.tolist())) == 2


def test_unlimited_memory_keeps_everything():
    memory = ExemplarMemory(budget=None)
    memory.update(toy_dataset().train)
    assert len(memory) == 60


@pytest.mark.parametrize("modalities", [["audio"], ["video"], ["audio", "video"]])
@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_model_modalities_and_missing_modality_mask(modalities, fusion):
    cfg = OmegaConf.structured(ModelConfig(modalities=modalities, fusion=fusion, embed_dim=8, feature_dim=16))
    data = toy_dataset().train
    model = AVNet(cfg, data)
    model.head.grow(6)
    out = model({k: v[:4] for k, v in data.items()})
    assert out["logits"].shape == (4, 6) and out["features"].shape == (4, 16)
    assert set(modalities) <= set(out)
    if len(modalities) == 2:
        batch = {k: v[:4] for k, v in data.items()}
        batch["audio_mask"] = torch.tensor([True, False, True, False])
        pooled = model(batch)["audio"]
        assert torch.all(pooled[1] == 0) and torch.all(pooled[3] == 0)
