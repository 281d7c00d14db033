"""Calling a training closure several times in one optimizer step, safely.

Lightning's automatic optimization hands ``optimizer.step`` a closure that runs
``training_step``, ``zero_grad`` and ``backward`` (and, wrapped around it by the
precision plugin, the ``on_before_optimizer_step`` hooks and gradient clipping).
An optimizer that calls it several times per step repeats every side effect of a
training forward pass. :class:`ClosureCalls` makes those repeats harmless:

* the random generators are reset before every repeated call to their state before
  the first one, so dropout draws the same mask in every pass, and after the step
  they are left where a single pass would have left them;
* the running statistics of normalization layers (BatchNorm, InstanceNorm with
  ``track_running_stats``) are restored after every repeated call to their values
  after the first, clean pass, so they move once per step;
* only the call whose gradient makes the step goes through Lightning's wrapper, so
  gradient clipping and ``on_before_optimizer_step`` run once, on that gradient.

It also carries the request for a backward pass that builds a graph (for exact
Hessian-vector products) or that can be skipped (when only the loss is needed) to
:func:`backward_with_graph`, the one-line ``backward`` override a module adds.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

try:  # optional strategies; absent classes simply cannot be in use
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    _SHARDING: tuple[type, ...] = (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )
except ImportError:  # pragma: no cover - depends on the Lightning version
    _SHARDING = ()

#: ``"plain"``: the module's usual backward; ``"graph"``: backward with
#: ``create_graph=True``; ``"skip"``: no backward at all (only the loss is used).
BackwardMode = Literal["plain", "graph", "skip"]


@dataclass
class BackwardRequest:
    """What an optimizer asks of the backward pass of one closure call.

    Attributes:
        mode: The requested kind of backward pass.
        honoured: Set by :func:`backward_with_graph` or :func:`closure_backward`
            when they see the request; ``False`` means the module runs its own
            backward, which builds no graph and is never skipped.
        loss: The loss tensor, with its graph, that the backward pass received.
        added_loss: The sum of the values of the terms added by :meth:`add_term`.
        added_gradients: Their gradients, as ``(parameter, piece)`` pairs.
        terms_added: Whether :meth:`add_term` was called.
    """

    mode: BackwardMode
    honoured: bool = False
    loss: Tensor | None = None
    added_loss: float = 0.0
    added_gradients: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    terms_added: bool = False

    def add_term(
        self, value: float, gradients: Sequence[tuple[Tensor, Tensor]] = ()
    ) -> None:
        r"""Record a term that a callback added to the objective of this call.

        A callback (``on_after_backward``) that adds a term :math:`P` to the
        objective adds :math:`\nabla P` to ``.grad`` itself and records here the
        value, which :class:`ClosureCalls` adds to the loss it returns, and the
        gradient, which curvature built from the module's outputs alone
        (Gauss-Newton) needs to tell apart from :math:`\nabla L`.

        Args:
            value: :math:`P` at the parameters of this call.
            gradients: Pairs ``(parameter, piece of ∇P)`` without graph; empty
                when the backward pass was skipped.
        """
        self.terms_added = True
        self.added_loss += float(value)
        self.added_gradients.extend(gradients)


_REQUEST: ContextVar[BackwardRequest | None] = ContextVar(
    "lightning_eos_backward_request", default=None
)


def current_backward_request() -> BackwardRequest | None:
    """The request of the closure call under way, or ``None`` outside one.

    Inside a closure called by an optimizer of :mod:`lightning_eos.optim` (in the
    module's backward pass or in ``on_after_backward``) it says which backward
    pass the optimizer asked for, and collects the terms a callback adds to the
    objective (:meth:`BackwardRequest.add_term`).
    """
    return _REQUEST.get()


def backward_with_graph(
    self: pl.LightningModule, loss: Tensor, *args: Any, **kwargs: Any
) -> None:
    """A ``LightningModule.backward`` that builds a graph when an optimizer asks.

    Assign it in the class body of a module trained with a second-order optimizer
    of :mod:`lightning_eos.optim` using exact Hessian-vector products::

        class MyModule(LightningModule):
            backward = backward_with_graph

    Outside the steps of those optimizers it is Lightning's own backward. During
    them, it runs ``loss.backward(create_graph=True)`` when the optimizer needs
    Hessian-vector products (so ``.grad`` carries a graph that the optimizer
    differentiates once more), and skips the backward pass when the optimizer
    only needs the loss (a line-search trial).
    """
    request = _REQUEST.get()
    if request is not None:
        request.honoured = True
        request.loss = loss
        if request.mode == "skip":
            return
        if request.mode == "graph":
            kwargs["create_graph"] = True
            with _graph_warning_silenced():
                pl.LightningModule.backward(self, loss, *args, **kwargs)
            return
    pl.LightningModule.backward(self, loss, *args, **kwargs)


def closure_backward(loss: Tensor) -> None:
    """``loss.backward()`` for a plain PyTorch closure, honouring optimizer requests.

    Use it instead of ``loss.backward()`` in a closure written by hand for a
    second-order optimizer of :mod:`lightning_eos.optim`::

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            closure_backward(loss)
            return loss
    """
    request = _REQUEST.get()
    if request is None:
        loss.backward()
        return
    request.honoured = True
    request.loss = loss
    if request.mode == "plain":
        loss.backward()
    elif request.mode == "graph":
        with _graph_warning_silenced():
            loss.backward(create_graph=True)


@contextmanager
def _graph_warning_silenced() -> Iterator[None]:
    """Silence PyTorch's warning on ``backward(create_graph=True)``.

    It warns of a reference cycle between a parameter and its gradient; the
    optimizers break it at the end of every step by replacing ``.grad``.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"Using backward\(\) with create_graph=True"
        )
        yield


