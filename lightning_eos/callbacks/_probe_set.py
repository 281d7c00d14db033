"""Drawing a fixed probe set from the training data of a Lightning run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_eos.curvature._batches import batch_size, concat_batches, slice_batch
from lightning_eos.curvature.objective import fixed_randomness


@dataclass
class ProbeSet:
    """The chunks of the probe set held by this process.

    Attributes:
        chunks: Collated batches on the module's device.
        indices: The dataset indices of the whole probe set (all processes), in the
            order they are sharded; ``None`` for an iterable dataset.
        size: Number of examples over all processes.
    """

    chunks: list[Any]
    indices: Tensor | None
    size: int


def training_dataloader(trainer: pl.Trainer, owner: str) -> DataLoader:
    """The single training ``DataLoader`` of a run, or a clear error."""
    loader = trainer.train_dataloader
    if isinstance(loader, DataLoader):
        return loader
    raise MisconfigurationException(
        f"{owner} draws its probe set from a single training DataLoader, but the "
        f"trainer's train_dataloader is a {type(loader).__name__}."
    )


def draw_probe_set(
    trainer: pl.Trainer,
    owner: str,
    probe_size: int,
    chunk_size: int,
    generator: torch.Generator,
    seed: int,
    indices: Tensor | None = None,
) -> ProbeSet:
    """Draw ``probe_size`` training examples (all of them if fewer) and chunk them.

    From a map-style dataset the examples are a uniform random subset without
    replacement, drawn with ``generator`` (or the given ``indices``, to restore a
    checkpointed probe set), independent of the loader's own sampler and shuffling;
    they are collated with the loader's ``collate_fn`` and moved to the device
    through the module's batch-transfer hooks. From an iterable dataset the first
    examples the loader yields are taken. Process ``r`` of ``W`` holds every
    ``W``-th example starting at ``r``. Everything runs with the random generators
    reseeded from ``seed`` and restored afterwards, so that random data
    transformations neither differ between calls nor move the training stream.
    """
    loader = training_dataloader(trainer, owner)
    rank, world = trainer.global_rank, trainer.world_size
    try:
        with fixed_randomness(seed, torch.device("cpu")):
            if isinstance(loader.dataset, IterableDataset) or not hasattr(
                loader.dataset, "__len__"
            ):
                local = _first_examples(loader, math.ceil(probe_size / world))
                chunks = [
                    slice_batch(local, start, start + chunk_size)
                    for start in range(0, batch_size(local), chunk_size)
                ]
            else:
                if indices is None:
                    total = len(loader.dataset)
                    order = torch.randperm(total, generator=generator)
                    indices = order[: min(probe_size, total)].sort().values
                chunks = _collated_chunks(loader, indices[rank::world], chunk_size)
            chunks = [trainer.strategy.batch_to_device(chunk) for chunk in chunks]
    except MisconfigurationException:
        raise
    except Exception as error:  # the user's dataset, collate_fn or hooks failed
        raise MisconfigurationException(
            f"{owner} could not draw its probe set of {probe_size} examples from the "
            f"training DataLoader: {type(error).__name__}: {error}"
        ) from error
    size = len(indices) if indices is not None else None
    local_count = sum(batch_size(chunk) for chunk in chunks)
    if size is None:
        size = _global_count(trainer, local_count)
    if size == 0:
        raise MisconfigurationException(
            f"{owner} found no example in the training DataLoader to probe."
        )
    return ProbeSet(chunks=chunks, indices=indices, size=size)


def _collated_chunks(loader: DataLoader, indices: Tensor, chunk_size: int) -> list[Any]:
    dataset, collate = loader.dataset, loader.collate_fn
    positions = indices.tolist()
    return [
        collate([dataset[i] for i in positions[start : start + chunk_size]])
        for start in range(0, len(positions), chunk_size)
    ]


def _first_examples(loader: DataLoader, count: int) -> Any:
    collected, found = [], 0
    for batch in loader:
        collected.append(batch)
        found += batch_size(batch)
        if found >= count:
            break
    if not collected:
        raise MisconfigurationException("the training DataLoader yielded no batch")
    return slice_batch(concat_batches(collected), 0, count)


def _global_count(trainer: pl.Trainer, local_count: int) -> int:
    count = torch.tensor(float(local_count), device=trainer.strategy.root_device)
    if trainer.world_size > 1:
        count = trainer.strategy.reduce(count, reduce_op="sum")
    return int(count.item())
