"""Explicit penalties standing in for the implicit bias of large-step gradient descent.

Each penalty evaluates its value and its exact gradient on a
:class:`~lightning_eos.curvature.ProbeObjective`; :class:`PenaltyCallback` adds the
gradient to the training gradient of any LightningModule before each optimizer step.
"""

from lightning_eos.penalties._base import Penalty, PenaltyResult
from lightning_eos.penalties._terms import CurvatureTerm, GradientNormTerm, PenaltyTerm
from lightning_eos.penalties.callback import PenaltyCallback, PenaltyRecord
from lightning_eos.penalties.central_flow import CentralFlowPenalty
from lightning_eos.penalties.gradient_norm import (
    GradientNormPenalty,
    MinibatchGradientNormPenalty,
)
from lightning_eos.penalties.sharpness import SharpnessPenalty
from lightning_eos.penalties.trace import TracePenalty

__all__ = [
    "CentralFlowPenalty",
    "CurvatureTerm",
    "GradientNormPenalty",
    "GradientNormTerm",
    "MinibatchGradientNormPenalty",
    "Penalty",
    "PenaltyCallback",
    "PenaltyRecord",
    "PenaltyResult",
    "PenaltyTerm",
    "SharpnessPenalty",
    "TracePenalty",
]
