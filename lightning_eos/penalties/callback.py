"""Attach a penalty to any LightningModule: its gradient is added before each step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_eos._validation import check_bool, check_choice, check_int
from lightning_eos.callbacks._base import CurvatureCallback
from lightning_eos.callbacks._probe_set import draw_probe_set
from lightning_eos.curvature._batches import batch_size, slice_batch
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.optim._base import ClosureOptimizer
from lightning_eos.optim._closure import current_backward_request
from lightning_eos.penalties._base import Penalty, PenaltyResult
from lightning_eos.penalties._objective_term import add_term, check_second_order
from lightning_eos.penalties._terms import PenaltyTerm
from lightning_eos.penalties.central_flow import CentralFlowPenalty

_DATA = ("batch", "probe")


@dataclass
class PenaltyRecord:
    """One evaluation of the penalty of :class:`PenaltyCallback`.

    Attributes:
        step: The optimizer step the penalty was added to (the number of steps
            taken before it).
        value: The penalty's value.
        gradient_norm: The norm of its gradient.
        added: Whether the gradient was added (an inactive or non-finite penalty is
            not added).
        metrics: The penalty's further scalars (sharpness, multiplier, …).
        num_products: Hessian-vector products spent on the evaluation.
        num_third_order: Third-order vectors spent on the evaluation.
    """

    step: int
    value: float
    gradient_norm: float
    added: bool
    metrics: dict[str, float] = field(default_factory=dict)
    num_products: int = 0
    num_third_order: int = 0


class PenaltyCallback(CurvatureCallback):
    r"""Add an explicit penalty to the objective of any optimizer, every step.

    With the penalty :math:`P` attached, the optimizer descends :math:`L + P`
    instead of :math:`L`. The module is not changed and need not know about the
    penalty. How the penalty reaches the optimizer depends on what the optimizer
    uses of its objective:

    * First-order optimizers (SGD, Adam, LBFGS, the SAM family) use gradients
      only. In ``on_before_optimizer_step``, after the module's backward pass and
      before gradient clipping and the optimizer's update, :math:`\nabla
      P(\theta)` is evaluated at the module's current parameters and added to
      every trainable parameter's ``.grad``. The penalties' gradients are exact
      Hessian-vector and third-order products, which the curvature core computes
      on copies of the parameters, in chunks, optionally in float64, with one
      collective per product under data parallelism; the penalty is then the same
      whatever the gradient accumulation or process count, and the module's
      backward pass (and memory) stays as it was. The loss the closure returns to
      the optimizer stays :math:`L`.
    * The second-order optimizers of :mod:`lightning_eos.optim` (``NewtonCG``,
      ``HessianFree``, ``CubicNewton``, ``GaussNewton``, ``GroupedNewton``) also
      differentiate the gradient and compare loss values at trial points. For
      them the penalty is a *loss term*: at the step's first closure call it is
      evaluated and frozen into its :class:`~lightning_eos.penalties.PenaltyTerm`,
      a differentiable function of the parameters; in ``on_after_backward`` of
      every closure call of the step its value is added to the loss the
      optimizer receives and its gradient to ``.grad``, with graph when the
      optimizer asked for one. Line searches, trust-region tests and
      Hessian-vector products are then those of :math:`L + P`: exactly, for the
      gradient-norm penalties; for the sharpness, trace and central-flow
      penalties, with their vectors held fixed during the step (value and
      gradient exact at the step's start, curvature without the eigenvector's
      rotation). ``GaussNewton`` and ``HessianFree(curvature="gauss_newton")``
      take the penalty's gradient and leave its curvature out of their
      Gauss-Newton matrix. These optimizers refuse several processes and gradient
      accumulation themselves, and so the penalty with them runs on one process.
      The term's value and gradient are taken one chunk at a time
      (``chunk_size`` bounds their memory); only a backward pass that the
      optimizer will differentiate again, with ``term_curvature=True``, holds
      the term's graph on all of its data at once, as the optimizer's own graph
      holds that of :math:`L` on the batch.

    Why not only a loss wrapper: a wrapper around the user's loss would need a
    backward pass with ``create_graph=True`` through every ``training_step``,
    would penalize each micro-batch or process separately (the mean of
    :math:`\|\nabla L_b\|^2` is not :math:`\|\nabla L\|^2`), and would
    differentiate through DDP's reducer, which does not support double backward.
    The loss term is used where it is needed, by the optimizers that already
    build that graph.

    The data of :math:`L` in :math:`P`. ``data="batch"`` (default): the examples
    the optimizer step is made of, i.e. all micro-batches accumulated for the step
    on all processes, each example weighted equally. This is the penalty of the
    objective the optimizer descends; with minibatches it is the per-step form of
    the SGD regularizer of Smith et al. (2021). ``data="probe"``: a fixed probe set
    of ``probe_size`` training examples drawn once (as in
    :class:`~lightning_eos.callbacks.SharpnessMonitor`), for the full-batch penalty
    during minibatch training or a cheaper fixed subset. In both cases the loss is
    ``loss_fn(module(inputs), targets)``, or the module's ``curvature_loss(batch)``,
    evaluated on copies of the parameters and buffers (BatchNorm statistics are
    never updated) with every layer in train (``mode="train"``) or eval mode.

    Optimizers. Any ``torch.optim.Optimizer`` with one optimizer per run. The
    learning rate of the step (for ``coefficient="lr"`` and
    :class:`~lightning_eos.penalties.CentralFlowPenalty`) is read from the
    optimizer's param groups when the step is taken, so schedulers are followed.
    Closure optimizers that call the closure several times per step (LBFGS, SAM)
    receive :math:`\nabla(L + P)` at every evaluation point, since the hook runs
    after each closure call; the loss they receive is :math:`L` alone, so
    optimizers that compare loss values (LBFGS with ``line_search_fn``) are
    refused. Under DDP, the module's gradient is already averaged when the hook
    runs and every process adds the same penalty gradient. With gradient
    accumulation the penalty is added once per optimizer step.

    Logged at ``step=trainer.global_step`` on every logger every
    ``log_every_n_steps`` steps (the first closure evaluation of the step):
    ``penalty/<name>/value``, ``penalty/<name>/gradient_norm``, ``penalty/<name>/
    hvps`` and the penalty's own scalars (``lambda_1``, ``sigma2``, …). Every
    evaluation is also appended to :attr:`history`.

    A penalty or gradient that is NaN or infinite (a diverged run) is logged, not
    added, and warned about once; training goes on.

    Refused, with the reason: strategies that shard parameters (FSDP, DeepSpeed),
    several optimizers, first-order optimizers with a line search (LBFGS with
    ``line_search_fn``: its closure's loss is :math:`L` alone), param groups with
    different learning rates when the penalty needs the learning rate, a
    second-order optimizer with a penalty that returns no term or with
    ``coefficient="lr"`` (its lr is no gradient-descent step size), and
    ``GaussNewton(damping=0)``, which has no curvature outside the row space of
    the Jacobian, where the penalty's gradient may point.

    Penalties with third derivatives (sharpness, trace, central flow) evaluate the
    loss with normalization layers in plain tensor operations
    (``ProbeObjective(normalization="plain")``): PyTorch's fused LayerNorm,
    InstanceNorm and BatchNorm with batch statistics return wrong third
    derivatives, while the plain formulas are the same function with exact
    derivatives of every order. The module and its training are untouched.

    Args:
        penalty: The penalty (:mod:`lightning_eos.penalties`).
        data: ``"batch"`` or ``"probe"`` (see above).
        probe_size: Examples in the probe set (``data="probe"``), at least 1.
        chunk_size: Examples per chunk, bounding the memory of a product; ``None``
            takes each micro-batch (``data="batch"``) or the whole probe set as one
            chunk, which is fastest.
        loss_fn: ``loss_fn(module(inputs), targets)`` for batches ``(inputs,
            targets, ...)``; when ``None`` the module must define
            ``curvature_loss(batch)``. Either must be a mean over the batch's
            examples: chunks are weighted by their sizes, so a sum-reduced loss
            would make the result depend on ``chunk_size``.
        mode: ``"train"`` or ``"eval"``: the mode of every layer in the penalty.
        dtype: ``"float64"`` to evaluate a float32 model's penalty in double
            precision (on copies), ``"float32"``, or ``None`` for the parameters' type.
        seed: Seed of the probe set and of dropout masks in the penalty, in
            ``[0, 2**32 - 1]``.
        log_every_n_steps: Log every this many optimizer steps, at least 1.
        term_curvature: With a second-order optimizer, whether its Hessian-vector
            products include the penalty's curvature (exact; each product then
            differentiates the term's gradient once more) or leave it out, as
            Gauss-Newton curvature does (the value and gradient still enter;
            finite-difference products get the term's gradient held at the
            step's start).

    Raises:
        ValueError: At construction, for an argument outside its range.
        MisconfigurationException: In ``setup`` or when fitting starts, for the
            refused settings above.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_eos.penalties import CentralFlowPenalty, PenaltyCallback
        >>> penalty = PenaltyCallback(CentralFlowPenalty(target_lr=0.2))
        >>> trainer = Trainer(callbacks=[penalty], max_steps=20_000)  # doctest: +SKIP

    References:
        Barrett, Dherin (2021). Implicit gradient regularization. ICLR.
        Smith, Dherin, Barrett, De (2021). On the origin of implicit regularization
        in stochastic gradient descent. ICLR.
        Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in
        deep learning with central flows. ICLR.
    """

    def __init__(
        self,
        penalty: Penalty,
        data: Literal["batch", "probe"] = "batch",
        probe_size: int = 2048,
        chunk_size: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
        log_every_n_steps: int = 1,
        term_curvature: bool = True,
    ) -> None:
        if not isinstance(penalty, Penalty):
            raise ValueError(
                "`penalty` must be a lightning_eos.penalties.Penalty, got "
                f"{type(penalty).__name__}."
            )
        check_choice("data", data, _DATA)
        check_int("log_every_n_steps", log_every_n_steps)
        self.term_curvature = check_bool("term_curvature", term_curvature)
        super().__init__(
            log_every_n_steps,
            probe_size,
            probe_size if chunk_size is None else chunk_size,
            loss_fn,
            mode,
            dtype,
            seed,
        )
        self.penalty = penalty
        self.data = data
        self.split_batches = chunk_size
        self.history: list[PenaltyRecord] = []
        self.num_evaluations = 0
        self._micro_batches: list[Any] = []
        self._batch_step = -1
        self._recorded_step = -1
        self._hooked: tuple[ClosureOptimizer, Callable[[], None]] | None = None
        self._through_objective = False
        self._term: PenaltyTerm | None = None
        self._term_gradient: list[Tensor | None] | None = None
        self._term_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(penalty=self.penalty.name, data=self.data)

    # -- checks ------------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"PenaltyCallback adds the penalty gradient for one optimizer; the "
                f"run has {len(optimizers)}."
            )
        optimizer = optimizers[0]
        name = type(optimizer).__name__
        # A callback may serve several fits: nothing of a previous one's steps.
        self._micro_batches, self._batch_step = [], -1
        self._recorded_step, self._term_step = -1, -1
        self._term, self._term_gradient = None, None
        self._through_objective = False
        if isinstance(optimizer, ClosureOptimizer):
            # The optimizer would refuse these settings at its first step; with
            # the penalty attached, refuse them now, before anything is evaluated.
            optimizer.check_trainer(trainer)
        if isinstance(optimizer, ClosureOptimizer) and optimizer.second_order:
            check_second_order(self.penalty, optimizer, self.warn_once)
            # The penalty becomes a term of the objective of every closure call:
            # the optimizer's loss values, gradients and curvature are of L + P.
            self._through_objective = True
        elif isinstance(optimizer, ClosureOptimizer):
            # SAM's clean pass runs outside Lightning's hooks: add the penalty's
            # gradient there too, so that the perturbation follows ∇(L + P).
            hook = partial(self.on_before_optimizer_step, trainer, pl_module, optimizer)
            optimizer.gradient_hooks.append(hook)
            self._hooked = (optimizer, hook)
        search = optimizer.defaults.get("line_search_fn")
        if search is not None:
            raise MisconfigurationException(
                f"PenaltyCallback cannot be used with {name}(line_search_fn="
                f"{search!r}): the closure returns the module's loss L without the "
                "penalty, so a line search would compare values of L with "
                "gradients of L + P. Use line_search_fn=None."
            )
        if self.penalty.needs_step_size:
            rates = {_as_float(group["lr"]) for group in optimizer.param_groups}
            if len(rates) > 1:
                raise MisconfigurationException(
                    f"{type(self.penalty).__name__} uses the learning rate of the "
                    f"step, but the param groups of {name} have different ones: "
                    f"{sorted(rates)}."
                )
        plain_gradient_descent = type(optimizer) is torch.optim.SGD and all(
            not group["momentum"] for group in optimizer.param_groups
        )
        if isinstance(self.penalty, CentralFlowPenalty) and not plain_gradient_descent:
            self.warn_once(
                "projection",
                "CentralFlowPenalty's projection rule assumes a gradient-descent "
                f"step θ⁺ = θ − η·g; with {name} (or momentum) the sharpness is held "
                "at 2/target_lr only approximately.",
            )

    # -- hooks -----------------------------------------------------------------------

    @override
    def on_train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        name = self.penalty.name
        charts = {f"penalty {name}": [f"penalty/{name}/value"]}
        if isinstance(self.penalty, CentralFlowPenalty):
            charts["sharpness held at 2/target_lr"] = [
                f"penalty/{name}/lambda_1",
                f"penalty/{name}/threshold",
            ]
        self.add_charts(trainer, "penalties", charts)
        if self.data == "probe":
            self.probe = draw_probe_set(
                trainer,
                type(self).__name__,
                self.probe_size,
                self.chunk_size,
                self.generator,
                self.seed,
                indices=self._restored_indices,
            )
        if self.mode == "train" and any(
            isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
            for m in pl_module.modules()
        ):
            self.warn_once(
                "dropout",
                "PenaltyCallback evaluates the penalty in train mode with dropout: "
                "it fixes one dropout mask per chunk and step, drawn apart from the "
                "mask of the training step. Use mode='eval' to penalize without "
                "dropout.",
            )

    @override
    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.global_step != self._batch_step:  # the first micro-batch of a step
            self._micro_batches = []
            self._batch_step = trainer.global_step
        if self.data == "batch":
            self._micro_batches.append(batch)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Nothing: the penalty is added before the step, not measured after it."""

    @override
    def on_after_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        """With a second-order optimizer, add the penalty to this call's objective.

        The penalty is evaluated once per step, at the first closure call (the
        step's starting point), and frozen into its
        :class:`~lightning_eos.penalties.PenaltyTerm`; every closure call of the
        step then adds the term's value to the loss the optimizer receives and
        its gradient to ``.grad``, with graph when the optimizer asked for one.
        """
        request = current_backward_request()
        if not self._through_objective or request is None:
            return
        if trainer.global_step != self._term_step:  # the step's first closure call
            self._term_step = trainer.global_step
            _, result = self._evaluate(trainer, pl_module, trainer.optimizers[0])
            term = None if result is None else result.term
            if result is not None and not isinstance(term, PenaltyTerm):
                raise TypeError(
                    f"{type(self.penalty).__name__}.evaluate returned an active "
                    f"penalty with term={term!r}: with a second-order optimizer, "
                    "PenaltyCallback needs PenaltyResult.term to be a PenaltyTerm "
                    "(lightning_eos.penalties), the penalty as a function of the "
                    "parameters."
                )
            self._term, self._term_gradient = term, None
        if self._term is not None:
            pieces = add_term(
                self._term,
                request,
                pl_module,
                self.term_curvature,
                self._term_gradient,
            )
            if self._term_gradient is None:
                self._term_gradient = pieces

    @override
    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
    ) -> None:
        if self._through_objective:
            return  # already in the objective (on_after_backward)
        objective, result = self._evaluate(trainer, pl_module, optimizer)
        if result is not None:
            self._add_gradient(objective, pl_module, result.gradient)

    def _evaluate(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
    ) -> tuple[ProbeObjective, PenaltyResult | None]:
        """Evaluate the penalty at the current parameters, warn, and record it.

        Returns:
            The objective and the penalty's result, ``None`` when nothing is to be
            added (an inactive or non-finite penalty).
        """
        objective = self._objective(trainer, pl_module)
        result = self.penalty.evaluate(objective, self._step_size(optimizer))
        if tuple(result.gradient.shape) != (objective.dim,):
            raise ValueError(
                f"{type(self.penalty).__name__}.evaluate returned a gradient of shape "
                f"{tuple(result.gradient.shape)}; the module has {objective.dim} "
                "trainable parameters, so it must be a flat vector of that length."
            )
        self.num_evaluations += 1
        finite = math.isfinite(result.value) and bool(
            torch.isfinite(result.gradient).all()
        )
        added = finite and result.active
        if not finite:
            self.warn_once(
                "non-finite",
                f"PenaltyCallback: {type(self.penalty).__name__} or its gradient is "
                f"not finite at step {trainer.global_step}; it is logged and not "
                "added to the gradient.",
            )
        for key, message in result.notes.items():
            self.warn_once(f"note-{key}", message)
        if finite and result.metrics.get("converged", 1.0) == 0.0:
            self.warn_once(
                "unconverged",
                f"PenaltyCallback: the eigensolver of {type(self.penalty).__name__} "
                f"stopped before its tolerance at step {trainer.global_step}; raise "
                "its max_iter for an accurate penalty.",
            )
        if trainer.global_step != self._recorded_step:  # first closure call of a step
            self._recorded_step = trainer.global_step
            self._record(trainer, result, added)
        return objective, result if added else None

    @override
    def teardown(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        if self._hooked is not None:
            optimizer, hook = self._hooked
            if hook in optimizer.gradient_hooks:
                optimizer.gradient_hooks.remove(hook)
            self._hooked = None
        # The term holds the step's data: let it go.
        self._term, self._term_gradient, self._term_step = None, None, -1
        super().teardown(trainer, pl_module, stage)

    # -- checkpoint state -------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["penalty"] = self.penalty.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.penalty.load_state_dict(state_dict["penalty"])

    # -- internals --------------------------------------------------------------------

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        """Unused: the penalty is evaluated in ``on_before_optimizer_step``."""
        return {}

    def _objective(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> ProbeObjective:
        normalization = "plain" if self.penalty.needs_third_order else "native"
        if self.data == "probe":
            return self.objective(trainer, pl_module, normalization=normalization)
        if not self._micro_batches:
            raise MisconfigurationException(
                "PenaltyCallback(data='batch') found no training batch for this "
                "optimizer step; use data='probe' when stepping outside the "
                "training batches."
            )
        chunks = self._micro_batches
        if self.split_batches is not None:
            size = self.split_batches
            chunks = [
                slice_batch(batch, start, start + size)
                for batch in chunks
                for start in range(0, batch_size(batch), size)
            ]
        return self.objective(
            trainer, pl_module, normalization=normalization, chunks=chunks
        )

    def _step_size(self, optimizer: Optimizer) -> float:
        rates = [_as_float(group["lr"]) for group in optimizer.param_groups]
        if self.penalty.needs_step_size and len(set(rates)) > 1:
            self.warn_once(
                "rates",
                "PenaltyCallback: the param groups now have different learning "
                f"rates {sorted(set(rates))}; the first group's is used.",
            )
        return rates[0]

    @staticmethod
    def _add_gradient(
        objective: ProbeObjective, pl_module: pl.LightningModule, gradient: Tensor
    ) -> None:
        parameters = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, piece in zip(
                objective.names, objective.split(gradient), strict=True
            ):
                parameter = parameters[name]
                piece = piece.to(dtype=parameter.dtype, device=parameter.device)
                if parameter.grad is None:
                    parameter.grad = piece.clone()
                else:
                    parameter.grad.add_(piece)

    def _record(self, trainer: pl.Trainer, result: PenaltyResult, added: bool) -> None:
        step = trainer.global_step
        norm = result.gradient_norm
        self.history.append(
            PenaltyRecord(
                step,
                result.value,
                norm,
                added,
                dict(result.metrics),
                result.num_products,
                result.num_third_order,
            )
        )
        if step % self.every_n_steps != 0:
            return
        prefix = f"penalty/{self.penalty.name}"
        metrics = {
            f"{prefix}/value": result.value,
            f"{prefix}/gradient_norm": norm,
            f"{prefix}/hvps": float(result.num_products),
            **{f"{prefix}/{key}": value for key, value in result.metrics.items()},
        }
        self.log_metrics(trainer, metrics)


def _as_float(value: object) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)
