"""What the closure optimizers share: counters, flat vectors, curvature."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_eos.curvature.objective import probing
from lightning_eos.curvature.thresholds import StabilityThreshold
from lightning_eos.optim._closure import (
    BackwardRequest,
    ClosureCalls,
    check_trainer,
    split_lightning_closure,
)

HessianProducts = Literal["exact", "finite_difference"]
_COUNTERS = ("steps", "gradients", "losses", "hvps", "third_order")


class ClosureOptimizer(Optimizer):
    """Base of the optimizers that call the training closure several times a step.

    Subclasses implement ``step(closure)``; they get the closure calls from
    :meth:`_begin`, which checks the Lightning setting first. The counters of
    closure calls and products live in the optimizer state, so they are saved in
    checkpoints; :attr:`last_stats` holds the diagnostics of the latest step.
    """

    #: Whether the optimizer uses curvature (refused under data parallelism and
    #: with gradient clipping).
    second_order: ClassVar[bool] = False

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)
        self.last_stats: dict[str, float] = {}
        self._module: nn.Module | None = None
        self._warned: set[str] = set()
        #: Called after every closure call that computes a gradient outside
        #: Lightning's wrapper (see :class:`ClosureCalls`).
        self.gradient_hooks: list[Callable[[], None]] = []

    # -- public ------------------------------------------------------------------------

    def attach(self, module: nn.Module) -> ClosureOptimizer:
        """Name the module trained, for use outside Lightning.

        Under Lightning the module is found from the closure. Outside it, attach
        the module so that its normalization statistics move once per step (and,
        for Gauss-Newton curvature, so that its outputs can be read).

        Returns:
            The optimizer itself.
        """
        self._module = module
        return self

    def check_trainer(self, trainer: pl.Trainer) -> None:
        """Refuse a Trainer setting this optimizer cannot serve (see the class)."""
        check_trainer(trainer, type(self).__name__, second_order=self.second_order)

    @property
    def counters(self) -> dict[str, int]:
        """Cumulative counts of steps, closure calls and products.

        ``steps``; ``gradients``, closure calls with a backward pass; ``losses``,
        closure calls whose backward pass was skipped; ``hvps``, curvature-vector
        products (Hessian or Gauss-Newton); ``third_order`` products.
        """
        state = self._global_state()
        if "counters" not in state:
            state["counters"] = dict.fromkeys(_COUNTERS, 0)
        return state["counters"]

    def stability_threshold(self) -> StabilityThreshold:
        """The threshold on the sharpness; none for a curvature-aware step.

        A Newton-type step rescales every eigendirection of the Hessian by its own
        curvature, so no bound on the largest eigenvalue decides its stability.
        """
        return StabilityThreshold(
            None,
            reason=(
                f"{type(self).__name__} rescales each direction by its curvature: "
                "its stability is not decided by the largest Hessian eigenvalue"
            ),
        )

    # -- services for subclasses -------------------------------------------------------

    def _begin(self, closure: Callable[[], Any] | None) -> ClosureCalls:
        name = type(self).__name__
        if closure is None:
            raise RuntimeError(
                f"{name}.step() needs a closure that recomputes the loss and its "
                "gradient, and got none. Lightning calls step() without one under "
                "precision='16-mixed' (a GradScaler steps the optimizer itself) and "
                "with DeepSpeed; use precision='32-true', '64-true' or 'bf16-mixed' "
                "and a single device or DDP."
            )
        module = self._module
        _, lightning_module = split_lightning_closure(closure)
        if lightning_module is not None:
            trainer = lightning_module._trainer
            if trainer is not None:
                self.check_trainer(trainer)
        return ClosureCalls(closure, module, self.counters, self.gradient_hooks)

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _global_state(self) -> dict[str, Any]:
        return self.state[self.param_groups[0]["params"][0]]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)


def flatten(tensors: Iterable[Tensor | None], like: list[Tensor]) -> Tensor:
    """Concatenate parameter-shaped tensors (``None`` is zero) into a flat vector."""
    pieces = [
        (t if t is not None else torch.zeros_like(p)).reshape(-1)
        for t, p in zip(tensors, like, strict=True)
    ]
    return torch.cat(pieces)


def split(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Views of a flat vector shaped like ``like``."""
    pieces = torch.split(flat, [p.numel() for p in like])
    return [piece.view_as(p) for piece, p in zip(pieces, like, strict=True)]


