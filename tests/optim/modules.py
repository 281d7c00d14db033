"""Small Lightning modules that record what the closure optimizers do to them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.optim import backward_with_graph


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def regression_data(n: int = 32, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    targets = torch.sin(
        inputs @ torch.randn(4, 2, generator=generator, dtype=torch.float64)
    )
    return TensorDataset(inputs, targets)


def network(batch_norm: bool = False, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(6, 2))
    return nn.Sequential(*layers).double()


class Recorder(pl.LightningModule):
    """Counts ``training_step`` calls and records the random draws of each."""

    def __init__(
        self,
        make_optimizer: Callable[[Any], Any],
        batch_norm: bool = False,
        dropout: float = 0.0,
        scheduler: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = network(batch_norm, dropout)
        self.make_optimizer = make_optimizer
        self.make_scheduler = scheduler
        self.calls = 0
        self.draws: list[float] = []

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.calls += 1
        self.draws.append(float(torch.rand(())))
        loss = half_squared_error(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.parameters())
        if self.make_scheduler is None:
            return optimizer
        return [optimizer], [
            {"scheduler": self.make_scheduler(optimizer), "interval": "step"}
        ]


class GraphRecorder(Recorder):
    """The same module with the one-line backward override."""

    backward = backward_with_graph


def loader(n: int = 32) -> DataLoader:
    return DataLoader(regression_data(n), batch_size=n)


def trainer(tmp_path, max_steps: int, **kwargs: Any) -> pl.Trainer:
    options = {
        "default_root_dir": tmp_path,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        "devices": 1,
        **kwargs,
    }
    return pl.Trainer(**options)
