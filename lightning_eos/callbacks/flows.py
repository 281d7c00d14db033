"""Gradient flow and the central flow, integrated beside a Lightning run."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_eos._validation import check_int
from lightning_eos.callbacks._base import _DTYPES, CurvatureCallback, _all_reduce
from lightning_eos.curvature.hessian import HessianOperator
from lightning_eos.curvature.lanczos import lanczos, warm_start
from lightning_eos.curvature.objective import ProbeObjective
from lightning_eos.flows._base import FlowRecord, loss_and_gradient
from lightning_eos.flows.central_flow import CentralFlow
from lightning_eos.flows.gradient_flow import GradientFlow
from lightning_eos.flows.rmsprop import (
    PreconditionedHessian,
    RMSPropCentralFlow,
    RMSPropFlow,
)

FlowName = Literal["gradient", "central"]
_PREFIX = {"gradient": "gradient_flow", "central": "central_flow"}
#: A probe set this large takes the whole training set.
_EVERYTHING = 2**62


@dataclass
class FlowMonitorRecord:
    """One step of :class:`FlowMonitor`.

    Attributes:
        step: The optimizer step; the flows are at time ``step``.
        lr: The learning rate of the step that led here.
        threshold: The stability threshold of the flows' sharpness (2/η, or 2
            on λ₁(P⁻¹H) for RMSProp).
        gd_loss: Gradient descent's loss on the probe set.
        gd_loss_average: Its mean over the last ``average_window`` steps.
        gd_gradient_norm_sq: ‖∇L‖² at gradient descent's point.
        gd_sharpness: λ₁ at gradient descent's point, when measured this step.
        flows: Each flow's :class:`~lightning_eos.flows.FlowRecord`.
        distances: ‖θ_GD − θ_flow‖ / ‖θ_GD − θ₀‖ for each flow (from step 1).
    """

    step: int
    lr: float
    threshold: float
    gd_loss: float
    gd_loss_average: float
    gd_gradient_norm_sq: float
    gd_sharpness: float | None
    flows: dict[str, FlowRecord] = field(default_factory=dict)
    distances: dict[str, float] = field(default_factory=dict)


class FlowMonitor(CurvatureCallback):
    r"""Integrate gradient flow and the central flow beside gradient descent.

    From the run's own initialization :math:`\theta_0`, the chosen flows are
    integrated on the probe set's loss :math:`L` with the learning rate of each step,
    one unit of flow time per optimizer step (see :class:`~lightning_eos.flows.
    GradientFlow` and :class:`~lightning_eos.flows.CentralFlow`). After every step
    the callback logs, at ``step=trainer.global_step`` on every logger:

    * ``gd/loss``, ``gd/loss_average`` (mean over the last ``average_window``
      steps), ``gd/gradient_norm_sq`` and its mean ``gd/gradient_norm_sq_average``,
      and ``gd/sharpness`` every ``sharpness_every_n_steps`` steps: gradient
      descent's own quantities on the probe set;
    * for each flow, under ``gradient_flow/`` or ``central_flow/``: ``loss``,
      ``sharpness``, ``distance`` (:math:`\|\theta_{GD} - \theta_{flow}\| /
      \|\theta_{GD} - \theta_0\|`) and its cost: ``seconds``, ``gradients``,
      ``hvps``, ``third_order``, ``substeps``;
    * for the central flow, its predictions ``loss_average`` (time-averaged loss,
      :math:`L + \operatorname{tr}\Sigma/\eta`), ``gradient_norm_sq_average``
      (:math:`\|\nabla L\|^2 + \operatorname{tr}(H\Sigma H)`), ``variance_1`` (the
      largest oscillation variance), ``sigma_trace``, ``critical`` (the rank of Σ)
      and ``candidates``;
    * ``flows/threshold``, :math:`2/\eta` (2 for RMSProp).

    With TensorBoard, Custom Scalars charts group them, and a figure (loss,
    sharpness, distances, critical directions by step; see
    :func:`comparison_figure`) is added under ``flows/comparison`` at the end of
    training and every ``figure_every_n_steps`` steps. Every step is appended to
    :attr:`history`.

    What is modelled. Both flows model full-batch gradient descent on the probe
    set's loss: ``torch.optim.SGD`` without momentum, weight decay, Nesterov or
    ``maximize``, with one learning rate for all parameter groups (a scheduler may
    change it between steps). With ``torch.optim.RMSprop`` (without momentum,
    centring, weight decay or ``maximize``) they are RMSProp's stable flow and
    central flow (:class:`~lightning_eos.flows.RMSPropFlow`,
    :class:`~lightning_eos.flows.RMSPropCentralFlow`), the sharpness is that of
    :math:`P^{-1}H` and the threshold is 2; :math:`\nu(0)` is the average of the
    optimizer's first step. Any other optimizer is refused when fitting starts, as
    is gradient clipping. Training on minibatches, or on more data than the probe
    set, is allowed with a warning: the flows then model full-batch descent on the
    probe set, not the run. The central flow needs third derivatives, which
    PyTorch's fused LayerNorm, InstanceNorm and BatchNorm (train mode) get wrong:
    the flows evaluate those layers in plain tensor operations
    (``ProbeObjective(normalization="plain")``), the same function with exact
    derivatives. Dropout in train mode is refused: the flows need one
    deterministic loss.

    Training is not disturbed: the flows and the measurements work on copies of
    the parameters (:class:`~lightning_eos.curvature.ProbeObjective`), draw their
    random numbers from their own generators, and never touch ``.grad``, the
    optimizer or the buffers; a run is bit-identical with and without the callback.
    The flows, θ₀ and the history are saved in checkpoints, and a resumed run
    continues the integration exactly. A flow whose complementarity problem has no
    solution stops (its values are NaN from then on) with one warning.

    Cost. On the digits MLP, see ``benchmarks/central_flow_digits.py``: the
    central flow costs ``substeps`` gradients per step below the threshold (RK4) and,
    near it, ``substeps`` gradients plus a warm-started eigensolve and
    :math:`k(k+1)/2` third-order vectors per refresh.

    Args:
        flows: Which flows to integrate: ``"gradient"`` and/or ``"central"``.
        probe_size: Examples of the loss; ``None`` for the whole training set (the
            loss gradient descent sees in a full-batch run).
        chunk_size: Examples per chunk; ``None`` for one chunk (fastest: every
            product at a point reuses one graph).
        substeps: Euler substeps per step of the central flow near the threshold.
        refresh_every: Substeps between refreshes of the central flow's eigenvectors
            and third-order vectors (``None``: once per step).
        margin: Relative distance to :math:`2/\eta` within which an eigenvalue is a
            candidate of the central flow.
        method: ``"rk4"`` or ``"euler"`` for gradient flow (and the central flow
            away from the threshold).
        substep_bound: Largest :math:`h\eta\lambda_1` of a substep.
        tol: Relative residual tolerance of the eigensolves that only find
            :math:`\lambda_1` (gradient flow, gradient descent, the central flow
            away from the threshold).
        candidate_tol: The tolerance of the central flow's eigensolves once
            eigenvalues are near :math:`2/\eta`.
        max_substeps: Most substeps per step of either flow (``substep_bound``
            sets how many a stiff flow needs); beyond, the flow stops with a
            warning and logs NaN.
        max_critical: Most candidate directions of the central flow; beyond, it
            stops with a warning and logs NaN (far above the edge, where the
            complementarity problem would take minutes per step).
        max_iter: Most Lanczos steps per eigensolve.
        average_window: Steps in gradient descent's running mean, at least 1.
        sharpness_every_n_steps: How often gradient descent's own λ₁ is measured
            (``None``: never).
        figure_every_n_steps: How often the figure is added to TensorBoard besides
            the end of training (``None``: only at the end).
        loss_fn: ``loss_fn(module(inputs), targets)``; ``None`` to use the module's
            ``curvature_loss(batch)``.
        mode: ``"train"`` or ``"eval"``: the mode of every layer in the flows' loss.
        dtype: ``"float64"`` to integrate a float32 model's flows in double
            precision, ``"float32"``, or ``None`` for the parameters' own type.
        seed: Seed of the probe set and the eigensolvers' start vectors, in
            ``[0, 2**32 - 1]``.

    Raises:
        ValueError: At construction, for an argument outside its range.
        MisconfigurationException: When fitting starts, for an optimizer the flows
            do not model, gradient clipping, or a model they cannot differentiate.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_eos.callbacks import FlowMonitor
        >>> monitor = FlowMonitor(flows=("gradient", "central"), dtype="float64")
        >>> trainer = Trainer(callbacks=[monitor], max_steps=700)  # doctest: +SKIP

    References:
        Cohen, Damian, Talwalkar, Kolter, Lee (2025). Understanding optimization in
        deep learning with central flows. ICLR.
    """

    def __init__(
        self,
        flows: Sequence[FlowName] = ("gradient", "central"),
        probe_size: int | None = None,
        chunk_size: int | None = None,
        substeps: int = 4,
        refresh_every: int | None = None,
        margin: float = 0.01,
        method: Literal["rk4", "euler"] = "rk4",
        substep_bound: float = 1.0,
        tol: float = 1e-2,
        candidate_tol: float = 1e-3,
        max_critical: int = 20,
        max_substeps: int = 256,
        max_iter: int = 100,
        average_window: int = 20,
        sharpness_every_n_steps: int | None = 1,
        figure_every_n_steps: int | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        mode: Literal["train", "eval"] = "train",
        dtype: Literal["float32", "float64"] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            1,
            _EVERYTHING if probe_size is None else probe_size,
            _EVERYTHING if chunk_size is None else chunk_size,
            loss_fn,
            mode,
            dtype,
            seed,
        )
        try:
            names = (flows,) if isinstance(flows, str) else tuple(flows)
        except TypeError:
            names = ()
        if (
            not names
            or any(n not in _PREFIX for n in names)
            or len(set(names)) < len(names)
        ):
            raise ValueError(
                "`flows` must be a non-empty selection of 'gradient' and 'central' "
                f"without repetition, got {flows!r}."
            )
        self.flow_names: tuple[str, ...] = names
        self.average_window = check_int("average_window", average_window)
        for name, value in (
            ("sharpness_every_n_steps", sharpness_every_n_steps),
            ("figure_every_n_steps", figure_every_n_steps),
        ):
            if value is not None:
                check_int(name, value)
        self.sharpness_every_n_steps = sharpness_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self.flow_options = {
            "method": method,
            "substep_bound": substep_bound,
            "tol": tol,
            "max_iter": max_iter,
            "seed": seed,
            "max_substeps": max_substeps,
        }
        self.central_options = {
            "substeps": substeps,
            "refresh_every": refresh_every,
            "candidate_tol": candidate_tol,
            "margin": margin,
            "max_critical": max_critical,
        }
        _check_flow_settings(self.flow_options, self.central_options)
        self.history: list[FlowMonitorRecord] = []
        self.flows: dict[str, GradientFlow | CentralFlow] = {}
        self._objective: ProbeObjective | None = None
        self._theta0: Tensor | None = None
        self._restored: dict[str, Any] | None = None
        self._losses: deque[float] = deque(maxlen=self.average_window)
        self._norms: deque[float] = deque(maxlen=self.average_window)
        self._gd_vectors: Tensor | None = None
        self._lr: float | None = None
        self._optimizer: dict[str, Any] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(flows=self.flow_names)

    # -- checks ----------------------------------------------------------------------

    @override
    def setup(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise MisconfigurationException(
                "FlowMonitor models plain gradient descent, but the Trainer clips "
                f"gradients (gradient_clip_val={trainer.gradient_clip_val}). Remove "
                "the clipping."
            )
        if self.mode == "train":
            for module in pl_module.modules():
                if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                    raise MisconfigurationException(
                        "FlowMonitor: dropout in train mode makes the loss random; "
                        "the flows need one deterministic loss. Use mode='eval'."
                    )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise MisconfigurationException(
                f"FlowMonitor models one optimizer; the run has {len(optimizers)}."
            )
        self._optimizer = _optimizer_model(optimizers[0])
        self._lr = self._optimizer["lr"]

    # -- hooks -----------------------------------------------------------------------

    @override
    def on_train_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        self.add_charts(
            trainer,
            "flows",
            {
                "loss: gradient descent and the flows": [
                    "gd/loss",
                    "gd/loss_average",
                    r"(gradient|central)_flow/loss$",
                    "central_flow/loss_average",
                ],
                "sharpness and 2/η": [
                    "gd/sharpness",
                    r"(gradient|central)_flow/sharpness",
                    "flows/threshold",
                ],
                "distance to gradient descent, relative": [r".*_flow/distance"],
            },
        )
        if trainer.num_training_batches not in (1, float("inf")) or (
            trainer.accumulate_grad_batches != 1
        ):
            self.warn_once(
                "minibatch",
                "FlowMonitor: the run takes several batches per step or epoch; the "
                "flows model full-batch gradient descent on the probe set, not this "
                "run.",
            )
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Read before the step: a per-step scheduler moves it before the batch ends.
        self._lr = _optimizer_model(trainer.optimizers[0])["lr"]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._add_figure(trainer)

    # -- the measurement -------------------------------------------------------------

    @override
    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        with torch.enable_grad():
            return self._measure_flows(trainer, pl_module)

    def _measure_flows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]:
        step = trainer.global_step
        assert self._lr is not None
        objective = self._build(trainer, pl_module)
        theta = objective.point()
        assert self._theta0 is not None

        # Gradient descent's own quantities.
        sharpness = None
        every = self.sharpness_every_n_steps
        if every is not None and step % every == 0:
            operator = HessianOperator(objective, point=theta)
            result = lanczos(
                self._curvature(operator, trainer),
                1,
                tol=self.flow_options["tol"],
                max_iter=self.flow_options["max_iter"],
                init=warm_start(self._gd_vectors, operator.dim),
                block_size=2,
                generator=self.generator,
                extra=1,
            )
            if result.finite:
                self._gd_vectors = torch.cat(
                    [result.eigenvectors, result.extra_vectors]
                )
            sharpness = float(result.eigenvalues[0])
            loss, gradient = operator.loss(), operator.gradient()
        else:
            loss, gradient = loss_and_gradient(objective, theta)
        norm_sq = float(gradient.square().sum())
        self._losses.append(loss)
        self._norms.append(norm_sq)
        record = FlowMonitorRecord(
            step=step,
            lr=self._lr,
            threshold=self._threshold(),
            gd_loss=loss,
            gd_loss_average=sum(self._losses) / len(self._losses),
            gd_gradient_norm_sq=norm_sq,
            gd_sharpness=sharpness,
        )
        metrics = {
            "gd/loss": loss,
            "gd/loss_average": record.gd_loss_average,
            "gd/gradient_norm_sq": norm_sq,
            "gd/gradient_norm_sq_average": sum(self._norms) / len(self._norms),
            "flows/threshold": self._threshold(),
        }
        if sharpness is not None:
            metrics["gd/sharpness"] = sharpness

        # The flows, brought to time `step`.
        travelled = float((theta - self._theta0).norm())
        for name, flow in self.flows.items():
            # While the central flow is gradient flow, it is integrated only once.
            companion = self.flows.get("gradient")
            if not (
                isinstance(flow, CentralFlow)
                and companion is not None
                and flow.adopt(companion)
            ):
                while flow.time < step - 1e-9:
                    flow.advance(1.0, lr=self._lr)
            flow_record = flow.observe()
            if flow.failed is not None:
                self.warn_once(
                    f"failed-{name}",
                    f"FlowMonitor: the {_PREFIX[name].replace('_', ' ')} stopped "
                    f"{flow.failed}; its values are NaN from then on.",
                )
            record.flows[name] = flow_record
            prefix = _PREFIX[name]
            if step > 0:
                gap = float((theta - flow.theta).norm())
                record.distances[name] = gap / travelled if travelled > 0 else math.nan
                metrics[f"{prefix}/distance"] = record.distances[name]
            metrics.update(_flow_metrics(prefix, flow_record, failed=flow.failed))
        self.history.append(record)

        every = self.figure_every_n_steps
        if every is not None and step > 0 and step % every == 0:
            self._add_figure(trainer)
        return metrics

    def _build(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> ProbeObjective:
        """The probe loss and the flows, built once (from a checkpoint if resumed)."""
        self.check_layer_modes(pl_module)
        if self._objective is not None:
            trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
            if trainable != self._objective.names:
                self.warn_once(
                    "trainable-changed",
                    "FlowMonitor: the module's trainable parameters changed at step "
                    f"{trainer.global_step}; the flows go on in the parameters that "
                    "were trainable when they started, so from here on they model "
                    "a run without the change, and their distances to this run and "
                    "gd/ quantities are over those parameters.",
                )
            return self._objective
        assert self.probe is not None
        if self.loss_fn is not None:
            loss = {"loss_fn": self.loss_fn}
        else:
            loss = {"batch_loss": lambda module, batch: module.curvature_loss(batch)}
        objective = ProbeObjective(
            pl_module,
            self.probe.chunks,
            **loss,
            dtype=_DTYPES[self.dtype] if self.dtype else None,
            train_mode=self.mode == "train",
            seed=self.seed,
            # The central flow differentiates the loss three times: PyTorch's fused
            # layer, instance and batch (train mode) normalization get that wrong.
            normalization="plain" if "central" in self.flow_names else "native",
            all_reduce=_all_reduce(trainer),
        )
        restored = self._restored or {}
        theta0 = restored.get("theta0")
        self._theta0 = (
            objective.point()
            if theta0 is None
            else theta0.to(device=objective.device, dtype=objective.dtype)
        )
        extra: dict[str, Any] = {}
        classes: tuple[type, type] = (GradientFlow, CentralFlow)
        if self._optimizer["kind"] == "rmsprop":
            classes = (RMSPropFlow, RMSPropCentralFlow)
            extra = {
                "alpha": self._optimizer["alpha"],
                "eps": self._optimizer["eps"],
                "nu": self._initial_average(objective, trainer),
            }
        for name in sorted(self.flow_names, key=["gradient", "central"].index):
            options = {**self.flow_options, **extra}
            if name == "central":
                options.update(self.central_options)
            flow_class = classes[0] if name == "gradient" else classes[1]
            flow = flow_class(objective, self._theta0, self._lr, **options)
            if name in restored.get("flows", {}):
                flow.load_state_dict(restored["flows"][name])
            elif trainer.global_step > 0:
                # Added to a run that had already started: its initialization is
                # gone, so the flows start here.
                flow.time = float(trainer.global_step)
                self.warn_once(
                    "late-start",
                    "FlowMonitor starts at step "
                    f"{trainer.global_step}, not at the run's initialization (the "
                    "checkpoint has no flows): the flows and the distances start "
                    "from the current parameters.",
                )
            self.flows[name] = flow
        self._objective = objective
        return objective

    def _threshold(self) -> float:
        """2/η on λ₁(H) for gradient descent; 2 on λ₁(P⁻¹H) for RMSProp."""
        assert self._lr is not None
        return 2.0 if self._optimizer.get("kind") == "rmsprop" else 2.0 / self._lr

    def _curvature(self, operator: HessianOperator, trainer: pl.Trainer) -> Any:
        """H, or RMSProp's P^{-1/2} H P^{-1/2} for its next step.

        RMSProp's next step uses the average ``α·square_avg + (1 − α)·∇L(θ)^⊙2``,
        which includes the gradient at the current point.
        """
        if self._optimizer.get("kind") != "rmsprop":
            return operator
        alpha = self._optimizer["alpha"]
        average = alpha * self._optimizer_average(operator.objective, trainer)
        average = average + (1.0 - alpha) * operator.gradient().square()
        preconditioner = (average.sqrt() + self._optimizer["eps"]) / self._lr
        return PreconditionedHessian(operator, preconditioner.rsqrt())

    @staticmethod
    def _optimizer_average(objective: ProbeObjective, trainer: pl.Trainer) -> Tensor:
        """RMSProp's ``square_avg`` in the flows' order (zeros where it has none)."""
        optimizer = trainer.optimizers[0]
        parameters = dict(objective.module.named_parameters())
        pieces = []
        for name in objective.names:
            average = optimizer.state.get(parameters[name], {}).get("square_avg")
            piece = (
                torch.zeros(parameters[name].numel())
                if average is None
                else average.detach().reshape(-1)
            )
            pieces.append(piece.to(device=objective.device, dtype=objective.dtype))
        return torch.cat(pieces)

    def _initial_average(
        self, objective: ProbeObjective, trainer: pl.Trainer
    ) -> Tensor:
        """ν(0) = α·(RMSProp's average so far) + (1 − α)·∇L(θ₀)^⊙2: its first step's."""
        assert self._theta0 is not None
        alpha = self._optimizer["alpha"]
        average = self._optimizer_average(objective, trainer)
        gradient = loss_and_gradient(objective, self._theta0)[1]
        return alpha * average + (1.0 - alpha) * gradient.square()

    def _add_figure(self, trainer: pl.Trainer) -> None:
        loggers = [
            logger
            for logger in trainer.loggers
            if isinstance(logger, TensorBoardLogger) and trainer.global_rank == 0
        ]
        if not loggers or not self.history:
            return
        try:
            from lightning_eos.callbacks._flow_figure import comparison_figure

            figure = comparison_figure(self.history)
        except ImportError:
            self.warn_once(
                "matplotlib",
                "FlowMonitor draws its figure with matplotlib, which is not "
                "installed; the scalars are logged without it.",
            )
            return
        for logger in loggers:
            logger.experiment.add_figure(
                "flows/comparison", figure, global_step=trainer.global_step
            )

    # -- checkpoint state -------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        flows = {name: flow.state_dict() for name, flow in self.flows.items()}
        if not flows and self._restored is not None:
            flows = self._restored.get("flows", {})
        theta0 = self._theta0
        if theta0 is None and self._restored is not None:
            theta0 = self._restored.get("theta0")
        state.update(
            theta0=None if theta0 is None else theta0.cpu(),
            flows=flows,
            history=[_record_to_dict(r) for r in self.history],
            losses=list(self._losses),
            norms=list(self._norms),
            gd_vectors=None if self._gd_vectors is None else self._gd_vectors.cpu(),
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._restored = {"theta0": state_dict["theta0"], "flows": state_dict["flows"]}
        self.history = [_record_from_dict(r) for r in state_dict["history"]]
        self._losses = deque(state_dict["losses"], maxlen=self.average_window)
        self._norms = deque(state_dict["norms"], maxlen=self.average_window)
        self._gd_vectors = state_dict["gd_vectors"]
        self._objective = None
        self.flows = {}


def _optimizer_model(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What the flows need of the optimizer, or a clear refusal.

    Gradient descent: ``torch.optim.SGD`` without momentum, weight decay, Nesterov or
    ``maximize``. RMSProp: ``torch.optim.RMSprop`` without momentum, centring,
    weight decay or ``maximize``. One learning rate (and α, ε) for all groups.
    """
    name = type(optimizer).__name__
    if type(optimizer) is torch.optim.SGD:
        kind, false, shared = "gd", ("nesterov", "maximize"), ("lr",)
    elif type(optimizer) is torch.optim.RMSprop:
        kind, false, shared = (
            "rmsprop",
            ("centered", "maximize"),
            ("lr", "alpha", "eps"),
        )
    else:
        raise MisconfigurationException(
            "FlowMonitor models gradient descent (torch.optim.SGD without momentum) "
            f"and RMSProp (torch.optim.RMSprop without momentum), not {name}."
        )
    values: dict[str, set[float]] = {key: set() for key in shared}
    for group in optimizer.param_groups:
        for key in ("momentum", "weight_decay"):
            if float(group.get(key, 0.0)):
                raise MisconfigurationException(
                    f"FlowMonitor models plain {name}; it has {key}={group[key]}. "
                    f"Use {key}=0."
                )
        for key in false:
            if group.get(key, False):
                raise MisconfigurationException(
                    f"FlowMonitor models plain {name}; it has {key}=True."
                )
        for key in shared:
            value = group[key]
            values[key].add(float(value.item()) if isinstance(value, Tensor) else value)
    for key, found in values.items():
        if len(found) != 1:
            raise MisconfigurationException(
                f"FlowMonitor needs one {key} for all parameter groups; got "
                f"{sorted(found)}."
            )
    model = {"kind": kind, **{key: float(found.pop()) for key, found in values.items()}}
    if not model["lr"] > 0:
        raise MisconfigurationException(
            f"FlowMonitor needs a positive learning rate; got lr={model['lr']}."
        )
    return model


def _check_flow_settings(options: dict[str, Any], central: dict[str, Any]) -> None:
    """Run the flows' own argument checks at construction (on a one-weight model).

    The weight is set, not drawn: the global random stream must not move.
    """
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(1))
    objective = ProbeObjective(
        module,
        [torch.zeros(1)],
        batch_loss=lambda model, batch: (model.weight**2).sum(),
    )
    point = objective.point()
    GradientFlow(objective, point, 1.0, **options)
    CentralFlow(objective, point, 1.0, **options, **central)


