"""What is measured after every task: the one pluggable part of a run (``eval.protocol``).

The runner trains every method the same way; a protocol evaluates the model after each task,
keeps what it measured in the run record (checkpointed with the method), turns the record into
the metrics of ``<method>/metrics.json``, and says how the report's table shows them.

* ``accuracy``: class-incremental recognition. Accuracy on the test data of every task seen so
  far, no task id (the accuracy matrix), plus the method's other heads (``extra_heads``); from
  the same predictions, the task-aware accuracy (``taw_accuracy_matrix``: each clip classified
  among its own task's classes, FACIL's TAw; the task-incremental setting).
* ``retrieval``: representation learning. Zero-shot audio<->video retrieval on a fixed retrieval
  set (``eval.retrieval_per_class`` test clips of every class, all tasks, learned or not), R@k and
  median rank per task in both directions (the retrieval matrices), then a linear probe of the
  frozen encoder on the labelled train/test data of every task (``eval.probe``).
* ``probe``: XKD's linear protocol (its ``codes/eval/``): linear classifiers (scikit-learn, ``eval.linear_*``) on the
  frozen video features, audio features and both, trained on the train data of every task and tested on
  their test data, after the last task (``eval.probe=every_task``: after every task too). ``eval.probe_protocol``:
  avcl's (standardised features, ``eval.linear_classifier``) or the official one (XKD's SVM protocol: augmented
  train views, C chosen on validation, test views averaged; ``avcl.eval.probe.linear_probes``); metrics.json's
  ``probe_protocol`` says which.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from omegaconf import DictConfig

from avcl.core.errors import AvclError
from avcl.core.samples import concat, select
from avcl.eval.evaluator import accuracies_tag_taw, accuracy_per_task
from avcl.eval.metrics import summarize
from avcl.eval.probe import OfficialProbe, embed_all, linear_probe, linear_probes
from avcl.eval.retrieval import DIRECTIONS, retrieval_scores, summarize_retrieval


PROTOCOLS: dict[str, type] = {}


def register_protocol(cls):
    PROTOCOLS[cls.name] = cls
    return cls


def protocol_class(name: str) -> type:
    if name not in PROTOCOLS:
        raise AvclError(f"bad config: 'eval.protocol' must be one of {sorted(PROTOCOLS)}, got '{name}'")
    return PROTOCOLS[name]


def make_protocol(cfg: DictConfig, scenario, device, autocast) -> "Protocol":
    return protocol_class(cfg.eval.protocol)(cfg, scenario, device, autocast)


def method_metrics(name: str, record: dict, protocol: "Protocol", scenario, trained_tasks: int,
                   complete: bool) -> dict:
    """The content of ``<method>/metrics.json``: the protocol's metrics plus time and memory."""
    return {"method": name, "complete": complete, "tasks_done": len(record["task_seconds"]),
            "num_tasks": trained_tasks, "protocol": protocol.name,
            **protocol.metrics(record),
            "train_seconds": record["train_seconds"], "task_seconds": record["task_seconds"],
            "peak_memory_mib": record["peak_memory_mib"], "class_order": scenario.class_order,
            **({"diverged": record["diverged"]} if "diverged" in record else {})}


class Protocol(ABC):
    name = "base"
    # (metrics key, column title, format) of the report's table, after the method's name
    columns: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, cfg: DictConfig, scenario, device, autocast: Callable):
        self.cfg, self.scenario, self.device, self.autocast = cfg, scenario, device, autocast

    @staticmethod
    def check(cfg: DictConfig, scenario) -> None:
        """Refuse a config this protocol cannot evaluate on this data, before anything is written (AvclError);
        the config's own values are checked by ``avcl.config.validate``."""

    @abstractmethod
    def new_record(self) -> dict:
        """The empty record of one method."""

    @abstractmethod
    def after_task(self, method, seen_tasks: list, record: dict) -> str:
        """Evaluate after a task; append to ``record``; return a short summary for the progress line."""

    def finish(self, method, record: dict) -> None:
        """After the last task (e.g. the linear probe)."""

    @abstractmethod
    def metrics(self, record: dict) -> dict:
        """The summary of ``record`` that goes into metrics.json."""