def write(params: list[Tensor], flat: Tensor) -> None:
    """Copy a flat vector into the parameters."""
    with torch.no_grad():
        for p, piece in zip(params, split(flat, params), strict=True):
            p.copy_(piece)


class Derivatives:
    r"""The loss, gradient and Hessian-vector products at the step's starting point.

    The first closure call (the one whose gradient makes the step, through
    Lightning's wrapper) computes the loss and gradient. Hessian-vector products
    are then

    * ``"exact"``: differentiated from the gradient's graph, which the module's
      backward pass builds on request (:func:`backward_with_graph`); one
      double-backward pass each, exact up to round-off;
    * ``"finite_difference"``: :math:`(\nabla L(\theta + hv) - \nabla L(\theta))/h`
      with :math:`h = \\delta \max(1, \|\theta\|)/\|v\|`, one closure call each.
      The error is :math:`\tfrac{h}{2}\nabla^3 L[v, v] + O(h^2)` (exactly
      :math:`\tfrac{h}{2}\nabla^3 L[v, v]` for a cubic loss) plus a round-off of
      about :math:`\epsilon_{\mathrm{mach}}\|\nabla L\|/h`.

    When a callback added a term :math:`P` to the objective during the first call
    (:class:`~lightning_eos.penalties.PenaltyCallback` with a second-order
    optimizer), the loss, the gradient and the products are those of
    :math:`L + P`, and :attr:`added_gradient` is :math:`\nabla P` alone.

    Args:
        optimizer: The optimizer (its counters are updated).
        calls: The closure calls of this step.
        products: ``"exact"`` or ``"finite_difference"``.
        fd_step: :math:`\\delta` above.
        graph: Build the gradient's graph even without exact products (for
            Gauss-Newton products, which differentiate the outputs).
    """

    def __init__(
        self,
        optimizer: ClosureOptimizer,
        calls: ClosureCalls,
        products: HessianProducts,
        fd_step: float = 1e-4,
        graph: bool = False,
        capture: nn.Module | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.calls = calls
        self.products = products
        self.fd_step = fd_step
        self.params = [p for p in optimizer._parameters() if p.requires_grad]
        want_graph = graph or products == "exact"
        self.outputs: list[Any] = []
        #: Whether the module's outputs are recorded (Gauss-Newton curvature, which
        #: has no finite-difference form).
        self.capture = capture is not None
        handle = None
        if capture is not None:
            handle = capture.register_forward_hook(self._record_output)
        try:
            loss, request = calls(
                final=True, backward="graph" if want_graph else "plain"
            )
        finally:
            if handle is not None:
                handle.remove()
        self.request: BackwardRequest = request
        self.loss = loss
        self.point = flatten([p.detach() for p in self.params], self.params)
        self._grads = [p.grad for p in self.params]
        self.gradient = flatten(
            [g.detach() if g is not None else None for g in self._grads], self.params
        )
        self.added_gradient = self._added_gradient(request)
        if want_graph and loss is not None:
            self._check_graph(request)
        self._live = [i for i, g in enumerate(self._grads) if _has_graph(g)]

    @property
    def graph_gradient(self) -> list[Tensor | None]:
        """The gradient at the starting point with its graph (exact mode only)."""
        return list(self._grads)

    @property
    def finite(self) -> bool:
        """Whether the loss and the gradient are finite."""
        return (
            self.loss is not None
            and bool(torch.isfinite(self.loss).all())
            and bool(torch.isfinite(self.gradient).all())
        )

    def hvp(self, vector: Tensor) -> Tensor:
        """The product of the Hessian at the starting point with a flat vector."""
        self.optimizer.counters["hvps"] += 1
        if self.products == "finite_difference":
            return self._finite_difference(vector)
        if not self._live:
            return torch.zeros_like(vector)
        pieces = split(vector, self.params)
        with torch.enable_grad():
            products = torch.autograd.grad(
                [self._grads[i] for i in self._live],
                self.params,
                grad_outputs=[pieces[i] for i in self._live],
                retain_graph=True,
                allow_unused=True,
            )
        return flatten(products, self.params)

    def loss_at(self, flat_point: Tensor) -> float:
        """The loss at another point (a line-search trial); parameters restored."""
        write(self.params, flat_point)
        try:
            loss, _ = self.calls(backward="skip")
        finally:
            write(self.params, self.point)
        return math.nan if loss is None else float(loss)

    def release(self, gradient: Tensor | None = None) -> None:
        """Drop the gradient's graph and close the step's closure calls.

        ``gradient`` (default: the gradient at the starting point) is left in
        ``.grad``, without graph.
        """
        gradient = self.gradient if gradient is None else gradient
        for p, piece in zip(self.params, split(gradient, self.params), strict=True):
            p.grad = piece.clone()
        self._grads = []
        self.calls.close()

    # -- internals ---------------------------------------------------------------------

    def _record_output(self, module: nn.Module, args: Any, output: Any) -> None:
        """Keep the outputs of training_step's forward call.

        Forward calls of a :class:`~lightning_eos.curvature.ProbeObjective` (a
        penalty evaluated on copies of the parameters, in the closure or in a
        callback) are not the outputs of the loss.
        """
        if not probing():
            self.outputs.append(output)

    def _added_gradient(self, request: BackwardRequest) -> Tensor | None:
        """The gradient of the terms a callback added to the objective, flat."""
        if not request.added_gradients:
            return None
        index = {id(p): i for i, p in enumerate(self.params)}
        pieces: list[Tensor | None] = [None] * len(self.params)
        for parameter, piece in request.added_gradients:
            i = index.get(id(parameter))
            if i is None:
                continue
            piece = piece.detach().to(self.params[i])
            pieces[i] = piece if pieces[i] is None else pieces[i] + piece
        return flatten(pieces, self.params)

    def _finite_difference(self, vector: Tensor) -> Tensor:
        norm = float(vector.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return torch.zeros_like(vector)
        h = self.fd_step * max(1.0, float(self.point.norm())) / norm
        write(self.params, self.point + h * vector)
        try:
            self.calls(backward="plain")
            shifted = flatten(
                [p.grad.detach() if p.grad is not None else None for p in self.params],
                self.params,
            )
        finally:
            write(self.params, self.point)
        return (shifted - self.gradient) / h

    def _check_graph(self, request: BackwardRequest) -> None:
        name = type(self.optimizer).__name__
        if request.honoured:
            return
        if any(_has_graph(g) for g in self._grads):
            return  # a module that builds the graph on its own
        self.release()
        raise RuntimeError(
            f"{name} computes exact Hessian-vector products, which need the "
            "gradient's graph, but the backward pass built none. In a "
            "LightningModule add one line to the class body: `backward = "
            "lightning_eos.optim.backward_with_graph`; in a plain closure call "
            "`lightning_eos.optim.closure_backward(loss)` instead of "
            "`loss.backward()`."
            + ("" if self.capture else " Or pass hessian_products='finite_difference'.")
        )


def _has_graph(tensor: Tensor | None) -> bool:
    return tensor is not None and tensor.requires_grad


def check_dtypes(params: list[Tensor], name: str) -> None:
    """Refuse parameters of several floating-point types or devices."""
    kinds = {(p.dtype, p.device) for p in params}
    if len(kinds) > 1:
        raise ValueError(
            f"{name} works on one flat vector of parameters and needs them all of one "
            f"type and device; got {sorted(str(k) for k in kinds)}."
        )
