r"""Normalization layers written in plain tensor operations.

PyTorch's ``nn.LayerNorm``, ``nn.BatchNorm*d`` in train mode and
``nn.InstanceNorm*d`` run fused kernels whose third derivatives are wrong (their
Hessian-vector products are right; see
:mod:`lightning_eos.curvature.normalization`). The classes here are subclasses of
those layers, with the same constructor, parameters, buffers, running-statistics
updates and state-dict keys, whose forward pass computes the same function with
means, subtractions and square roots: exact to every order of differentiation. They
agree with the native layers to round-off and are somewhat slower.

Probes need not change the model: a
:class:`~lightning_eos.curvature.ProbeObjective` built with
``normalization="plain"`` (what the third-order callbacks use) evaluates native
layers this way during probes only. Swap the layers in (with
:func:`use_plain_normalization`) when third derivatives are also taken outside the
probes, for example by a penalty or an optimizer that differentiates the training
loss three times.

``nn.GroupNorm`` and ``nn.RMSNorm`` are exact natively and need no replacement.
``nn.SyncBatchNorm`` is not replaced.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_eos.curvature.normalization import plain_normalization

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "use_plain_normalization",
]


class _Plain:
    """Runs the native forward pass with fused normalization computed in plain ops."""

    def forward(self, input: Tensor) -> Tensor:
        with plain_normalization():
            return super().forward(input)  # type: ignore[misc]


class LayerNorm(_Plain, nn.LayerNorm):
    """``nn.LayerNorm`` in plain tensor operations (exact third derivatives)."""


class BatchNorm1d(_Plain, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` in plain tensor operations (exact third derivatives)."""


class BatchNorm2d(_Plain, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` in plain tensor operations (exact third derivatives)."""


class BatchNorm3d(_Plain, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` in plain tensor operations (exact third derivatives)."""


class InstanceNorm1d(_Plain, nn.InstanceNorm1d):
    """``nn.InstanceNorm1d`` in plain tensor operations (exact third derivatives)."""


class InstanceNorm2d(_Plain, nn.InstanceNorm2d):
    """``nn.InstanceNorm2d`` in plain tensor operations (exact third derivatives)."""


class InstanceNorm3d(_Plain, nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` in plain tensor operations (exact third derivatives)."""


_PLAIN: dict[type[nn.Module], type[nn.Module]] = {
    nn.LayerNorm: LayerNorm,
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.InstanceNorm1d: InstanceNorm1d,
    nn.InstanceNorm2d: InstanceNorm2d,
    nn.InstanceNorm3d: InstanceNorm3d,
}


def use_plain_normalization(module: nn.Module) -> list[str]:
    """Turn the native layer, batch and instance norms of ``module`` into plain ones.

    Each submodule whose class is exactly one of the native layers above has its
    class changed, in place, to the plain subclass: the submodule object, its
    parameters (so an optimizer built already keeps working), buffers, hooks and
    state-dict keys stay the same. Subclasses of the native layers written by users
    are left alone, since their forward pass may differ.

    Args:
        module: The model.

    Returns:
        The qualified names of the submodules changed.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
        >>> use_plain_normalization(model)
        ['1']
        >>> type(model[1]).__name__
        'LayerNorm'
    """
    changed = []
    for name, submodule in module.named_modules():
        plain = _PLAIN.get(type(submodule))
        if plain is not None:
            submodule.__class__ = plain
            changed.append(name)
    return changed
