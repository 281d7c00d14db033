"""Gradient flow and the central flow, integrated beside a real optimizer.

:class:`GradientFlow` and :class:`CentralFlow` model gradient descent,
:class:`RMSPropFlow` and :class:`RMSPropCentralFlow` model RMSProp; Σ comes from
:func:`solve_sdcp`. Everything here works on a
:class:`~lightning_eos.curvature.ProbeObjective` and a flat parameter vector, inside
or outside a training loop; the callback :class:`~lightning_eos.callbacks.FlowMonitor`
runs them beside a Lightning fit.

References:
    Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in deep
    learning with central flows. ICLR.
"""

from lightning_eos.flows._base import FlowRecord, third_order_pairs
from lightning_eos.flows.central_flow import CentralFlow
from lightning_eos.flows.complementarity import (
    ComplementarityError,
    ComplementaritySolution,
    solve_sdcp,
)
from lightning_eos.flows.gradient_flow import GradientFlow
from lightning_eos.flows.rmsprop import (
    PreconditionedHessian,
    RMSPropCentralFlow,
    RMSPropFlow,
)

__all__ = [
    "CentralFlow",
    "ComplementarityError",
    "ComplementaritySolution",
    "FlowRecord",
    "GradientFlow",
    "PreconditionedHessian",
    "RMSPropCentralFlow",
    "RMSPropFlow",
    "solve_sdcp",
    "third_order_pairs",
]
