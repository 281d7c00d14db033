"""Lightning callbacks that measure curvature during ``Trainer.fit``."""

from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.callbacks.optimizer_stats import OptimizerStatsLogger
from lightning_eos.callbacks.sharpness import SharpnessMonitor, SharpnessRecord

__all__ = [
    "CurvatureCallback",
    "OptimizerStatsLogger",
    "SharpnessMonitor",
    "SharpnessRecord",
]