def _flow_metrics(
    prefix: str, record: FlowRecord, failed: str | None
) -> dict[str, float]:
    nan = math.nan
    metrics = {
        f"{prefix}/loss": record.loss if failed is None else nan,
        f"{prefix}/sharpness": record.sharpness if failed is None else nan,
        f"{prefix}/gradient_norm_sq": record.gradient_norm_sq,
        f"{prefix}/seconds": record.seconds,
        f"{prefix}/gradients": float(record.gradients),
        f"{prefix}/hvps": float(record.products),
        f"{prefix}/substeps": float(record.substeps),
    }
    if prefix == "central_flow":
        metrics.update(
            {
                f"{prefix}/loss_average": record.loss_average,
                f"{prefix}/gradient_norm_sq_average": record.gradient_norm_sq_average,
                f"{prefix}/variance_1": record.variances[0]
                if record.variances
                else 0.0,
                f"{prefix}/sigma_trace": sum(record.variances),
                f"{prefix}/critical": float(record.critical),
                f"{prefix}/candidates": float(record.candidates),
                f"{prefix}/third_order": float(record.third_order),
            }
        )
    return metrics


def _record_to_dict(record: FlowMonitorRecord) -> dict[str, Any]:
    return asdict(record)


def _record_from_dict(data: dict[str, Any]) -> FlowMonitorRecord:
    flows = {name: FlowRecord(**values) for name, values in data["flows"].items()}
    return FlowMonitorRecord(**{**data, "flows": flows})
