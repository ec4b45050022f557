"""A linear classifier that grows when a task brings new classes; old rows are kept."""
from __future__ import annotations

import warnings

import torch
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
