"""Every classification method runs a tiny synthetic scenario in seconds, and learns
(the self-supervised ones have their own tests: test_ssl_baselines.py, test_stella.py, test_pretrain.py)."""
import pytest
from omegaconf import OmegaConf

from avcl.config import load_config
from avcl.engine.runner import execute
from avcl.methods import METHODS
from conftest import TINY

from avcl.methods.replay_ssl import LabelFreeMethod

ALL = sorted(name for name, cls in METHODS.items()  # the others: own tests
             if cls.requires_model is None and not issubclass(cls, LabelFreeMethod) and not cls.single_task)
CHANCE_FIRST_TASK = 0.5  # 2 classes in the first task


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    cfg = load_config("synthetic", TINY + [f"methods=[{','.join(ALL)}]"])
    return execute(cfg, tmp_path_factory.mktemp("methods"), show_progress=False)


@pytest.mark.parametrize("name", ALL)
def test_method_learns_each_task(results, name):
    m = results[name]
    matrix = m["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3]
    assert matrix[0][0] >= 0.8, f"{name} did not learn the first task: {matrix}"
    # The newest task is learned too, predicting over all 6 classes (chance 1/6); EWC's penalty
    # and SS-IL's separated softmax slow this down, hence the modest bar.
    assert matrix[-1][-1] >= 0.35, f"{name} did not learn the last task: {matrix}"
    assert m["last_accuracy"] > 1 / 6 + 0.1, f"{name} is at chance after the last task: {m}"


@pytest.mark.parametrize("name", ["joint", "icarl", "er", "ssil", "lwf"])
def test_memory_or_distillation_beats_finetune(results, name):
    assert results[name]["average_incremental_accuracy"] > results["finetune"]["average_incremental_accuracy"]


def test_finetune_forgets_and_joint_does_not(results):
    assert results["finetune"]["forgetting"] > 0.5
    assert results["joint"]["forgetting"] < 0.2


def test_icarl_reports_both_heads(results):
    heads = results["icarl"]["heads"]
    assert set(heads) == {"fc"} and len(heads["fc"]["accuracy_matrix"]) == 3


def test_audio_visual_beats_each_modality_on_synthetic(tmp_path):
    """The synthetic generator's promise: learnable from audio, from video, better from both."""
    last = {}
    for modalities in ("[audio,video]", "[audio]", "[video]"):
        cfg = load_config("synthetic", ["methods=[joint]", "scenario.num_tasks=1", f"model.modalities={modalities}"])
        out = tmp_path / modalities.strip("[]").replace(",", "_")
        last[modalities] = execute(cfg, out, show_progress=False)["joint"]["last_accuracy"]
    assert last["[audio]"] > 0.4 and last["[video]"] > 0.4, last  # chance is 0.1
    assert last["[audio,video]"] > max(last["[audio]"], last["[video]"]), last


def test_hyperparameters_come_from_config():
    cfg = load_config("synthetic", ["method_args.lwf.temperature=3.5", "method_args.icarl.classifier=fc"])
    assert cfg.method_args.lwf.temperature == 3.5
    assert OmegaConf.select(cfg, "method_args.icarl.classifier") == "fc"


def test_ewc_penalty_grows_with_distance_from_the_anchor():
    import torch

    from avcl.engine.runner import build_method, make_scenario
    from avcl.engine.trainer import Trainer
    from avcl.core.device import autocast_factory

    cfg = load_config("synthetic", TINY + ["methods=[ewc]", "train.epochs=2"])
    scenario = make_scenario(cfg)
    method = build_method("ewc", cfg, scenario.tasks[0].train)
    trainer = Trainer(cfg.train, torch.device("cpu"), autocast_factory(torch.device("cpu"), False))
    trainer.fit_task(method, scenario.tasks[0])
    assert method.fisher and all((f >= 0).all() for f in method.fisher.values())
    assert sum(float(f.sum()) for f in method.fisher.values()) > 0
    method.before_task(scenario.tasks[1])  # the head grows: the penalty covers the old rows only
    batch = {k: v[:8] for k, v in scenario.tasks[1].train.items()}
    with torch.no_grad():
        base = float(method.training_loss(batch))
        for p in method.model.parameters():
            p.add_(0.05)
        assert float(method.training_loss(batch)) > base
