"""Small Lightning modules for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def regression_data(n: int = 64, dtype: torch.dtype = torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, 6, generator=generator, dtype=dtype)
    targets = torch.sin(inputs @ torch.randn(6, 2, generator=generator, dtype=dtype))
    return TensorDataset(inputs, targets)


class Regressor(pl.LightningModule):
    """A module written without the package in mind: it knows nothing of probes."""

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = 0.0,
        batch_norm: bool = False,
        dropout: float = 0.0,
        width: int = 8,
        dtype: torch.dtype = torch.float64,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, width)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers).to(dtype)
        self.lr, self.momentum, self.optimizer_name = lr, momentum, optimizer
        self.losses: list[float] = []

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        loss = half_squared_error(self(batch[0]), batch[1])
        self.losses.append(loss.item())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


class RegressorWithCurvatureLoss(Regressor):
    def curvature_loss(self, batch):
        return half_squared_error(self(batch[0]), batch[1])


def loader(dataset, batch_size: int | None = None, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size or len(dataset), shuffle=shuffle)


def trainer(tmp_path, callbacks, max_steps: int, **kwargs) -> pl.Trainer:
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
    return pl.Trainer(callbacks=callbacks, **options)
