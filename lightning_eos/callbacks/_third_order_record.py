"""The record of one ThirdOrderMonitor measurement and the scalars it logs."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from lightning_eos.curvature.directional import BlockDerivatives


@dataclass
class ThirdOrderRecord:
    """One measurement of :class:`~lightning_eos.callbacks.ThirdOrderMonitor`.

    NaN where a quantity is undefined (no reference point yet, α ≤ 0 for δ, or a
    diverged run).

    Attributes:
        step: The optimizer step.
        sharpness: λ₁.
        threshold: The stability threshold, or ``None``.
        grad_sharpness_norm: ‖∇S‖.
        cosine: cos(∇S, ∇L).
        t111: T[u₁, u₁, u₁].
        gradient_component: ∇S · ∇L / ‖∇L‖.
        eigenspace_norm: ‖UUᵀ∇S‖, the part in the top-k eigenspace.
        complement_norm: ‖(I − UUᵀ)∇S‖.
        alpha: −∇L · ∇S⊥.
        beta: ‖∇S⊥‖².
        delta: √(2α/β) when α > 0.
        x: u₁* · (θ − θ*).
        y: ∇S⊥* · (θ − θ*).
        tensor: T[u_a, u_b, u_c] when requested.
        blocks: The block-structured derivatives, when measured.
    """

    step: int
    sharpness: float
    threshold: float | None
    grad_sharpness_norm: float
    cosine: float
    t111: float
    gradient_component: float
    eigenspace_norm: float
    complement_norm: float
    alpha: float
    beta: float
    delta: float
    x: float
    y: float
    tensor: Tensor | None
    blocks: BlockDerivatives | None


def nan_record(
    step: int, sharpness: float, threshold: float | None
) -> ThirdOrderRecord:
    """The record of a measurement whose products were not finite."""
    nan = math.nan
    return ThirdOrderRecord(
        step, sharpness, threshold, nan, nan, nan, nan, nan, nan, nan, nan, nan,
        nan, nan, None, None,
    )  # fmt: skip


def record_metrics(record: ThirdOrderRecord) -> dict[str, float]:
    """The scalars logged for a record (see ThirdOrderMonitor for the tags)."""
    metrics = {
        "third_order/grad_sharpness_norm": record.grad_sharpness_norm,
        "third_order/cosine": record.cosine,
        "third_order/T111": record.t111,
        "third_order/gradient_component": record.gradient_component,
        "third_order/eigenspace_norm": record.eigenspace_norm,
        "third_order/complement_norm": record.complement_norm,
        "selfstab/alpha": record.alpha,
        "selfstab/beta": record.beta,
    }
    if not math.isnan(record.delta):
        metrics["selfstab/delta"] = record.delta
    if not math.isnan(record.x):
        metrics["selfstab/x"], metrics["selfstab/y"] = record.x, record.y
    if record.threshold is not None:
        metrics["selfstab/sharpness_gap"] = record.sharpness - record.threshold
    if record.tensor is not None:
        k = record.tensor.shape[0]
        for a in range(k):
            for b in range(a, k):
                for c in range(b, k):
                    tag = f"third_order/T_{a + 1}{b + 1}{c + 1}"
                    metrics[tag] = float(record.tensor[a, b, c])
    blocks = record.blocks
    if blocks is not None:
        for index, group in enumerate(blocks.names):
            metrics[f"block/{group}/gradient"] = float(blocks.gradient[index])
            metrics[f"block/{group}/curvature"] = float(blocks.hessian[index, index])
            third = blocks.third_order
            if third is not None:
                value = third[index] if third.dim() == 1 else third[(index,) * 3]
                metrics[f"block/{group}/third"] = float(value)
    return metrics
