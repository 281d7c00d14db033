"""A penalty in the objective of a second-order optimizer's closure calls.

:class:`~lightning_eos.penalties.PenaltyCallback` uses these with the second-order
optimizers of :mod:`lightning_eos.optim`, which differentiate the gradient and
compare loss values: the penalty's :class:`~lightning_eos.penalties.PenaltyTerm`
is added to every closure call of a step, in ``on_after_backward``, according to
the backward pass the optimizer asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from lightning_eos.optim._base import ClosureOptimizer
from lightning_eos.optim._closure import BackwardRequest
from lightning_eos.optim.gauss_newton import GaussNewton
from lightning_eos.penalties._base import Penalty
from lightning_eos.penalties._terms import PenaltyTerm


def check_second_order(
    penalty: Penalty,
    optimizer: ClosureOptimizer,
    warn_once: Callable[[str, str], None],
) -> None:
    """Refuse, or warn of, a penalty this second-order optimizer cannot serve well.

    Raises:
        MisconfigurationException: For a penalty without a term, a coefficient
            read from the learning rate, and ``GaussNewton(damping=0)``.
    """
    name = type(optimizer).__name__
    if getattr(penalty, "coefficient", None) == "lr":
        lr = max(group["lr"] for group in optimizer.param_groups)
        raise MisconfigurationException(
            f"{type(penalty).__name__}(coefficient='lr') takes its coefficient from "
            "the step size of gradient descent (the implicit regularization of a "
            f"step of size lr), but the lr of {name} (here {lr:g}) scales a "
            "Newton-type step and has no such meaning. Give the coefficient as a "
            "number: coefficient=c penalizes (c/4)‖∇L‖², e.g. c = 0.2 imitates "
            "gradient descent at a step size of 0.2."
        )
    if not penalty.has_term:
        raise MisconfigurationException(
            f"PenaltyCallback adds the penalty to the objective of {name}, which "
            f"differentiates it twice, but {type(penalty).__name__} returns no "
            "PenaltyTerm (set `has_term = True` and return `PenaltyResult(term=...)` "
            "from `evaluate`). Use a first-order optimizer with it."
        )
    if not isinstance(optimizer, GaussNewton):
        return
    damping = min(group["damping"] for group in optimizer.param_groups)
    if damping == 0:
        raise MisconfigurationException(
            f"PenaltyCallback with {name}(damping=0): the penalty's gradient need not "
            "lie in the row space of the Jacobian, where undamped Gauss-Newton has "
            "no curvature. Use damping > 0."
        )
    lr = max(group["lr"] for group in optimizer.param_groups)
    warn_once(
        "gauss-newton",
        f"PenaltyCallback with {name}: the penalty's curvature is left out of the "
        "Gauss-Newton matrix, so the part of its gradient outside the row space of "
        f"the Jacobian is stepped with lr/damping = {lr / damping:.3g}, and this "
        "optimizer has no line search to stop it: a small damping can make the run "
        "diverge. HessianFree(curvature='gauss_newton') adapts its damping and "
        "searches along its step.",
    )


def add_term(
    term: PenaltyTerm,
    request: BackwardRequest,
    module: nn.Module,
    curvature: bool,
    held: Sequence[Tensor | None] | None = None,
) -> list[Tensor | None] | None:
    """Add the term to the objective of the closure call under way.

    The value goes to the loss the optimizer receives (through
    :meth:`~lightning_eos.optim._closure.BackwardRequest.add_term`); the gradient
    to ``.grad``: with the term's own graph when the optimizer asked for a backward
    pass with graph and ``curvature`` is true, so that its Hessian-vector products
    are those of :math:`L + s`; without it otherwise, evaluated one chunk of the
    term's data at a time. A skipped backward pass (a line-search trial) gets the
    value alone, also by chunks. Without ``curvature``, a plain
    backward pass after the step's first call (a finite-difference product at a
    shifted point) gets the gradient ``held`` from that first call, so that those
    products leave the term's curvature out too.

    Args:
        term: The penalty's term, frozen at the step's first closure call.
        request: The backward request of the call.
        module: The module whose parameters the term is a function of.
        curvature: Whether the term's curvature enters the optimizer's products.
        held: The gradient pieces returned by the step's first call.

    Returns:
        The gradient pieces added (``None`` for a skipped backward pass).
    """
    mode = request.mode if request.honoured else "plain"
    named = dict(module.named_parameters())
    tensors = [named[name] for name in term.objectives[0].names]
    keep = mode == "graph"  # .grad carries the graph of L: keep it
    if mode == "skip":
        request.add_term(term.value(tensors))
        return None
    pieces: list[Tensor | None]
    if keep and curvature:
        # The optimizer differentiates .grad again: the term's whole graph.
        with torch.enable_grad():
            graph_value = term(tensors)
            pieces = list(
                torch.autograd.grad(
                    graph_value, tensors, create_graph=True, allow_unused=True
                )
            )
        value = float(graph_value.detach())
    elif held is not None and not curvature and not keep:
        value, pieces = term.value(tensors), list(held)
    else:  # one chunk at a time
        value, gradient = term.value_and_gradient(tensors)
        pieces = list(gradient)
    added = []
    for parameter, piece in zip(tensors, pieces, strict=True):
        if piece is None:
            continue
        if keep:  # the optimizer differentiates .grad again
            grad = parameter.grad
            parameter.grad = piece if grad is None else grad + piece
        else:
            piece = piece.detach()
            with torch.no_grad():
                if parameter.grad is None:
                    parameter.grad = piece.clone()
                else:
                    parameter.grad.add_(piece)
        added.append((parameter, piece.detach()))
    request.add_term(value, added)
    return [None if piece is None else piece.detach() for piece in pieces]
