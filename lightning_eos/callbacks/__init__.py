"""Lightning callbacks that measure curvature during ``Trainer.fit``."""

from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.callbacks.density import DensityRecord, SpectralDensityMonitor
from lightning_eos.callbacks.flows import FlowMonitor, FlowMonitorRecord
from lightning_eos.callbacks.minibatch import (
    MinibatchRecord,
    MinibatchSharpnessMonitor,
)
from lightning_eos.callbacks.optimizer_stats import OptimizerStatsLogger
from lightning_eos.callbacks.preconditioned import (
    PreconditionedRecord,
    PreconditionedSharpnessMonitor,
)
from lightning_eos.callbacks.progress import StepProgressBar
from lightning_eos.callbacks.sharpness import SharpnessMonitor, SharpnessRecord
from lightning_eos.callbacks.third_order import ThirdOrderMonitor, ThirdOrderRecord
from lightning_eos.callbacks.trace import HessianTraceMonitor, TraceRecord

__all__ = [
    "CurvatureCallback",
    "DensityRecord",
    "FlowMonitor",
    "FlowMonitorRecord",
    "HessianTraceMonitor",
    "MinibatchRecord",
    "MinibatchSharpnessMonitor",
    "OptimizerStatsLogger",
    "PreconditionedRecord",
    "PreconditionedSharpnessMonitor",
    "SharpnessMonitor",
    "SharpnessRecord",
    "SpectralDensityMonitor",
    "StepProgressBar",
    "ThirdOrderMonitor",
    "ThirdOrderRecord",
    "TraceRecord",
]
