r"""Stochastic estimates of the trace of a symmetric operator, with standard errors.

Hutchinson's estimator averages :math:`z^\top H z` over random vectors with
:math:`\mathbb{E}[zz^\top] = I`; it is unbiased, and exact for a diagonal
:math:`H` when :math:`z` has Rademacher (±1) entries, since then
:math:`z^\top H z = \sum_i H_{ii} z_i^2 = \operatorname{tr} H`. Hutch++ (Meyer,
Musco, Musco, Woodruff 2021) spends a third of its products on a sketch
:math:`Q` of the top of the spectrum, whose trace :math:`\operatorname{tr}(Q^\top
HQ)` it computes exactly, and applies Hutchinson's estimator to the deflated
remainder :math:`(I - QQ^\top)H(I - QQ^\top)`: for a spectrum dominated by a few
large eigenvalues, as the Hessian of a network usually is, its variance is much
smaller for the same number of products.

The reported standard error is that of the Hutchinson average (for Hutch++, of the
deflated part given the sketch, which is deterministic once drawn): the sample
standard deviation over :math:`\sqrt{m}`.

References:
    Hutchinson (1990). A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines. Communications in Statistics.

    Meyer, Musco, Musco, Woodruff (2021). Hutch++: optimal stochastic trace
    estimation. SOSA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_eos._validation import check_int
from lightning_eos.curvature.lanczos import SymmetricOperator

Distribution = Literal["rademacher", "gaussian"]

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "random_vectors"]


@dataclass
class TraceEstimate:
    r"""A trace estimate.

    Attributes:
        estimate: The estimate of :math:`\operatorname{tr} H`.
        stderr: Its standard error (see the module docstring); NaN with a single
            stochastic sample.
        samples: The Hutchinson samples :math:`z^\top H z` (deflated for Hutch++).
        num_products: Operator-vector products spent.
        method: ``"hutchinson"`` or ``"hutchpp"``.
    """

    estimate: float
    stderr: float
    samples: Tensor
    num_products: int
    method: str


def random_vectors(
    count: int,
    dim: int,
    generator: torch.Generator,
    distribution: Distribution = "rademacher",
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Rows with independent Rademacher (±1) or standard normal entries.

    Drawn in float64 on the CPU from ``generator`` (so the numbers do not depend on
    the device or the type of the computation), then cast.
    """
    if distribution == "rademacher":
        bits = torch.randint(0, 2, (count, dim), generator=generator)
        rows = bits.to(torch.float64) * 2 - 1
    elif distribution == "gaussian":
        rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(
            f"`distribution` must be 'rademacher' or 'gaussian', got {distribution!r}."
        )
    return rows.to(dtype=dtype, device=device)


def hutchinson(
    operator: SymmetricOperator,
    num_samples: int = 32,
    *,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    block_size: int = 16,
) -> TraceEstimate:
    r"""Hutchinson's estimate :math:`\frac1m\sum_{i=1}^m z_i^\top H z_i`.

    Args:
        operator: The symmetric operator :math:`H`.
        num_samples: Random vectors :math:`m`, at least 1.
        generator: Source of the random vectors; seeded with 0 by default.
        distribution: ``"rademacher"`` (exact for a diagonal operator, and of the
            smallest variance) or ``"gaussian"``.
        block_size: Vectors per call of ``operator.matmat`` (bounds the memory).

    Returns:
        The :class:`TraceEstimate`.
    """
    check_int("num_samples", num_samples)
    check_int("block_size", block_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    samples = _quadratic_forms(
        operator, num_samples, generator, distribution, block_size, basis=None
    )
    return TraceEstimate(
        estimate=float(samples.mean()),
        stderr=_stderr(samples),
        samples=samples,
        num_products=num_samples,
        method="hutchinson",
    )


def hutchpp(
    operator: SymmetricOperator,
    num_products: int = 48,
    *,
    generator: torch.Generator | None = None,
    distribution: Distribution = "rademacher",
    block_size: int = 16,
) -> TraceEstimate:
    r"""The Hutch++ estimate: exact on a sketch, Hutchinson on the rest.

    With :math:`s = \lfloor m/3 \rfloor` sketch vectors :math:`S`,
    :math:`Q = \operatorname{orth}(HS)`, and :math:`m - 2s` Hutchinson vectors
    :math:`G`: :math:`\operatorname{tr}(Q^\top HQ) + \frac{1}{m - 2s}
    \sum_i g_i^\top (I - QQ^\top) H (I - QQ^\top) g_i`.

    Args:
        operator: The symmetric operator :math:`H`.
        num_products: Total products :math:`m`, at least 3.
        generator: Source of the random vectors; seeded with 0 by default.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        block_size: Vectors per call of ``operator.matmat``.

    Returns:
        The :class:`TraceEstimate`; its ``stderr`` is that of the deflated part.
    """
    check_int("num_products", num_products, low=3)
    check_int("block_size", block_size)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    sketch_size = min(num_products // 3, operator.dim)
    sketch = random_vectors(
        sketch_size,
        operator.dim,
        generator,
        distribution,
        operator.dtype,
        operator.device,
    )
    images = _products(operator, sketch, block_size)
    # Orthonormal rows spanning the images (QR of the transpose, in float64).
    q, _ = torch.linalg.qr(images.double().T)
    basis = q.T.to(operator.dtype)
    exact = float((basis * _products(operator, basis, block_size)).sum())
    remaining = num_products - 2 * sketch_size
    samples = _quadratic_forms(
        operator, remaining, generator, distribution, block_size, basis=basis
    )
    return TraceEstimate(
        estimate=exact + float(samples.mean()),
        stderr=_stderr(samples),
        samples=samples,
        num_products=num_products,
        method="hutchpp",
    )


def _quadratic_forms(
    operator: SymmetricOperator,
    count: int,
    generator: torch.Generator,
    distribution: Distribution,
    block_size: int,
    basis: Tensor | None,
) -> Tensor:
    """``zᵀ P H P z`` for ``count`` random ``z``, with P the projector off ``basis``."""
    values = []
    for start in range(0, count, block_size):
        rows = random_vectors(
            min(block_size, count - start),
            operator.dim,
            generator,
            distribution,
            operator.dtype,
            operator.device,
        )
        if basis is not None and basis.numel():
            rows = rows - (rows @ basis.T) @ basis
        images = operator.matmat(rows)
        values.append((rows.double() * images.double()).sum(dim=1).cpu())
    return torch.cat(values)


def _products(operator: SymmetricOperator, rows: Tensor, block_size: int) -> Tensor:
    if rows.shape[0] == 0:
        return rows.clone()
    return torch.cat(
        [
            operator.matmat(rows[start : start + block_size])
            for start in range(0, rows.shape[0], block_size)
        ]
    )


def _stderr(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.nan
    return float(samples.std(correction=1) / math.sqrt(samples.numel()))
