"""``key=value`` overrides of the command line, and ``key=@FILE`` (a YAML mapping, e.g. what `avcl tune` writes)."""
from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from avcl.core.errors import AvclError


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``key=value`` items, later ones winning; ``key=@FILE`` sets ``key`` to the YAML mapping in FILE
    (e.g. ``method_args.had=@tune/best.yaml``, what `avcl tune` writes)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise AvclError(f"bad override '{item}': expected key=value, e.g. train.epochs=3")
    out = OmegaConf.create()
    plain: list[str] = []  # runs of plain items are parsed together (one dotlist)
    try:
        for item in list(overrides) + [None]:
            if item is not None and not item.split("=", 1)[1].startswith("@"):
                plain.append(item)
                continue
            if plain:
                out = OmegaConf.merge(out, OmegaConf.from_dotlist(plain))
                plain = []
            if item is not None:
                key, value = item.split("=", 1)
                OmegaConf.update(out, key, override_file(item, Path(value[1:])), merge=True)
    except OmegaConfBaseException as err:
        raise AvclError(f"bad override: {err}") from None
    except yaml.YAMLError as err:  # a value that is not YAML, e.g. an unclosed {...}
        raise AvclError(f"bad override: a value is not valid YAML ({str(err).splitlines()[0]}): "
                        f"{' '.join(plain)}") from None
    return out


def override_file(item: str, path: Path) -> dict:
    """The YAML mapping a ``key=@FILE`` override names (AvclError naming the override otherwise)."""
    if not path.is_file():
        raise AvclError(f"bad override '{item}': {path} is a directory, not a YAML file" if path.is_dir()
                        else f"bad override '{item}': file {path} not found")
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AvclError(f"bad override '{item}': {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise AvclError(f"bad override '{item}': {path} must hold a mapping of keys to values, "
                        f"got {type(value).__name__}")
    return value