@register_protocol
class Accuracy(Protocol):
    name = "accuracy"
    columns = (("average_incremental_accuracy", "avg inc acc", ".4f"), ("last_accuracy", "last acc", ".4f"),
               ("forgetting", "forgetting", ".4f"), ("bwt", "BWT", ".4f"),
               ("taw_last_accuracy", "TAw last acc", ".4f"))

    def new_record(self) -> dict:
        return {"matrix": [], "step": [], "taw_matrix": [], "taw_step": [], "val": [], "heads": {}}

    def _evaluate(self, predict, seen, split="test"):
        return accuracy_per_task(predict, seen, split, self.cfg.eval.batch_size, self.device, self.autocast)

    def _record_both(self, predict, seen, r) -> float:
        """Append the TAg and TAw rows of one head to its record ``r``; returns the TAg pooled accuracy."""
        both = accuracies_tag_taw(predict, seen, "test", self.cfg.eval.batch_size, self.device, self.autocast)
        r["matrix"].append(both["tag"][0])
        r["step"].append(both["tag"][1])
        if "taw_matrix" not in r:  # a record checkpointed before TAw existed: its earlier rows are unknown
            r["taw_matrix"] = r["taw_step"] = None
        if r["taw_matrix"] is not None:
            r["taw_matrix"].append(both["taw"][0])
            r["taw_step"].append(both["taw"][1])
        return both["tag"][1]

    def after_task(self, method, seen_tasks, record):
        overall = self._record_both(method.predict, seen_tasks, record)
        record["val"].append(self._evaluate(method.predict, seen_tasks, "val")[1]
                             if len(seen_tasks[0].val["label"]) else None)
        for head, predict in method.extra_heads().items():
            fresh = {"matrix": [], "step": [], "taw_matrix": [], "taw_step": []}
            self._record_both(predict, seen_tasks, record["heads"].setdefault(head, fresh))
        return f"accuracy {overall:.4f}"

    @staticmethod
    def _summary(r, forgetting) -> dict:
        """The metrics of one head: the class-incremental ones, then the task-aware (``taw_``) ones."""
        out = {"accuracy_matrix": r["matrix"], "step_accuracy": r["step"],
               **summarize(r["matrix"], r["step"], forgetting)}
        if r.get("taw_matrix"):
            taw = summarize(r["taw_matrix"], r["taw_step"], forgetting)
            out.update({"taw_accuracy_matrix": r["taw_matrix"], "taw_step_accuracy": r["taw_step"],
                        **{f"taw_{key}": value for key, value in taw.items() if key != "forgetting_variant"}})
        return out

    def metrics(self, record):
        forgetting = self.cfg.eval.forgetting
        heads = {head: self._summary(r, forgetting) for head, r in record["heads"].items()}
        return {**self._summary(record, forgetting), "val_accuracy": record["val"], "heads": heads}


def retrieval_set(scenario, per_class: int) -> tuple[dict, list[torch.Tensor]]:
    """The first ``per_class`` test clips of every class (all tasks), and each task's query mask."""
    test = concat([task.test for task in scenario.tasks])
    labels = test["label"]
    rows = []
    for task in scenario.tasks:
        for c in task.classes:
            where = (labels == c).nonzero().squeeze(1)
            if len(where) < per_class:
                raise AvclError(f"retrieval set: class '{scenario.class_names[c]}' has {len(where)} test clip(s), "
                                f"fewer than eval.retrieval_per_class={per_class}")
            rows.append(where[:per_class])
    picked = select(test, torch.cat(rows))
    groups = [(picked["label"] >= t.classes[0]) & (picked["label"] <= t.classes[-1]) for t in scenario.tasks]
    return picked, groups