def split_lightning_closure(
    closure: Callable[[], Any],
) -> tuple[Callable[[], Any], pl.LightningModule | None]:
    """The bare closure inside Lightning's precision wrapper, and the module.

    Lightning's precision plugin passes ``functools.partial(_wrap_closure, module,
    optimizer, closure)`` to ``optimizer.step``; the wrapper runs the closure, then
    the ``on_before_optimizer_step`` hooks and gradient clipping. Any other
    callable is returned as is, without a module.

    Returns:
        The closure without the wrapper, and the LightningModule (or ``None``).
    """
    if (
        isinstance(closure, functools.partial)
        and getattr(closure.func, "__name__", "") == "_wrap_closure"
        and len(closure.args) == 3
        and isinstance(closure.args[0], pl.LightningModule)
    ):
        return closure.args[2], closure.args[0]
    return closure, None


def check_trainer(trainer: pl.Trainer, name: str, *, second_order: bool) -> None:
    """Refuse Trainer settings under which a closure optimizer would be wrong.

    Raises:
        MisconfigurationException: For gradient accumulation, a strategy that
            shards parameters, several processes for a second-order optimizer, or
            gradient clipping with a second-order optimizer.
    """
    if trainer.accumulate_grad_batches > 1:
        raise MisconfigurationException(
            f"{name} calls the training closure several times per step and cannot "
            "be used with gradient accumulation: Lightning does not zero the "
            "gradients in the closure of the stepping micro-batch, so every call "
            "would add the micro-batch's gradient to the accumulated one. Got "
            f"accumulate_grad_batches={trainer.accumulate_grad_batches}; use 1 and "
            "a larger batch instead."
        )
    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler) and any(
            factor > 1 for factor in callback.scheduling.values()
        ):
            raise MisconfigurationException(
                f"{name} calls the training closure several times per step and "
                "cannot be used with gradient accumulation, which "
                f"GradientAccumulationScheduler({callback.scheduling}) switches on "
                "during the run. Remove the scheduler and use a larger batch."
            )
    if _SHARDING and isinstance(trainer.strategy, _SHARDING):
        raise MisconfigurationException(
            f"{name} needs the whole gradient on every process, but the strategy "
            f"{type(trainer.strategy).__name__} shards the parameters. Use a single "
            "device" + (" or the 'ddp' strategy." if not second_order else ".")
        )
    if second_order and trainer.world_size > 1:
        raise MisconfigurationException(
            f"{name} cannot run on {trainer.world_size} processes: its Hessian-vector "
            "products and line-search losses would be those of each process's "
            "shard, not of the global batch, and the processes would take "
            "different steps. Use a single device."
        )
    clip = trainer.gradient_clip_val
    if second_order and clip is not None and clip > 0:
        raise MisconfigurationException(
            f"{name} cannot be combined with gradient clipping "
            f"(gradient_clip_val={clip}): clipping would change the gradient but "
            "not the Hessian, and the quadratic model of the step would be "
            "inconsistent. Remove gradient_clip_val."
        )


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _running_statistics(module: nn.Module | None) -> list[tuple[Tensor, Tensor]]:
    """Pairs ``(buffer, saved copy)`` of every normalization layer's statistics."""
    if module is None:
        return []
    pairs = []
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buffer = getattr(sub, name, None)
                if isinstance(buffer, Tensor):
                    pairs.append((buffer, buffer.detach().clone()))
    return pairs


