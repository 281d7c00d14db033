"""The third-order callback: the gradient of the sharpness and self-stabilization."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_eos._validation import check_bool, check_number
from lightning_eos.callbacks._base import (
    check_eigensolver,
    check_k_fits,
)
from lightning_eos.callbacks._shared import (
    EigenpairSource,
    SharedEigenpairsCallback,
    Sharing,
    not_finite_message,
)
from lightning_eos.callbacks._third_order_record import (
    ThirdOrderRecord,
    nan_record,
    record_metrics,
)
from lightning_eos.curvature.directional import (
    BlockDerivatives,
    block_derivatives,
    group_members,
)
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.subspace import sharpness_gradient
from lightning_eos.curvature.thresholds import stability_threshold


class ThirdOrderMonitor(SharedEigenpairsCallback):
    r"""Log the gradient of the sharpness, self-stabilization and block derivatives.

    At each measurement, with :math:`(\lambda_1, u_1)` the top eigenpair of the
    Hessian of the probe-set loss :math:`L` and :math:`T = \nabla^3 L`:

    * the gradient of the sharpness :math:`\nabla S = T[u_1, u_1]`: its norm, its
      cosine with :math:`\nabla L`, :math:`T[u_1, u_1, u_1] = u_1\cdot\nabla S`, its
      component along :math:`\nabla L/\lVert\nabla L\rVert`, the norms of its parts
      inside and outside the top-``k`` eigenspace, and with ``tensor=True`` the
      :math:`k\times k\times k` tensor :math:`T[u_a, u_b, u_c]`
      (:func:`~lightning_eos.curvature.sharpness_gradient`);
    * self-stabilization (Damian, Nichani, Lee 2023), with
      :math:`\nabla S_\perp = \nabla S - u_1(u_1\cdot\nabla S)`: the progressive
      sharpening rate :math:`\alpha = -\nabla L\cdot\nabla S_\perp`, the
      self-stabilization strength :math:`\beta = \lVert\nabla S_\perp\rVert^2`,
      the predicted oscillation size :math:`\delta = \sqrt{2\alpha/\beta}` when
      :math:`\alpha > 0` (all three at the current point), and the coordinates of
      the displacement from a reference point :math:`\theta^*` along the
      reference directions, :math:`x = u_1^*\cdot(\theta - \theta^*)` and
      :math:`y = \nabla S_\perp^*\cdot(\theta - \theta^*)`, which tracks
      :math:`S(\theta) - S(\theta^*)` to first order. :math:`\theta^*` is the
      first measured point with :math:`\lambda_1` at or above the stability
      threshold (so :math:`S(\theta^*) \approx 2/\eta`), and :math:`u_1^*`,
      :math:`\nabla S_\perp^*` are taken there, as in the reduced model of
      Damian et al.; the three are kept in checkpoints. The model is local: far
      from :math:`\theta^*` the coordinates describe the displacement, not the
      dynamics. When the set of trainable parameters changes (a layer frozen or
      unfrozen, even for another of the same size), :math:`\theta^*` is taken
      anew at the next point at or above the threshold. The signs of the
      eigenvectors are kept continuous between measurements, so that
      :math:`T[u_1, u_1, u_1]` and the other odd entries do not flip with the
      eigensolver's arbitrary signs;
    * the block-structured derivatives of :math:`t \mapsto L(\theta + \sum_i t_i
      d_i)` (Wolinski 2025; :func:`~lightning_eos.curvature.block_derivatives`)
      for :math:`d` the last update (``block_direction="update"``) or
      :math:`-\nabla L` (``"gradient"``), cut by ``block_groups``: per group the
      gradient, the diagonal of the Hessian and the diagonal third-order entry;
      the whole :math:`K\times K` Hessian is in :attr:`history`.

    Eigenpairs are shared with a :class:`SharpnessMonitor` of the same run that
    probes the same loss (see ``eigenpairs``): one eigensolve per step, in either
    callback order. Third derivatives are taken with normalization layers in plain
    tensor operations (``ProbeObjective(normalization="plain")``), because PyTorch's
    fused layer, batch (train mode) and instance normalization give wrong third
    derivatives; the model itself is not changed.

    Cost per measurement, beyond the eigenpairs: one Hessian-vector product with
    graph and one further backward pass for :math:`\nabla S` (about 5 gradients on
    the digits MLP, see ``benchmarks/third_order.py``); with ``tensor=True``,
    ``k`` and ``k(k+1)/2`` of them; and for the blocks, ``K`` double-backward and
    ``K`` triple-backward passes with ``K`` groups.

    Logged scalars: ``third_order/grad_sharpness_norm``, ``third_order/cosine``
    (with :math:`\nabla L`), ``third_order/T111``, ``third_order/gradient_component``,
    ``third_order/eigenspace_norm``, ``third_order/complement_norm``,
    ``third_order/T_abc`` (with ``tensor``), ``selfstab/alpha``, ``selfstab/beta``,
    ``selfstab/delta``, ``selfstab/x``, ``selfstab/y``, ``selfstab/sharpness_gap``
    (:math:`\lambda_1` − threshold), and ``block/<group>/gradient``,
    ``block/<group>/curvature``, ``block/<group>/third``.

    Args:
        k: Top eigenvectors used for the projections (and the tensor), at least 1.
        tensor: Also log the :math:`k\times k\times k` tensor.
        every_n_steps: Measure when the step count is a multiple of this.
        probe_size: Examples in the probe set.
        chunk_size: Examples per chunk.
        eigenpairs: ``"auto"`` (share with a matching SharpnessMonitor when there
            is one) or ``"own"``.
        tol: Lanczos tolerance when solving its own eigenpairs.
        max_iter: Lanczos steps when solving its own eigenpairs.
        block_direction: ``"update"``, ``"gradient"`` or ``"none"`` (no blocks).
        block_groups: Lists of parameter names (or a mapping from group name to
            such a list) covering every trainable parameter; ``None``: one group per
            parameter tensor.
        block_third_order: ``"diagonal"``, ``"full"`` or ``"none"``.
        threshold: The threshold that fixes :math:`\theta^*`, a finite positive
            number; ``None``: the stability threshold of the optimizer's step.
        loss_fn: ``loss_fn(module(inputs), targets)``, or ``None`` to use the
            module's ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``.
        dtype: ``"float64"`` to probe a float32 model in double precision.
        seed: Seed of the probe set and random vectors, in ``[0, 2**32 - 1]``.

    Raises:
        ValueError: At construction for an argument out of range; in ``setup`` for
            ``k`` above the number of parameters or ``block_groups`` that do not
            partition the trainable parameters.

    Example:
        >>> from lightning_eos.callbacks import SharpnessMonitor, ThirdOrderMonitor
        >>> callbacks = [SharpnessMonitor(k=2), ThirdOrderMonitor()]

    References:
        Damian, Nichani, Lee (2023). Self-stabilization: the implicit bias of
        gradient descent at the edge of stability. ICLR.

        Wolinski (2025). Gathering and exploiting higher-order information when
        training large structured models. arXiv:2312.03885.
    """

    def __init__(
        self,
        k: int = 1,
        tensor: bool = False,
        every_n_steps: int = 10,
        probe_size: int = 2048,
        chunk_size: int = 2048,
        eigenpairs: Sharing = "auto",
        tol: float = 1e-3,
        max_iter: int = 100,
        block_direction: Literal["update", "gradient", "none"] = "update",
        block_groups: Sequence[Sequence[str]]
        | Mapping[str, Sequence[str]]
        | None = None,
        block_third_order: Literal["none", "diagonal", "full"] = "diagonal",
        threshold: float | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            every_n_steps, probe_size, chunk_size, loss_fn, mode, dtype, seed
        )
        k, tol, max_iter = check_eigensolver(k, tol, max_iter)
        if block_direction not in ("update", "gradient", "none"):
            raise ValueError(
                "`block_direction` must be 'update', 'gradient' or 'none', got "
                f"{block_direction!r}."
            )
        if block_third_order not in ("none", "diagonal", "full"):
            raise ValueError(
                "`block_third_order` must be 'none', 'diagonal' or 'full', got "
                f"{block_third_order!r}."
            )
        if threshold is not None:
            try:
                threshold = check_number("threshold", threshold, low=0.0, low_open=True)
            except ValueError as error:
                raise ValueError(f"{error} None is accepted too.") from None
        self.k = k
        self.tensor = check_bool("tensor", tensor)
        self.block_direction = block_direction
        self.block_groups = block_groups
        self.block_third_order = block_third_order
        self.fixed_threshold = threshold
        self.history: list[ThirdOrderRecord] = []
        self.source = EigenpairSource(k, eigenpairs, tol, max_iter)
        #: θ*, u₁* and ∇S⊥* as the rows of one (3, dim) float64 tensor, once fixed.
        self.reference: Tensor | None = None
        self.reference_step: int | None = None
        self._u_reference: Tensor | None = None
        self._layout: list[str] | None = None  # the names the references belong to
        self._threshold: float | None = None
        self._before_step: tuple[int, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(k=self.k, every_n_steps=self.every_n_steps)

    # -- hooks -----------------------------------------------------------------------

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        check_k_fits(self.k, pl_module, type(self).__name__)
        if self.block_direction != "none":
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            try:
                group_members(names, self.block_groups)
            except ValueError as error:
                raise ValueError(
                    f"{type(self).__name__}: `block_groups`: {error}"
                ) from None

    @override
    def on_prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.add_charts(
            trainer,
            "third order",
            {
                "self-stabilization x, y": ["selfstab/x", "selfstab/y"],
                "‖∇S‖ and T[u₁,u₁,u₁]": [
                    "third_order/grad_sharpness_norm",
                    "third_order/T111",
                ],
            },
        )
        self._threshold = self._read_threshold(trainer)

    @override
    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._threshold = self._read_threshold(trainer)
        step = trainer.global_step
        measured_next = (step + 1) % self.every_n_steps == 0
        if self.block_direction == "update" and measured_next:
            if self._before_step is None or self._before_step[0] != step:
                flat = torch.cat(
                    [p.detach().reshape(-1) for p in _trainable(pl_module)]
                )
                self._before_step = (step, flat.clone())

    # -- the measurement --------------------------------------------------------------

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        step = trainer.global_step
        name = type(self).__name__
        objective = self.objective(trainer, pl_module, normalization="plain")
        if self._layout is not None and self._layout != objective.names:
            # The trainable parameters changed (even to as many others): the sign
            # reference and the (x, y) frame belong to the old ones.
            self.reference, self.reference_step, self._u_reference = None, None, None
        self._layout = list(objective.names)
        operator = HessianOperator(objective)
        pairs = self.source.get(trainer, pl_module, operator, self.generator)
        if not pairs.finite:
            self.warn_once("non-finite", not_finite_message(name, step))
            return self._record_nan(step, float("nan"))

        vectors = pairs.eigenvectors.to(dtype=operator.dtype, device=operator.device)
        vectors = self._continuous_sign(vectors)
        result = sharpness_gradient(operator, vectors, tensor=self.tensor)
        sharpness = float(pairs.eigenvalues[0])
        theta = objective.point().double()
        u = vectors[0].double()
        gradient_s = result.vector
        perpendicular = gradient_s - u * float(u @ gradient_s)
        alpha = -float(operator.gradient().double() @ perpendicular)
        beta = float(perpendicular @ perpendicular)
        delta = math.sqrt(2 * alpha / beta) if alpha > 0 and beta > 0 else math.nan
        if (
            self.reference is None
            and self._threshold is not None
            and sharpness >= self._threshold
        ):
            self.reference = torch.stack([theta, u, perpendicular]).cpu()
            self.reference_step = step
        x = y = math.nan
        if self.reference is not None:
            point, direction, normal = self.reference.to(theta.device)
            offset = theta - point
            x, y = float(direction @ offset), float(normal @ offset)
        blocks = self._blocks(objective, operator, step)

        record = ThirdOrderRecord(
            step=step,
            sharpness=sharpness,
            threshold=self._threshold,
            grad_sharpness_norm=result.norm,
            cosine=result.cosine,
            t111=float(result.eigen_coefficients[0]),
            gradient_component=result.gradient_coefficient,
            eigenspace_norm=float(result.eigen_coefficients.norm()),
            complement_norm=result.complement_norm,
            alpha=alpha,
            beta=beta,
            delta=delta,
            x=x,
            y=y,
            tensor=result.tensor,
            blocks=blocks,
        )
        self.history.append(record)
        return record_metrics(record)

    def _blocks(
        self, objective, operator: HessianOperator, step: int
    ) -> BlockDerivatives | None:
        if self.block_direction == "none":
            return None
        if self.block_direction == "gradient":
            direction = -operator.gradient()
        else:
            if self._before_step is None or self._before_step[0] != step - 1:
                return None  # no update is known at this step (the run's first)
            before = self._before_step[1].to(dtype=objective.dtype)
            direction = objective.point() - before.to(objective.device)
        return block_derivatives(
            objective,
            direction,
            self.block_groups,
            third_order=self.block_third_order,
        )

    def _continuous_sign(self, vectors: Tensor) -> Tensor:
        """Flip each eigenvector to point the way the previous one did.

        The first time, the entry of largest magnitude is made positive.
        """
        vectors = vectors.clone()
        previous = self._u_reference
        for row in range(vectors.shape[0]):
            u = vectors[row]
            if previous is not None and row < previous.shape[0]:
                sign = 1.0 if float(u @ previous[row].to(u)) >= 0 else -1.0
            else:
                sign = 1.0 if float(u[u.abs().argmax()]) >= 0 else -1.0
            vectors[row] = sign * u
        self._u_reference = vectors.detach().cpu().clone()
        return vectors

    def _record_nan(self, step: int, sharpness: float) -> dict[str, float]:
        self.history.append(nan_record(step, sharpness, self._threshold))
        return {
            "third_order/grad_sharpness_norm": math.nan,
            "third_order/T111": math.nan,
        }

    def _read_threshold(self, trainer: pl.Trainer) -> float | None:
        if self.fixed_threshold is not None:
            return float(self.fixed_threshold)
        if len(trainer.optimizers) != 1:
            return None
        return stability_threshold(trainer.optimizers[0]).value

    # -- checkpoint state -------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            source=self.source.state_dict(),
            reference=self.reference,
            reference_step=self.reference_step,
            u_reference=self._u_reference,
            layout=self._layout,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.source.load_state_dict(state_dict["source"])
        self.reference = state_dict["reference"]
        self.reference_step = state_dict["reference_step"]
        self._u_reference = state_dict["u_reference"]
        self._layout = state_dict.get("layout")


def _trainable(module: torch.nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]
