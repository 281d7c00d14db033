"""Sharpness-aware minimization (SAM) and its adaptive form (ASAM)."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import LBFGS, Optimizer

from lightning_eos._validation import check_bool, check_choice, check_number
from lightning_eos.curvature.thresholds import StabilityThreshold, stability_threshold
from lightning_eos.optim._base import ClosureOptimizer

Perturb = Literal["all", "weights", "none"]
_PERTURB = ("all", "weights", "none")
#: What ``base_optimizer`` accepts: an optimizer class, or a callable that builds an
#: optimizer from parameters (what a nested ``class_path`` becomes in LightningCLI).
BaseOptimizer = type[Optimizer] | Callable[[Iterable], Optimizer]


class SAM(ClosureOptimizer):
    r"""Sharpness-aware minimization around any base optimizer.

    Each step evaluates the gradient twice, at :math:`\theta` and at the
    perturbed point :math:`\theta + \epsilon`, and hands the second gradient to
    the base optimizer, which steps from :math:`\theta`:

    .. math::
        g = \nabla L(\theta), \qquad
        \epsilon = \rho\, \frac{T^2 g}{\|T g\|}, \qquad
        \theta \leftarrow \mathrm{base}\bigl(\theta, \nabla L(\theta + \epsilon)\bigr),

    with :math:`T = I` for SAM (Foret et al. 2021), so that
    :math:`\epsilon = \rho g/\|g\|`, and :math:`T = \operatorname{diag}(|\theta| +
    \eta_{\mathrm{A}})` for ASAM (``adaptive=True``, Kwon et al. 2021), so that
    :math:`\|T^{-1}\epsilon\| = \rho`. The norm runs over every perturbed tensor
    of every group; each group uses its own ρ. (The ASAM authors' code leaves
    biases unscaled, :math:`T = I` on them; here :math:`T` scales every perturbed
    tensor, and ``perturb="weights"`` leaves biases unperturbed.)

    What the step guarantees, under Lightning's automatic optimization:

    * ``training_step`` runs twice per step; the second pass replays the random
      state of the first, so dropout uses the same mask at :math:`\theta` and
      :math:`\theta+\epsilon`, and BatchNorm running statistics are restored after
      it, so they move once per step, from the clean pass.
    * Only the second pass goes through Lightning's precision wrapper: gradient
      clipping (``Trainer(gradient_clip_val=...)``) and ``on_before_optimizer_step``
      apply once, to :math:`\nabla L(\theta + \epsilon)`, the gradient that makes
      the step; the base optimizer's own weight decay applies to it as well.
      After the step ``.grad`` holds that gradient.
    * The parameter groups *are* the base optimizer's: a learning-rate scheduler
      built on this optimizer drives the learning rate the base optimizer uses,
      and :meth:`load_state_dict` rebinds them after a resume.
    * The values logged by ``training_step`` (``self.log``) come from its last
      call, the perturbed pass: ``train/loss`` is then :math:`L(\theta+\epsilon)`.
      :attr:`last_stats` holds both losses.

    :attr:`last_stats` (logged by
    :class:`~lightning_eos.callbacks.OptimizerStatsLogger`): ``loss`` (at θ),
    ``perturbed_loss`` (at θ + ε), ``grad_norm`` (‖∇L(θ)‖), ``epsilon_norm``
    (‖ε‖, equal to ρ for SAM).

    Unsupported (refused with an error): gradient accumulation; precision
    ``"16-mixed"`` (the GradScaler steps without a closure); strategies that shard
    parameters. Under DDP the perturbation is computed from the synchronized
    gradient, identical on every process (one global ε, not the per-process ε of
    "m-sharpness").

    Args:
        params: The parameters or parameter groups. A group may set its own
            ``rho``, ``adaptive``, ``eta`` and ``perturb``, and the base optimizer's
            options.
        base_optimizer: The optimizer that makes the step: a class (for example
            ``torch.optim.SGD``; in YAML ``base_optimizer: torch.optim.SGD``), or a
            callable building one from parameters (in YAML a nested ``class_path``
            with its ``init_args``). It must step from ``.grad`` without a closure.
        rho: Radius ρ of the perturbation, at least 0 (0 gives the base optimizer).
        adaptive: Use ASAM's scale-invariant perturbation.
        eta: ASAM's :math:`\eta_{\mathrm{A}}`, added to :math:`|\theta|`, at least 0.
        perturb: Which tensors are perturbed: ``"all"``, ``"weights"`` (tensors of
            two or more dimensions: biases and normalization parameters are left
            alone) or ``"none"``.
        lr: The learning rate of a base optimizer given as a class, positive.
            Without it the ``lr`` of ``base_kwargs`` or the base optimizer's own
            default applies; a parameter group's own ``lr`` overrides either.
        base_kwargs: Further arguments of a base optimizer given as a class (for
            example ``{"momentum": 0.9, "weight_decay": 5e-4}``).

    Raises:
        ValueError: If ``rho`` or ``eta`` is negative, ``lr`` is not positive,
            ``adaptive`` is not a bool, ``perturb`` is unknown, the base optimizer is
            not an optimizer that steps without a closure, or the learning rate is
            given twice.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> def closure():
        ...     optimizer.zero_grad()
        ...     loss = model(torch.ones(4, 3)).pow(2).mean()
        ...     loss.backward()
        ...     return loss
        >>> loss = optimizer.step(closure)
        >>> round(optimizer.last_stats["epsilon_norm"], 6)
        0.05

    References:
        Foret, Kleiner, Mobahi, Neyshabur (2021). Sharpness-aware minimization for
        efficiently improving generalization. ICLR.

        Kwon, Kim, Park, Choi (2021). ASAM: Adaptive sharpness-aware minimization
        for scale-invariant learning of deep neural networks. ICML.

        Long, Bartlett (2024). Sharpness-aware minimization and the edge of
        stability. JMLR.
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: BaseOptimizer = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        perturb: Perturb = "all",
        lr: float | None = None,
        base_kwargs: dict[str, Any] | None = None,
    ) -> None:
        defaults = {
            "rho": check_number("rho", rho, low=0.0),
            "adaptive": check_bool("adaptive", adaptive),
            "eta": check_number("eta", eta, low=0.0),
            "perturb": check_choice("perturb", perturb, _PERTURB),
        }
        if lr is not None:
            check_number("lr", lr, low=0.0, low_open=True)
        super().__init__(params, defaults)
        for group in self.param_groups:
            check_number("rho", group["rho"], low=0.0)
            check_number("eta", group["eta"], low=0.0)
            check_bool("adaptive", group["adaptive"])
            check_choice("perturb", group["perturb"], _PERTURB)
        self.base_optimizer = _build_base(
            base_optimizer, self.param_groups, lr, base_kwargs
        )
        # One list of groups for both: a scheduler stepping this optimizer moves
        # the learning rate the base optimizer reads.
        self.param_groups = self.base_optimizer.param_groups

    # -- the step ----------------------------------------------------------------------

    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None
    ) -> Tensor | None:
        """Take one SAM step; ``closure`` recomputes the loss and its gradient."""
        calls = self._begin(closure)
        loss, _ = calls()
        if loss is None:  # training_step returned None: Lightning skips the step
            calls.close()
            return None

        perturbed, grad_norm, scaled_norm = self._scaled_gradients()
        finite = math.isfinite(scaled_norm) and math.isfinite(grad_norm)
        if not finite:
            self._warn_once(
                "non-finite",
                f"{type(self).__name__}: the gradient is not finite; the step is taken "
                "without perturbation.",
            )
        clean = self._clean_gradients()
        saved: list[tuple[Tensor, Tensor]] = []
        epsilon_sq = 0.0
        if finite and scaled_norm > 0:
            for p, rho, scaled in perturbed:
                epsilon = scaled.mul_(rho / scaled_norm)
                saved.append((p, p.detach().clone()))
                p.add_(epsilon)
                epsilon_sq += float(epsilon.pow(2).sum())

        perturbed_loss, _ = calls(final=True)
        for p, original in saved:
            p.copy_(original)
        if perturbed_loss is not None:
            self._combine(clean)
            self.base_optimizer.step()
        calls.close()

        self.counters["steps"] += 1
        self._global_state()["grad_norm"] = grad_norm
        self.last_stats = {
            "loss": float(loss),
            "perturbed_loss": math.nan
            if perturbed_loss is None
            else float(perturbed_loss),
            "grad_norm": grad_norm,
            "epsilon_norm": math.sqrt(epsilon_sq),
        }
        return loss

    def _scaled_gradients(
        self,
    ) -> tuple[list[tuple[Tensor, float, Tensor]], float, float]:
        """``(param, ρ, T²g)`` for each perturbed tensor; ‖g‖ and ‖Tg‖."""
        perturbed = []
        grad_sq = 0.0
        scaled_sq = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.detach()
                grad_sq += float(g.pow(2).sum())
                if not _is_perturbed(p, group):
                    continue
                if group["adaptive"]:
                    scale = p.detach().abs().add_(group["eta"])
                    tg = g * scale
                    scaled_sq += float(tg.pow(2).sum())
                    perturbed.append((p, group["rho"], tg.mul_(scale)))
                else:
                    scaled_sq += float(g.pow(2).sum())
                    perturbed.append((p, group["rho"], g.clone()))
        return perturbed, math.sqrt(grad_sq), math.sqrt(scaled_sq)

    def _clean_gradients(self) -> list[tuple[Tensor, Tensor]] | None:
        """Copies of the gradients at θ, for variants that combine both passes."""
        return None

    def _combine(self, clean: list[tuple[Tensor, Tensor]] | None) -> None:
        """Turn the perturbed gradient in ``.grad`` into the one that makes the step."""

    # -- threshold ---------------------------------------------------------------------

    def stability_threshold(self) -> StabilityThreshold:
        r"""The SAM-edge of Long and Bartlett (2024) around plain gradient descent.

        On a quadratic, SAM with step η and radius ρ multiplies the component of
        θ along an eigenvector of eigenvalue λ by
        :math:`1 - \eta\lambda(1 + \rho\lambda/\|\nabla L\|)`; it is unstable along
        it when :math:`\eta\lambda(1 + \rho\lambda/\|\nabla L\|) > 2`, that is above

        .. math::
            \lambda^\ast = \frac{\|\nabla L\|}{2\rho}
            \Bigl(\sqrt{1 + \frac{8\rho}{\eta\|\nabla L\|}} - 1\Bigr)
            \le \frac{2}{\eta},

        which tends to 2/η as ρ → 0. The gradient norm is that of the latest clean
        pass (one step old when read before a step); before the first step the
        threshold is 2/η. It is known for SGD without momentum or weight decay and
        the same ρ everywhere, with every tensor perturbed; for momentum, ASAM or
        partial perturbation no threshold is known and ``None`` is returned.
        """
        base = stability_threshold(self.base_optimizer)
        if base.value is None:
            return StabilityThreshold(
                None, reason=f"the base optimizer has no threshold: {base.reason}"
            )
        settings = {
            (g["rho"], g["adaptive"], g["perturb"], g.get("momentum", 0.0))
            for g in self.param_groups
        }
        decay = any(g.get("weight_decay", 0.0) for g in self.param_groups)
        if (
            type(self.base_optimizer) is not torch.optim.SGD
            or len(settings) != 1
            or decay
        ):
            return StabilityThreshold(
                None,
                reason="the SAM-edge is known for one ρ over SGD without weight decay",
            )
        rho, adaptive, perturb, momentum = settings.pop()
        if adaptive or perturb != "all" or momentum:
            return StabilityThreshold(
                None,
                reason=(
                    "no stability threshold is known for SAM with momentum, ASAM or "
                    "a partial perturbation"
                ),
            )
        lr = float(self.param_groups[0]["lr"])
        grad_norm = self._global_state().get("grad_norm")
        if rho == 0 or grad_norm is None:
            return StabilityThreshold(2 / lr, rule="2/η")
        if grad_norm == 0:
            return StabilityThreshold(0.0, rule="SAM-edge at ‖∇L‖ = 0")
        edge = grad_norm / (2 * rho) * (math.sqrt(1 + 8 * rho / (lr * grad_norm)) - 1)
        return StabilityThreshold(edge, rule="SAM-edge (‖∇L‖/2ρ)(√(1+8ρ/(η‖∇L‖))−1)")

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This optimizer's state, with the base optimizer's under ``"base"``."""
        state = super().state_dict()
        state["base"] = self.base_optimizer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load both states and rebind the shared parameter groups."""
        state_dict = dict(state_dict)
        base = state_dict.pop("base")
        self.base_optimizer.load_state_dict(base)
        super().load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer."""
        base = getattr(self, "base_optimizer", None)
        if base is None:
            super().add_param_group(param_group)
            return
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        base.add_param_group(param_group)


def _is_perturbed(p: Tensor, group: dict[str, Any]) -> bool:
    mode = group["perturb"]
    if group["rho"] == 0 or mode == "none":
        return False
    return mode == "all" or p.dim() >= 2


def _build_base(
    base_optimizer: Any,
    groups: list[dict[str, Any]],
    lr: float | None,
    base_kwargs: dict[str, Any] | None,
) -> Optimizer:
    kwargs = dict(base_kwargs or {})
    if isinstance(base_optimizer, str):
        module_name, _, class_name = base_optimizer.rpartition(".")
        try:
            base_optimizer = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(
                f"`base_optimizer` {base_optimizer!r} is not an importable class."
            ) from error
    if isinstance(base_optimizer, type):
        if not issubclass(base_optimizer, Optimizer):
            raise ValueError(
                "`base_optimizer` must be a torch.optim.Optimizer subclass or a "
                f"callable building one, got the class {base_optimizer.__name__}."
            )
        _refuse_closure_optimizer(base_optimizer)
        if lr is not None:
            if "lr" in kwargs:
                raise ValueError(
                    "The learning rate is given twice, as `lr` and in `base_kwargs`; "
                    "give it once."
                )
            kwargs["lr"] = lr
        return base_optimizer(groups, **kwargs)
    if not callable(base_optimizer):
        raise ValueError(
            "`base_optimizer` must be a torch.optim.Optimizer subclass or a callable "
            f"building one, got {base_optimizer!r}."
        )
    if lr is not None or kwargs:
        raise ValueError(
            "With `base_optimizer` given as a callable (a nested class_path), give "
            "its arguments, the learning rate included, inside it, not as `lr` or "
            "`base_kwargs`."
        )
    base = base_optimizer(groups)
    if not isinstance(base, Optimizer):
        raise ValueError(
            "`base_optimizer` must build a torch.optim.Optimizer, but it returned a "
            f"{type(base).__name__}."
        )
    _refuse_closure_optimizer(type(base))
    return base


def _refuse_closure_optimizer(cls: type) -> None:
    if issubclass(cls, (ClosureOptimizer, LBFGS)):
        raise ValueError(
            "`base_optimizer` must step from the gradient in .grad without calling a "
            f"closure; {cls.__name__} needs its own closure."
        )
