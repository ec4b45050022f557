"""Layer ``data``: datasets, feature stores and scenarios; imports ``core`` and ``media``.

Each dataset is registered with its options dataclass (the ``data`` config section) and a builder returning
an AVDataset; ``scenario`` splits one into tasks, ``store`` reads and writes the HDF5 feature stores."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

from avcl.core.errors import AvclError
from avcl.core.samples import Samples
from avcl.data import stream


@dataclass
class AVDataset:
    """A labelled audio-visual dataset resident in memory, before the class-incremental split."""
    name: str
    train: Samples
    val: Samples
    test: Samples
    class_names: list[str]
    info: dict = field(default_factory=dict)  # provenance: sources, shapes, preprocessing
    # clips kept out of the stream (e.g. held-out speakers), for the stage before it (config `init`)
    held_out: Samples = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class DatasetEntry:
    options: type  # dataclass of the dataset's config keys (the `data:` section)
    build: Callable  # (options, data_root: str | None, seed: int) -> AVDataset
    description: str


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, options: type, description: str):
    def wrap(build):
        DATASETS[name] = DatasetEntry(options, build, description)
        return build
    return wrap


def dataset_options(name: str) -> type:
    if name not in DATASETS:
        raise AvclError(f"unknown dataset '{name}' in 'data.name' (known: {', '.join(sorted(DATASETS))})")
    return DATASETS[name].options


def build_dataset(options, data_root: str | None, seed: int) -> AVDataset:
    """The dataset of the ``data`` section, resident or streamed as ``data.residency`` says (avcl.data.stream):
    a store-backed dataset decides while it is read; one built in memory is written to a temporary store
    and streamed only under ``data.residency=stream``."""
    dataset = DATASETS[options.name].build(options, data_root, seed)
    if "residency" in dataset.info:
        return dataset
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test, "held_out": dataset.held_out}
    nbytes = sum(value.nbytes for samples in splits.values() for value in samples.values() if hasattr(value, "nbytes"))
    if getattr(options, "residency", "memory") != "stream":
        dataset.info["residency"] = f"resident: built in memory ({nbytes / 2**30:.2f} GiB)"
        return dataset
    splits = stream.spill({name: samples for name, samples in splits.items() if samples}, options.cache_dir)
    dataset.train, dataset.val, dataset.test = (splits.get(name, {}) for name in ("train", "val", "test"))
    dataset.held_out = splits.get("held_out", {})
    dataset.info["residency"] = (f"streamed: data.residency=stream ({nbytes / 2**30:.2f} GiB written to a "
                                 f"temporary store in {options.cache_dir or 'the temporary directory'})")
    return dataset


def _import_all() -> None:
    """Dataset modules register themselves on import; import every module of this package."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_all()
