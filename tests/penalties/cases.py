"""Tiny models for exact penalty tests: dense float64 third derivatives stay cheap."""

from __future__ import annotations

import torch
from torch import nn

from tests.curvature.cases import Case, half_squared_error


def make_case(name: str) -> Case:
    """26 to 48 parameters, a dozen examples, in uneven chunks."""
    generator = torch.Generator().manual_seed(4321)
    torch.manual_seed(4321)
    if name in ("mlp", "batchnorm", "layernorm"):
        norm = {"batchnorm": [nn.BatchNorm1d(4)], "layernorm": [nn.LayerNorm(4)]}
        norm = norm.get(name, [])
        model = nn.Sequential(nn.Linear(3, 4), *norm, nn.Tanh(), nn.Linear(4, 2))
        inputs = torch.randn(12, 3, dtype=torch.float64, generator=generator)
        targets = torch.randn(12, 2, dtype=torch.float64, generator=generator)
        return Case(name, model.double(), inputs, targets, half_squared_error, 5)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 2)
        ).double()
        inputs = torch.randn(10, 1, 4, 4, dtype=torch.float64, generator=generator)
        labels = torch.randint(0, 2, (10,), generator=generator)
        return Case(name, model, inputs, labels, nn.CrossEntropyLoss(), 4)
    raise KeyError(name)
