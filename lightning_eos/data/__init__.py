"""Data modules for the reference Edge-of-Stability experiments."""

from lightning_eos.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
