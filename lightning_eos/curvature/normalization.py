r"""Normalization in plain tensor operations, exact to every order of differentiation.

PyTorch's fused normalization kernels have hand-written backward formulas, and the
derivatives of those formulas are themselves hand-written. For ``layer_norm``, for
``batch_norm`` with batch statistics (train mode) and for ``instance_norm`` with
instance statistics, the first and second derivatives are right but the third is
not: a third-order product :math:`T[u, v] = \nabla_\theta(u^\top H(\theta) v)`
through them is off by tens of percent against finite differences of exact
Hessian-vector products, whichever mode of differentiation is used (measured with
torch 2.13 on a 4-6-2 network; see ``tests/curvature/test_normalization.py``).
``group_norm``, ``rms_norm`` and ``batch_norm`` with running statistics (eval mode)
are right to every order and are left alone.

Written with means, subtractions and square roots, the same layers are ordinary
compositions of differentiable operations, and autograd differentiates them
exactly as many times as asked. This module provides those formulas
(:func:`layer_norm`, :func:`batch_norm`, :func:`instance_norm`), a context manager
:func:`plain_normalization` that routes the fused functions to them for the code
it encloses (how a :class:`~lightning_eos.curvature.ProbeObjective` built with
``normalization="plain"`` evaluates the loss, leaving the module and its training
untouched), and :func:`native_normalization_calls`, which lists the fused calls a
probe objective makes, so that third-order code can refuse them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:  # pragma: no cover
    from lightning_eos.curvature.objective import ProbeObjective

__all__ = [
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "native_normalization_calls",
    "plain_normalization",
]


def layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    r"""Layer normalization over the trailing ``normalized_shape`` dimensions.

    :math:`y = (x - \mu)/\sqrt{\sigma^2 + \epsilon} \cdot w + b` with the mean
    :math:`\mu` and the biased variance :math:`\sigma^2` over those dimensions, as
    ``torch.nn.functional.layer_norm`` computes it.
    """
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    variance = (centred * centred).mean(dim=dims, keepdim=True)
    output = centred * torch.rsqrt(variance + eps)
    return _affine(output, weight, bias)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch normalization of channel dimension 1, as ``F.batch_norm`` computes it.

    With ``training=True`` (or without running statistics) every channel is
    normalized with the mean and the biased variance over the batch and the spatial
    dimensions, and the running statistics, when given, are updated in place with
    ``momentum`` and the unbiased variance. Otherwise the running statistics are
    used.
    """
    dims = [0, *range(2, input.dim())]
    if training or running_mean is None or running_var is None:
        mean = input.mean(dim=dims)
        centred = input - _channel(mean, input)
        variance = (centred * centred).mean(dim=dims)
        if training and running_mean is not None and running_var is not None:
            count = input.numel() // input.shape[1]
            _update_running(running_mean, running_var, mean, variance, count, momentum)
        output = centred * _channel(torch.rsqrt(variance + eps), input)
    else:
        scale = torch.rsqrt(running_var + eps)
        output = (input - _channel(running_mean, input)) * _channel(scale, input)
    return _affine(output, _maybe_channel(weight, input), _maybe_channel(bias, input))


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Instance normalization, as ``F.instance_norm`` computes it.

    With ``use_input_stats=True`` every channel of every example is normalized
    with its own mean and biased variance over the spatial dimensions; running
    statistics, when given, are updated with the batch average of those statistics
    (the unbiased variance). Otherwise the running statistics are used.
    """
    if not use_input_stats and running_mean is not None and running_var is not None:
        return batch_norm(input, running_mean, running_var, weight, bias, False, 0, eps)
    dims = tuple(range(2, input.dim()))
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    variance = (centred * centred).mean(dim=dims, keepdim=True)
    if running_mean is not None and running_var is not None:
        count = int(torch.tensor(input.shape[2:]).prod())
        flat = (input.shape[0], input.shape[1])
        _update_running(
            running_mean,
            running_var,
            mean.reshape(flat).mean(0),
            variance.reshape(flat),
            count,
            momentum,
            average=True,
        )
    output = centred * torch.rsqrt(variance + eps)
    return _affine(output, _maybe_channel(weight, input), _maybe_channel(bias, input))


# -- the dispatch ---------------------------------------------------------------------


def _torch_batch_norm(input, weight, bias, mean, var, training, momentum, eps, *_):
    return batch_norm(input, mean, var, weight, bias, training, momentum, eps)


def _torch_instance_norm(input, weight, bias, mean, var, stats, momentum, eps, *_):
    return instance_norm(input, mean, var, weight, bias, stats, momentum, eps)


def _torch_layer_norm(input, shape, weight=None, bias=None, eps=1e-5, *_):
    return layer_norm(input, shape, weight, bias, eps)


#: Fused functions with wrong third derivatives, and their plain replacements.
_REPLACEMENTS: dict[Callable[..., Any], Callable[..., Tensor]] = {
    F.layer_norm: layer_norm,
    F.batch_norm: batch_norm,
    F.instance_norm: instance_norm,
    torch.layer_norm: _torch_layer_norm,
    torch.batch_norm: _torch_batch_norm,
    torch.instance_norm: _torch_instance_norm,
}
_NAMES = {
    F.layer_norm: "torch.nn.functional.layer_norm (nn.LayerNorm)",
    F.batch_norm: "torch.nn.functional.batch_norm with batch statistics "
    "(nn.BatchNorm in train mode)",
    F.instance_norm: "torch.nn.functional.instance_norm (nn.InstanceNorm)",
    torch.layer_norm: "torch.layer_norm",
    torch.batch_norm: "torch.batch_norm with batch statistics",
    torch.instance_norm: "torch.instance_norm",
    torch.native_layer_norm: "torch.native_layer_norm",
    torch.native_batch_norm: "torch.native_batch_norm",
}


def _uses_batch_statistics(func: Callable[..., Any], args: tuple, kwargs: dict) -> bool:
    """Whether a call normalizes with the statistics of its input (train mode)."""
    if func is F.batch_norm:
        bound = {"running_mean": None, "running_var": None, "training": False}
        names = ("input", "running_mean", "running_var", "weight", "bias", "training")
        bound.update(zip(names, args, strict=False))
        bound.update(kwargs)
        return bool(bound["training"]) or bound["running_mean"] is None
    if func in (torch.batch_norm, torch.native_batch_norm):
        training = args[5] if len(args) > 5 else kwargs.get("training", False)
        running = args[3] if len(args) > 3 else kwargs.get("running_mean")
        return bool(training) or running is None
    if func is F.instance_norm:
        bound = {"running_mean": None, "use_input_stats": True}
        names = ("input", "running_mean", "running_var", "weight", "bias")
        bound.update(zip((*names, "use_input_stats"), args, strict=False))
        bound.update(kwargs)
        return bool(bound["use_input_stats"]) or bound["running_mean"] is None
    if func is torch.instance_norm:
        stats = args[5] if len(args) > 5 else kwargs.get("use_input_stats", True)
        running = args[3] if len(args) > 3 else kwargs.get("running_mean")
        return bool(stats) or running is None
    return True  # layer normalization always uses the statistics of its input


class _Normalization(TorchFunctionMode):
    """Records fused normalization calls, and optionally evaluates them in plain ops."""

    def __init__(self, replace: bool) -> None:
        super().__init__()
        self.replace = replace
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _NAMES and _uses_batch_statistics(func, args, kwargs):
            self.calls.append(_NAMES[func])
            if self.replace and func in _REPLACEMENTS:
                return _REPLACEMENTS[func](*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def plain_normalization() -> Iterator[None]:
    """Evaluate fused layer, batch and instance normalization in plain tensor ops.

    Inside the block, calls of ``F.layer_norm``, ``F.batch_norm`` (with batch
    statistics), ``F.instance_norm`` and their ``torch.*`` counterparts, including
    those made by ``nn.LayerNorm``, ``nn.BatchNorm*d`` and ``nn.InstanceNorm*d``, are
    computed by :func:`layer_norm`, :func:`batch_norm` and :func:`instance_norm`:
    the same function, equal to round-off, with exact derivatives of every order.
    Batch normalization with running statistics is exact natively and left alone.

    Example:
        >>> import torch
        >>> layer = torch.nn.LayerNorm(4)
        >>> x = torch.randn(2, 4)
        >>> with plain_normalization():
        ...     y = layer(x)
        >>> torch.allclose(y, layer(x), atol=1e-6)
        True
    """
    with _Normalization(replace=True):
        yield


def native_normalization_calls(objective: ProbeObjective) -> list[str]:
    """The fused normalization calls with wrong third derivatives an objective makes.

    Evaluates the loss of the objective's first chunk once, without gradients, and
    records every call of a fused normalization function that normalizes with batch
    or instance statistics; an objective built with ``normalization="plain"``
    makes none.

    Returns:
        The descriptions of the distinct calls, in the order first met.
    """
    if objective.normalization == "plain" or not objective.chunks:
        return []
    recorder = _Normalization(replace=False)
    with torch.no_grad(), recorder:
        next(iter(objective.chunk_losses(objective.point())))
    return list(dict.fromkeys(recorder.calls))


# -- helpers --------------------------------------------------------------------------


def _affine(output: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        output = output * weight
    if bias is not None:
        output = output + bias
    return output


def _channel(values: Tensor, like: Tensor) -> Tensor:
    """Shape per-channel values to broadcast against ``(N, C, ...)``."""
    return values.reshape(1, -1, *([1] * (like.dim() - 2)))


def _maybe_channel(values: Tensor | None, like: Tensor) -> Tensor | None:
    return None if values is None else _channel(values, like)


def _update_running(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    variance: Tensor,
    count: int,
    momentum: float,
    average: bool = False,
) -> None:
    """Exponential moving averages of the statistics, with the unbiased variance."""
    with torch.no_grad():
        unbiased = variance * (count / max(count - 1, 1))
        if average:
            unbiased = unbiased.mean(0)
        running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
        running_var.mul_(1 - momentum).add_(unbiased.detach(), alpha=momentum)
