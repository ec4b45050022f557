"""Classifier heads that grow when a task brings new classes: a linear one (old rows kept) and
PODNet's local similarity classifier (AFC; old proxies frozen)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class IncrementalClassifier(nn.Module):
    def __init__(self, in_features: int, num_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        with warnings.catch_warnings():  # a head with no classes yet is expected, not a problem
            warnings.simplefilter("ignore", UserWarning)
            self.fc = nn.Linear(in_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def grow(self, num_classes: int) -> None:
        """Resize to ``num_classes`` outputs: old rows copied, new rows freshly initialised."""
        if num_classes <= self.num_classes:
            return
        old = self.fc
        self.fc = nn.Linear(self.in_features, num_classes).to(old.weight.device)
        with torch.no_grad():
            self.fc.weight[:old.out_features] = old.weight
            self.fc.bias[:old.out_features] = old.bias

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class LSCClassifier(nn.Module):
    """PODNet's local similarity classifier (LSC), as AV-CIL's AFC baseline builds it
    (``model/layers.py``: ``LSCLinear`` / ``SplitLSCLinear``), with a ``grow`` like IncrementalClassifier's.

    K proxies per class. The similarity of a feature x to a proxy p is -‖x̂ - p̂‖² = 2 cos(x, p) - 2
    (the official ``stable_cosine_distance``, squared, negated); the score of class c is
    Σ_k softmax_k(s_ck) · s_ck over its K proxies. ``scale`` is the NCA loss's learnable factor
    (used by the loss, not applied to the scores).

    ``grow`` freezes the proxies of the classes so far (kept in a buffer: no gradient, never
    optimised, the official fc1 at lr 0) and adds trainable proxies for the new classes, drawn
    like the official ``kaiming_normal_(nonlinearity="linear")`` (std 1/√D); the scale restarts at
    ``scale_init`` (the official code builds a new ``SplitLSCLinear``, with a fresh factor of 1, at
    every step). ``imprint`` replaces the new proxies (AFC's k-means imprinting).

    State dict: all proxies as one ``fc.weight`` (C, K, D) tensor, and ``scale``. ``fc.weight``
    is the key the runner reads to size a head before loading a checkpoint; a loaded head's
    proxies are split at its current frozen/trainable boundary (``grow`` freezes them all next).
    """

    def __init__(self, in_features: int, proxies_per_class: int = 10, scale_init: float = 1.0,
                 learn_scale: bool = True):
        super().__init__()
        self.in_features, self.proxies_per_class, self.scale_init = in_features, proxies_per_class, scale_init
        self.register_buffer("frozen", torch.empty(0, proxies_per_class, in_features), persistent=False)
        self.proxies = nn.Parameter(torch.empty(0, proxies_per_class, in_features))
        self.scale = nn.Parameter(torch.tensor(float(scale_init)), requires_grad=learn_scale)

    @property
    def num_classes(self) -> int:
        return len(self.frozen) + len(self.proxies)

    @property
    def weight(self) -> torch.Tensor:
        """All proxies, (classes, K, D): frozen ones first."""
        return torch.cat([self.frozen, self.proxies])

    def grow(self, num_classes: int) -> None:
        """Freeze every current proxy; add trainable proxies for classes up to ``num_classes``."""
        if num_classes <= self.num_classes:
            return
        new = torch.randn(num_classes - self.num_classes, self.proxies_per_class, self.in_features,
                          device=self.proxies.device) / self.in_features ** 0.5
        with torch.no_grad():
            self.frozen = self.weight.detach()
            self.scale.fill_(self.scale_init)
        self.proxies = nn.Parameter(new)

    @torch.no_grad()
    def imprint(self, centres: torch.Tensor) -> None:
        """New proxies := ``centres`` (new classes, K, D) x the mean norm of the frozen proxies."""
        norm = self.frozen.norm(dim=-1).mean() if len(self.frozen) else 1.0
        self.proxies.copy_(centres * norm)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):  # cosines in float32
            x = F.normalize(features.float(), dim=-1)
            similarity = 2 * torch.einsum("bd,ckd->bck", x, F.normalize(self.weight.float(), dim=-1)) - 2
            return (similarity.softmax(dim=-1) * similarity).sum(dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "fc.weight"] = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "scale"] = self.scale if keep_vars else self.scale.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {prefix + "fc.weight", prefix + "scale"}
        missing_keys.extend(sorted(k for k in keys if k not in state_dict))
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in keys)
        if any(k not in state_dict for k in keys):
            return
        weight = state_dict[prefix + "fc.weight"]
        if tuple(weight.shape) != tuple(self.weight.shape):
            error_msgs.append(f"size mismatch for {prefix}fc.weight: checkpoint {tuple(weight.shape)}, "
                              f"head {tuple(self.weight.shape)} (grow the head to the checkpoint's classes first)")
            return
        with torch.no_grad():
            self.frozen.copy_(weight[:len(self.frozen)])
            self.proxies.copy_(weight[len(self.frozen):])
            self.scale.copy_(state_dict[prefix + "scale"])
