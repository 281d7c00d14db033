"""Curvature of a loss: Hessian-vector products and eigensolvers, in plain PyTorch.

Nothing here imports Lightning: every class works on an ``nn.Module`` and a list of
batches, inside or outside a training loop.
"""

from lightning_eos.curvature.density import SpectralDensity, spectral_density
from lightning_eos.curvature.directional import (
    BlockDerivatives,
    block_derivatives,
    directional_derivatives,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import (
    DenseOperator,
    Eigenpairs,
    SymmetricOperator,
    lanczos,
)
from lightning_eos.curvature.normalization import (
    native_normalization_calls,
    plain_normalization,
)
from lightning_eos.curvature.objective import ProbeObjective, criterion_loss
from lightning_eos.curvature.preconditioned import (
    AdaptivePreconditioner,
    PreconditionedOperator,
    adaptive_preconditioner,
)
from lightning_eos.curvature.subspace import SharpnessGradient, sharpness_gradient
from lightning_eos.curvature.thresholds import StabilityThreshold, stability_threshold
from lightning_eos.curvature.trace import TraceEstimate, hutchinson, hutchpp

__all__ = [
    "AdaptivePreconditioner",
    "BlockDerivatives",
    "DenseOperator",
    "Eigenpairs",
    "HessianOperator",
    "PreconditionedOperator",
    "ProbeObjective",
    "SharpnessGradient",
    "SpectralDensity",
    "StabilityThreshold",
    "SymmetricOperator",
    "TraceEstimate",
    "adaptive_preconditioner",
    "block_derivatives",
    "criterion_loss",
    "directional_derivatives",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "native_normalization_calls",
    "plain_normalization",
    "sharpness_gradient",
    "spectral_density",
    "stability_threshold",
]
