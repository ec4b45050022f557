"""``avcl probe RUN_DIR/<method> DATASET [key=value ...]``: linear evaluation of a pre-trained encoder.

The method's final model (``RUN_DIR/<method>/model.pt``, written by default for pre-training models, or a kept
``checkpoint.pt``; ``RUN_DIR/init``: the init stage's
``init/model.pt``, or the untrained model of an ``init.row`` run) is rebuilt from the run's config (the
variant's model overrides included), frozen, and its features of DATASET's train and test clips (all
classes) feed linear classifiers (``avcl.eval.probe.linear_probes``: video alone, audio alone, both; a model
without per-modality features gets the audio+video one only). DATASET is a dataset name (``avdigits``,
``synthetic``, ...) or a feature / raw store (``.h5``); ``key=value`` overrides (``data.*``, ``eval.linear_c``,
``eval.linear_classifier``, ``eval.probe_protocol``, ``eval.probe_svm_costs``, ``train.device``...) apply on top
of the run's config. ``eval.probe_protocol=official`` runs XKD's SVM protocol (augmented train views, C chosen on
a validation split of the train clips, test views averaged) instead of avcl's. Accuracy is top-1, or macro mAP
for multi-label labels. A line ``protocol avcl|official`` names the protocol; the last line is the numbers as
``name=value`` pairs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from avcl.config import build_config, method_hparams_for
from avcl.core.device import autocast_factory, pick_device
from avcl.core.errors import AvclError
from avcl.core.rng import seed_everything
from avcl.data import DATASETS, build_dataset
from avcl.eval.probe import OfficialProbe, linear_probes
from avcl.models import build_model


def load_probe_target(target: Path, dataset: str, items: list[str], data_root: str | None):
    """(config, model with the method's weights, AVDataset) for ``avcl probe``."""


    run_dir, name = target.parent, target.name
    config_path = run_dir / "config.yaml"
    if not target.is_dir() or not config_path.is_file():
        raise AvclError(f"{target}: not a method directory of a run (expected RUN_DIR/<method> with RUN_DIR/config.yaml)")
    raw = OmegaConf.to_container(OmegaConf.load(config_path))
    if dataset.endswith((".h5", ".hdf5")):
        raw["data"] = {"name": "features", "store": dataset}
    elif dataset in DATASETS:
        raw["data"] = {"name": dataset}
    else:
        raise AvclError(f"unknown dataset '{dataset}' (known: {', '.join(sorted(DATASETS))}; or a store path ending .h5)")
    cfg = build_config(raw, items)
    if name == "init":
        model_cfg = cfg.model
        weights = run_dir / "init" / "model.pt"
    elif name in cfg.methods or name in cfg.variants:
        model_cfg = method_hparams_for(cfg, name)[2]
        # the final weights (train.save_model), else a kept or partial run's checkpoint
        weights = next((p for p in (target / "model.pt", target / "checkpoint.pt") if p.is_file()),
                       target / "model.pt")
    else:
        raise AvclError(f"{target}: '{name}' is not a method of the run {run_dir} (its methods: {list(cfg.methods)})")
    data = build_dataset(cfg.data, data_root, cfg.seed)
    for split in ("train", "test"):
        rows = getattr(data, split)
        if "label" not in rows or len(rows["label"]) == 0:
            raise AvclError(f"dataset '{dataset}' has no labelled {split} clips: the linear probe needs labels")
    seed_everything(cfg.seed)  # an untrained init row is rebuilt exactly as the run built it
    model = build_model(model_cfg, data.train)
    if weights.is_file():
        state = torch.load(weights, map_location="cpu", weights_only=True)["model"]
        if not getattr(model, "label_free", False) and "head.fc.weight" in state:
            model.head.grow(state["head.fc.weight"].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
            raise AvclError(f"{weights}: does not match the model built for '{dataset}' (model {model_cfg.name}; "
                            f"another model, size or input shape?): {first}") from None
    elif not (name == "init" and cfg.init.row):
        raise AvclError(f"{weights} not found (nor checkpoint.pt): the method has not finished a task yet, or it "
                        "finished in a run with train.save_model=false and train.keep_checkpoints=false")
    return cfg, model, data


def _probe(args) -> int:

    cfg, model, data = load_probe_target(Path(args.target), args.dataset, list(args.items), args.data_root)
    device = pick_device(cfg.train.device)
    model.to(device).eval()
    ev = cfg.eval
    how = (f"{ev.linear_classifier} C={ev.linear_c}" if ev.probe_protocol == "avcl" else
           f"official (XKD's SVM): {ev.probe_train_views} train views, {ev.probe_test_clips} test views, "
           f"C among {list(ev.probe_svm_costs)} on {ev.probe_val_fraction:g} of the train clips")
    print(f"avcl probe: {args.target} on {args.dataset}: {len(data.train['label'])} train / "
          f"{len(data.test['label'])} test clips, {data.num_classes} classes, {how}", file=sys.stderr)
    results = linear_probes(model, data.train, data.test, ev.batch_size, device,
                            autocast_factory(device, cfg.train.precision), ev.linear_classifier, ev.linear_c, cfg.seed,
                            ev.probe_protocol, OfficialProbe.from_eval(ev))
    for key, value in results.items():
        name = key.removeprefix('probe_')
        if key.endswith(("_accuracy", "_map")) and value is not None:
            print(f"  {name:<18} {100 * value:.2f} %")
        else:
            print(f"  {name:<18} {value}")
    # the numbers only (the protocol is named on its own line above): scripts split this line on '='
    print(" ".join(f"{key}={_value(key, value)}" for key, value in results.items()
                   if key != "probe_protocol" and value is not None))
    return 0


def _value(key: str, value) -> str:
    if isinstance(value, float):  # a chosen C (1e-05) would read 0.0000 with 4 decimals
        return f"{value:g}" if key.endswith("_c") else f"{value:.4f}"
    return str(value)


def register(subparsers) -> None:
    parser = subparsers.add_parser("probe", help="linear evaluation of a pre-trained encoder on a labelled dataset")
    parser.add_argument("target", metavar="RUN_DIR/METHOD", help="a method directory of a run (or RUN_DIR/init)")
    parser.add_argument("dataset", metavar="DATASET", help="a dataset name (avcl list) or a store path (.h5)")
    parser.add_argument("items", nargs="*", metavar="key=value", help="overrides (data.*, eval.linear_c, ...)")
    parser.add_argument("--data-root", default=None, help="folder with the datasets (default: $AVCL_DATA_DIR)")
    parser.set_defaults(func=_probe)