class ClosureCalls:
    """The calls of a training closure within one optimizer step.

    The first call runs as usual. Every later call replays the random state of the
    first one and restores the normalization statistics left by it; :meth:`close`
    leaves the random generators where the first call left them.

    Args:
        closure: The closure given to ``optimizer.step``.
        module: The module whose normalization statistics to protect (found from
            Lightning's closure, or attached to the optimizer by hand).
        counters: The optimizer's evaluation counters, updated in place.
        gradient_hooks: Called without arguments after every call that is not
            ``final`` and computed a gradient, so that what Lightning's
            ``on_before_optimizer_step`` adds to the final gradient (a penalty's
            gradient, for example) reaches the others too.
    """

    def __init__(
        self,
        closure: Callable[[], Any],
        module: nn.Module | None,
        counters: dict[str, int],
        gradient_hooks: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.wrapped = closure
        self.bare, lightning_module = split_lightning_closure(closure)
        self.module = module if module is not None else lightning_module
        self.counters = counters
        self.gradient_hooks = tuple(gradient_hooks)
        self._rng_before: tuple[Tensor, list[Tensor] | None] | None = None
        self._rng_after: tuple[Tensor, list[Tensor] | None] | None = None
        self._statistics: list[tuple[Tensor, Tensor]] = []
        self.num_calls = 0

    def __call__(
        self, *, final: bool = False, backward: BackwardMode = "plain"
    ) -> tuple[Tensor | None, BackwardRequest]:
        """Call the closure once.

        Args:
            final: Whether this call computes the gradient that makes the step; it
                then goes through Lightning's wrapper (clipping, hooks).
            backward: The kind of backward pass to request.

        Returns:
            The loss returned by the closure (``None`` if ``training_step``
            returned ``None``), plus the value of the terms added to the
            objective during the call (:meth:`BackwardRequest.add_term`), and the
            backward request, as the backward pass left it.
        """
        first = self._rng_before is None
        if first:
            self._rng_before = _rng_state()
        else:
            _set_rng_state(self._rng_before)
        request = BackwardRequest(backward)
        token = _REQUEST.set(request)
        try:
            with torch.enable_grad():
                loss = (self.wrapped if final else self.bare)()
        finally:
            _REQUEST.reset(token)
        if first:
            self._rng_after = _rng_state()
            self._statistics = _running_statistics(self.module)
        else:
            for buffer, saved in self._statistics:
                buffer.copy_(saved)
        self.num_calls += 1
        skipped = backward == "skip" and request.honoured
        self.counters["losses" if skipped else "gradients"] += 1
        if not final and not skipped and loss is not None:
            with torch.enable_grad():  # optimizers step under no_grad
                for hook in self.gradient_hooks:
                    hook()
        if isinstance(loss, Tensor):
            loss = loss.detach()
            if request.terms_added:
                loss = loss + request.added_loss
        return loss, request

    def close(self) -> None:
        """Leave the random generators as a single pass would have left them."""
        if self.num_calls > 1 and self._rng_after is not None:
            _set_rng_state(self._rng_after)
