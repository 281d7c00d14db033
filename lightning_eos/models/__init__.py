"""LightningModules of the reference Edge-of-Stability experiments."""

from lightning_eos.models.cnn import SmallCNN
from lightning_eos.models.mlp import MLP

__all__ = ["MLP", "SmallCNN"]
