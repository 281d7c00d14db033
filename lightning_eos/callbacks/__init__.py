"""Lightning callbacks that measure curvature during ``Trainer.fit``."""

from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.callbacks.flows import FlowMonitor, FlowMonitorRecord
from lightning_eos.callbacks.sharpness import SharpnessMonitor, SharpnessRecord

__all__ = [
    "CurvatureCallback",
    "FlowMonitor",
    "FlowMonitorRecord",
    "SharpnessMonitor",
    "SharpnessRecord",
]
