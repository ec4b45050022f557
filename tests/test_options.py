"""Options that declare their own range or choices (avcl.core.options), read by one checker and by `avcl show`;
a method's memory as one value (MemoryUse)."""
import dataclasses
from typing import List, Optional

import pytest

from avcl.core.errors import AvclError
from avcl.core.options import check_section, describe, option


@dataclasses.dataclass
class Inner:
    ratio: float = option(0.5, range="[0,1)")


@dataclasses.dataclass
class Section:
    kind: str = option("a", choices=("a", "b"))
    kinds: List[str] = option(factory=lambda: ["a"], choices=("a", "b"))
    lr: float = option(0.1, range=">0")
    sizes: List[int] = option(factory=lambda: [1], range=">=1")
    count: int = 3  # no declared range: >= 0
    mean: float = option(0.0, range="any")
    limit: Optional[int] = option(None, range=">=1")
    inner: Inner = option(factory=Inner)


@pytest.mark.parametrize("values, message", [
    ({"kind": "c"}, "'s.kind' must be one of ['a', 'b'], got 'c'"),
    ({"kinds": ["a", "z"]}, "'s.kinds' must be one of ['a', 'b'] (each value), got ['a', 'z']"),
    ({"lr": 0.0}, "'s.lr' must be > 0, got 0.0"),
    ({"lr": float("nan")}, "'s.lr' must be > 0, got nan"),
    ({"sizes": [2, 0]}, "'s.sizes' must be >= 1 (each value), got [2, 0]"),
    ({"count": -1}, "'s.count' must be >= 0, got -1"),
    ({"mean": float("inf")}, "'s.mean' must be a finite number, got inf"),
    ({"limit": 0}, "'s.limit' must be >= 1, got 0"),
    ({"inner": {"ratio": 1.0}}, "'s.inner.ratio' must be in [0, 1), got 1.0"),
])
def test_each_rule_refuses_what_it_says_and_names_the_key(values, message):
    with pytest.raises(AvclError) as err:
        check_section(values, Section, "s")
    assert str(err.value) == f"bad config: {message}"


def test_values_within_their_rules_pass_and_none_is_never_checked():
    check_section({"kind": "b", "kinds": ["b", "a"], "lr": 2.0, "sizes": [1, 9], "count": 0, "mean": -3.5,
                   "limit": None, "inner": {"ratio": 0.0}}, Section, "s")
    check_section({"count": -1}, Section, "s", skip=("count",))  # a skipped field is its owner's to check


def test_describe_words_the_rule_for_show():
    fields = {f.name: f for f in dataclasses.fields(Section)}
    assert describe(fields["kind"]) == "one of a | b"
    assert describe(fields["lr"]) == "> 0" and describe(fields["count"]) == "" and describe(fields["mean"]) == ""


def test_a_bad_option_rule_is_refused_where_it_is_declared():
    with pytest.raises(ValueError, match="unknown range"):
        option(1, range=">1")


@pytest.mark.parametrize("override, message", [
    ("method_args.lwf.ce=old", "'method_args.lwf.ce' must be one of ['new', 'all'], got 'old'"),
    ("method_args.lwf.kd=local", "'method_args.lwf.kd' must be one of ['taskwise', 'global'], got 'local'"),
    ("method_args.had.ham_levels=[low,video]", "'method_args.had.ham_levels' must be one of ['low', 'snippet'] "
                                               "(each value), got ['low', 'video']"),
    ("method_args.avcil.class_norm=eq7", "'method_args.avcil.class_norm' must be one of ['official', 'paper']"),
    ("method_args.stella.store=frames", "'method_args.stella.store' must be one of ['clip', 'patches']"),
    ("method_args.stella.core_video_ratio=1.0", "'method_args.stella.core_video_ratio' must be in [0, 1), got 1.0"),
    ("method_args.xkd.rec_weight=0", "not all 0"),  # a constraint between fields: XKDHparams.check
])
def test_method_options_are_refused_when_the_config_is_loaded(override, message):
    from avcl.config import load_config
    extra = ["method_args.xkd.kd_weight=0", "method_args.xkd.da_weight=0"] if "xkd" in override else []
    with pytest.raises(AvclError) as err:
        load_config("synthetic", [override, *extra])
    assert message in str(err.value)


def test_show_prints_each_hyperparameters_rule(capsys):
    from avcl.cli import main
    assert main(["show", "synthetic", "methods=[lwf]"]) == 0
    lines = {line.split(" = ")[0].strip(" *"): line for line in capsys.readouterr().out.splitlines() if " = " in line}
    assert "[one of new | all]" in lines["method_args.lwf.ce"] and "[> 0]" in lines["method_args.lwf.temperature"]


def test_memory_use_is_one_value_and_exemplars_become_a_reservoir_on_label_free_models():
    from avcl.methods import METHODS
    from avcl.methods.base import MemoryUse
    er = METHODS["er"].memory_use
    assert er == MemoryUse("exemplars", "random", "separate")
    assert er.on(label_free=False) is er
    assert er.on(label_free=True) == MemoryUse("reservoir", "random", "step")
    assert METHODS["icarl"].memory_use.on(label_free=True).kind == "reservoir"
    assert METHODS["stella"].memory_use.on(label_free=True) == METHODS["stella"].memory_use  # declared as such
    assert METHODS["finetune"].memory_use.kind is None
    with pytest.raises(ValueError, match="MemoryUse"):
        MemoryUse("everything")
    with pytest.raises(dataclasses.FrozenInstanceError):
        er.kind = "all"
