"""Curvature of a loss: Hessian-vector products and eigensolvers, in plain PyTorch.

Nothing here imports Lightning: every class works on an ``nn.Module`` and a list of
batches, inside or outside a training loop.
"""

from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import (
    DenseOperator,
    Eigenpairs,
    SymmetricOperator,
    lanczos,
)
from lightning_eos.curvature.objective import ProbeObjective, criterion_loss

__all__ = [
    "DenseOperator",
    "Eigenpairs",
    "HessianOperator",
    "ProbeObjective",
    "SymmetricOperator",
    "criterion_loss",
    "lanczos",
]
