"""The spectral density callback: stochastic Lanczos quadrature shown in TensorBoard."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_eos._validation import check_bool, check_int
from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.curvature.density import SpectralDensity, spectral_density
from lightning_eos.curvature.hessian import HessianOperator


@dataclass
class DensityRecord:
    """One measurement of :class:`SpectralDensityMonitor`.

    Attributes:
        step: The optimizer step.
        density: The quadrature nodes and weights.
    """

    step: int
    density: SpectralDensity


class SpectralDensityMonitor(CurvatureCallback):
    r"""Estimate the Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Every ``every_n_steps`` optimizer steps (and before the first), ``num_probes``
    Lanczos runs of ``num_steps`` exact Hessian-vector products each, started from
    Gaussian vectors of this callback's own generator, give the nodes and weights of
    a quadrature of the spectral density :math:`\phi(t) = \frac1p\sum_i
    \delta(t - \lambda_i)` of the probe-set Hessian
    (:func:`~lightning_eos.curvature.spectral_density`; Ghorbani, Krishnan, Xiao
    2019). Extreme eigenvalues are resolved well after a few tens of steps; the bulk
    near zero is resolved as a mass, not eigenvalue by eigenvalue.

    Shown in TensorBoard as a histogram over training (``spectrum/density``, with
    bin counts :math:`p \times` mass, i.e. numbers of eigenvalues, over ``bins``
    equal bins between the smallest and largest node), and with ``figure=True``
    as a Matplotlib figure of the Gaussian-smoothed density on a logarithmic scale
    (``spectrum/figure``; needs matplotlib). Scalars for every logger:
    ``spectrum/lambda_max`` and ``spectrum/lambda_min`` (the extreme nodes, which
    converge first), ``spectrum/negative_mass`` (the mass below
    :math:`-\epsilon\,|\lambda|_{\max}`, with :math:`\epsilon` = 1e-3), and
    ``spectrum/hvps``.

    Args:
        num_probes: Independent Lanczos runs, at least 1.
        num_steps: Lanczos steps per run, at least 1.
        bins: Histogram bins, at least 1.
        figure: Also log a figure of the smoothed density.
        every_n_steps: Measure when the step count is a multiple of this.
        probe_size: Examples in the probe set.
        chunk_size: Examples per chunk.
        loss_fn: ``loss_fn(module(inputs), targets)``, or ``None`` to use the
            module's ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``.
        dtype: ``"float64"`` to probe a float32 model in double precision.
        seed: Seed of the probe set and the start vectors, in ``[0, 2**32 - 1]``.

    Example:
        >>> from lightning_eos.callbacks import SpectralDensityMonitor
        >>> monitor = SpectralDensityMonitor(num_probes=2, num_steps=40)

    References:
        Ghorbani, Krishnan, Xiao (2019). An investigation into neural net
        optimization via Hessian eigenvalue density. ICML.
    """

    def __init__(
        self,
        num_probes: int = 2,
        num_steps: int = 40,
        bins: int = 60,
        figure: bool = False,
        every_n_steps: int = 100,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps, probe_size, chunk_size, loss_fn, mode, dtype, seed
        )
        self.num_probes = check_int("num_probes", num_probes)
        self.num_steps = check_int("num_steps", num_steps)
        self.bins = check_int("bins", bins)
        self.figure = check_bool("figure", figure)
        self.history: list[DensityRecord] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps)

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.figure:
            try:
                import matplotlib  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "SpectralDensityMonitor(figure=True) needs matplotlib: "
                    "pip install 'lightning-eos[examples]'."
                ) from error

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        operator = HessianOperator(self.objective(trainer, pl_module))
        result = spectral_density(
            operator, self.num_probes, self.num_steps, generator=self.generator
        )
        step = trainer.global_step
        self.history.append(DensityRecord(step, result))
        if not result.finite:
            self.warn_once(
                "non-finite",
                f"SpectralDensityMonitor: the Hessian-vector products are not finite "
                f"at step {step}; the measurement is logged as NaN.",
            )
            return {"spectrum/lambda_max": math.nan, "spectrum/lambda_min": math.nan}
        if trainer.global_rank == 0:
            self._write_tensorboard(trainer, result, operator.dim)
        top = float(result.nodes.max())
        bottom = float(result.nodes.min())
        scale = max(abs(top), abs(bottom))
        return {
            "spectrum/lambda_max": top,
            "spectrum/lambda_min": bottom,
            "spectrum/negative_mass": result.mass_below(-1e-3 * scale),
            "spectrum/hvps": float(result.num_products),
        }

    def _write_tensorboard(
        self, trainer: pl.Trainer, result: SpectralDensity, dim: int
    ) -> None:
        loggers = [
            logger
            for logger in trainer.loggers
            if isinstance(logger, TensorBoardLogger)
        ]
        if not loggers:
            return
        low, high = float(result.nodes.min()), float(result.nodes.max())
        if high <= low:
            high = low + 1.0
        edges = torch.linspace(low, high, self.bins + 1, dtype=torch.float64)
        counts = result.histogram(edges) * dim
        centres = (edges[:-1] + edges[1:]) / 2
        total = float(counts.sum())
        figure = self._figure(result, low, high) if self.figure else None
        for logger in loggers:
            logger.experiment.add_histogram_raw(
                "spectrum/density",
                min=low,
                max=high,
                num=total,
                sum=float((counts * centres).sum()),
                sum_squares=float((counts * centres**2).sum()),
                bucket_limits=edges[1:].tolist(),
                bucket_counts=counts.tolist(),
                global_step=trainer.global_step,
            )
            if figure is not None:
                logger.experiment.add_figure(
                    "spectrum/figure",
                    figure,
                    global_step=trainer.global_step,
                    close=False,
                )

    @staticmethod
    def _figure(result: SpectralDensity, low: float, high: float):
        # A Figure without pyplot: no backend is selected and no window opened.
        from matplotlib.figure import Figure

        span = high - low
        grid = torch.linspace(low - 0.05 * span, high + 0.05 * span, 400)
        density = result.density(grid, sigma=max(span / 100, 1e-12))
        figure = Figure(figsize=(5, 3))
        axis = figure.add_subplot()
        axis.semilogy(grid.numpy(), density.clamp_min(1e-12).numpy())
        axis.set_xlabel("eigenvalue")
        axis.set_ylabel("density (smoothed)")
        axis.set_ylim(bottom=1e-6)
        figure.tight_layout()
        return figure