@register_protocol
class Retrieval(Protocol):
    name = "retrieval"
    columns = tuple((key, title, "%") for key, title in (
        ("a2v_R@1", "A→V R@1"), ("a2v_R@5", "A→V R@5"), ("a2v_R@10", "A→V R@10"), ("a2v_average", "A→V avg"),
        ("a2v_forgetting", "A→V fgt"), ("a2v_forgetting_textbook", "A→V fgt (tb)"),
        ("v2a_R@1", "V→A R@1"), ("v2a_R@5", "V→A R@5"), ("v2a_R@10", "V→A R@10"), ("v2a_average", "V→A avg"),
        ("v2a_forgetting", "V→A fgt"), ("v2a_forgetting_textbook", "V→A fgt (tb)"),
        ("probe_accuracy", "probe acc"))) + (("peak_memory_mib", "peak mem", ".0f MiB"),)

    def __init__(self, cfg, scenario, device, autocast):
        super().__init__(cfg, scenario, device, autocast)
        self.recall_at = sorted(int(k) for k in cfg.eval.recall_at)
        self.retrieval, self.groups = retrieval_set(scenario, cfg.eval.retrieval_per_class)

    @staticmethod
    def check(cfg, scenario):
        if cfg.eval.probe_protocol != "avcl" and cfg.eval.probe != "none":
            raise AvclError("eval.probe_protocol=official is XKD's SVM protocol, for eval.protocol=probe and `avcl "
                            "probe`; the retrieval protocol's probe is STELLA's trained head (eval.probe_*): "
                            "set eval.probe_protocol=avcl (or eval.probe=none)")
        recall_at = [int(k) for k in cfg.eval.recall_at]  # their values: avcl.config.validate
        retrieval, _ = retrieval_set(scenario, cfg.eval.retrieval_per_class)
        size = len(retrieval["label"])
        if max(recall_at) > size:
            raise AvclError(f"retrieval set has {size} clips, fewer than k={max(recall_at)} of eval.recall_at "
                            "(raise eval.retrieval_per_class or lower eval.recall_at)")

    def new_record(self) -> dict:
        return {"retrieval": {d: {**{f"R@{k}": [] for k in self.recall_at}, "median_rank": []}
                              for d in DIRECTIONS},
                "probe_per_task": []}

    def similarity(self, model) -> torch.Tensor:
        """(N, N) cosine similarity of the retrieval set's audio (rows) and video (columns) embeddings."""
        model.eval()

        def pair(batch):  # a model whose modalities live in separate spaces names its shared one "cross_*" (XKD)
            out = model.embed(batch)
            return torch.stack([out.get("cross_audio", out["audio"]), out.get("cross_video", out["video"])], dim=1)
        embedded = embed_all(pair, self.retrieval, self.cfg.eval.batch_size, self.device, self.autocast)
        return (embedded[:, 0] @ embedded[:, 1].T).cpu()

    def after_task(self, method, seen_tasks, record):
        scores = retrieval_scores(self.similarity(method.model), self.groups, self.recall_at)
        for direction, by_metric in scores.items():
            for metric, row in by_metric.items():
                record["retrieval"][direction][metric].append(row)
        if self.cfg.eval.probe == "every_task":
            record["probe_per_task"].append(self.probe(method.model))
        k = self.recall_at[-1]
        mean = lambda row: sum(row) / len(row)  # noqa: E731
        return (f"A→V R@{k} {100 * mean(scores['a2v'][f'R@{k}']):.1f}%, "
                f"V→A R@{k} {100 * mean(scores['v2a'][f'R@{k}']):.1f}%")

    def probe(self, model) -> float:
        model.eval()
        tasks = self.scenario.tasks
        embed = lambda batch: model.embed(batch)["joint"]  # noqa: E731
        ev = self.cfg.eval
        features = {split: embed_all(embed, concat([getattr(t, split) for t in tasks]), ev.batch_size,
                                     self.device, self.autocast) for split in ("train", "test")}
        labels = {split: concat([getattr(t, split) for t in tasks])["label"] for split in ("train", "test")}
        return linear_probe(features["train"], labels["train"], features["test"], labels["test"],
                            self.scenario.num_classes, ev.probe_epochs, ev.probe_warmup_epochs, ev.probe_lr,
                            ev.probe_weight_decay, ev.probe_batch_size, self.cfg.seed)

    def finish(self, method, record):
        if self.cfg.eval.probe == "end":
            record["probe_accuracy"] = self.probe(method.model)
        elif self.cfg.eval.probe == "every_task":
            record["probe_accuracy"] = record["probe_per_task"][-1]

    def metrics(self, record):
        return {"retrieval_matrices": record["retrieval"],
                **summarize_retrieval(record["retrieval"], self.recall_at),
                "probe_accuracy": record.get("probe_accuracy"), "probe_protocol": self.cfg.eval.probe_protocol,
                "probe_per_task": record["probe_per_task"] or None}


@register_protocol
class Probe(Protocol):
    name = "probe"
    columns = (("probe_video_accuracy", "video probe", "%"), ("probe_audio_accuracy", "audio probe", "%"),
               ("probe_av_accuracy", "A+V probe", "%"), ("peak_memory_mib", "peak mem", ".0f MiB"))

    def new_record(self) -> dict:
        return {"probes": None, "probe_per_task": []}

    def probes(self, model) -> dict:
        tasks, ev = self.scenario.tasks, self.cfg.eval
        train, test = (concat([getattr(t, split) for t in tasks]) for split in ("train", "test"))
        return linear_probes(model, train, test, ev.batch_size, self.device, self.autocast,
                             ev.linear_classifier, ev.linear_c, self.cfg.seed, ev.probe_protocol,
                             OfficialProbe.from_eval(ev))

    @staticmethod
    def _summary(probes: dict) -> str:
        return ", ".join(f"{key.removeprefix('probe_')} {100 * value:.1f}%" for key, value in probes.items()
                         if key.endswith(("_accuracy", "_map")) and "_val_" not in key)

    def after_task(self, method, seen_tasks, record):
        if self.cfg.eval.probe != "every_task":
            return "trained"
        record["probe_per_task"].append(self.probes(method.model))
        return self._summary(record["probe_per_task"][-1])

    def finish(self, method, record):
        if self.cfg.eval.probe == "every_task":
            record["probes"] = record["probe_per_task"][-1]
        elif self.cfg.eval.probe == "end":
            record["probes"] = self.probes(method.model)

    def metrics(self, record):
        # the protocol is named even when no probe ran (eval.probe=none), so a table can say which it would be
        return {"probe_protocol": self.cfg.eval.probe_protocol, **(record["probes"] or {}),
                "probe_per_task": record["probe_per_task"] or None}
