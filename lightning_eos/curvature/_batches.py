"""Operations on arbitrarily nested batches (tensors inside tuples, lists and dicts)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


def map_tensors(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor of a nested batch and keep its structure."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(map_tensors(item, fn) for item in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(item, fn) for item in batch)
    if isinstance(batch, Mapping):
        return type(batch)({key: map_tensors(val, fn) for key, val in batch.items()})
    return batch


def first_tensor(batch: Any) -> Tensor | None:
    """The first tensor met in a depth-first walk of a nested batch."""
    if isinstance(batch, Tensor):
        return batch
    items = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(batch, (list, tuple, Mapping)):
        for item in items:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in a batch: the leading dimension of its first tensor."""
    tensor = first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise ValueError(
            "Cannot count the examples of a batch without a tensor of at least one "
            f"dimension; got a batch of type {type(batch).__name__}."
        )
    return tensor.shape[0]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of every tensor with a leading example dimension."""
    return map_tensors(batch, lambda t: t[start:stop] if t.dim() > 0 else t)


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the example dimension."""
    head = batches[0]
    if isinstance(head, Tensor):
        return torch.cat(list(batches)) if head.dim() > 0 else head
    if isinstance(head, tuple) and hasattr(head, "_fields"):
        return type(head)(
            *(concat_batches(items) for items in zip(*batches, strict=True))
        )
    if isinstance(head, (list, tuple)):
        return type(head)(concat_batches(items) for items in zip(*batches, strict=True))
    if isinstance(head, Mapping):
        return type(head)(
            {key: concat_batches([b[key] for b in batches]) for key in head}
        )
    return head


def cast_floating(batch: Any, dtype: torch.dtype | None) -> Any:
    """Cast the floating-point tensors of a batch to ``dtype``; leave the rest."""
    if dtype is None:
        return batch
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point() else t)
