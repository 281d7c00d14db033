"""The scikit-learn handwritten digits as a small, full-batch-friendly data module."""

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_eos._validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_seed,
)

__all__ = ["DigitsDataModule"]

_TARGETS = ("one_hot", "labels")


class _BatchIndexedTensors(TensorDataset):
    """A ``TensorDataset`` that hands a whole batch over in one indexing operation.

    The ``DataLoader`` calls ``__getitems__`` with the batch's indices when a dataset
    defines it. Gathering 1,797 examples one by one and stacking them costs about
    twice as much as a full-batch step of the reference MLP; one advanced indexing
    operation per tensor costs almost nothing.
    """

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return tuple(tensor[index] for tensor in self.tensors)


def _collate(
    samples: tuple[Tensor, ...] | Sequence[tuple[Tensor, ...]],
) -> tuple[Tensor, ...]:
    """Return a batch ``(inputs, targets)`` as a tuple of stacked tensors.

    The ``DataLoader`` passes the tuple that ``__getitems__`` has already assembled.
    Other code following the ``collate_fn`` contract (such as a probe drawing chosen
    examples) passes a list of ``dataset[i]`` samples, which are stacked here.
    """
    if isinstance(samples, tuple):
        return samples
    return tuple(torch.stack(column) for column in zip(*samples, strict=True))


class DigitsDataModule(LightningDataModule):
    r"""The 1,797 handwritten 8×8 digits of scikit-learn, standardized per pixel.

    The images ship inside scikit-learn (:func:`sklearn.datasets.load_digits`), so
    nothing is downloaded. Each pixel :math:`j` is standardized with the mean
    :math:`\mu_j` and the population standard deviation :math:`\sigma_j` of the
    training split, :math:`x_j \mapsto (x_j - \mu_j) / \sigma_j`; pixels constant on
    the training split (:math:`\sigma_j = 0`) are only centred, so they stay zero there
    and nothing becomes NaN. The statistics are kept as ``feature_mean`` and
    ``feature_std`` after :meth:`setup`.

    Batches are tuples ``(inputs, targets)`` with float32 inputs of shape ``(B, 64)``
    (or ``(B, 1, 8, 8)`` with ``flatten=False``) and targets that are either float32
    one-hot vectors of shape ``(B, 10)``, for the half squared error of Cohen et al.
    (2021), or int64 class labels of shape ``(B,)``, for the cross-entropy.

    With ``test_fraction > 0`` a held-out split is drawn once, stratified by class
    and seeded by ``seed``. Both :meth:`val_dataloader` and :meth:`test_dataloader`
    serve that same split: the reference experiments have no model selection, so a
    separate validation split would only take examples from training. With
    ``test_fraction=0`` there is no held-out split: :meth:`val_dataloader` returns an
    empty list, which Lightning takes as "no validation" (it warns once that the
    length is zero), and :meth:`test_dataloader` raises.

    The loading happens in :meth:`setup`, which may be called by hand without a
    trainer; later calls reuse the first split.

    Args:
        batch_size: Examples per training batch, or ``None`` for one batch holding the
            whole training split (full-batch gradient descent). The last minibatch of
            an epoch may be smaller. Evaluation loaders always use full batches.
        test_fraction: Fraction of the examples held out, in ``[0, 1)``. Both splits
            must hold at least one example of each of the 10 classes.
        targets: ``"one_hot"`` for float one-hot targets or ``"labels"`` for int64
            class labels.
        seed: Seeds the held-out split and the order of the minibatches, in
            ``[0, 2**32 - 1]``.
        shuffle: Whether to reshuffle the training split every epoch. Only minibatches
            are shuffled; a full batch is always served in dataset order.
        num_workers: Worker processes of each ``DataLoader``.
        flatten: ``True`` for inputs of shape ``(B, 64)``, ``False`` for images of
            shape ``(B, 1, 8, 8)``.

    Attributes:
        num_classes: The number of classes, 10.
        input_dim: The number of pixels per image, 64 (also with ``flatten=False``).

    Raises:
        ValueError: If an argument is outside its accepted range, here or when
            :meth:`setup` finds that ``batch_size`` exceeds the training split or that
            ``test_fraction`` leaves a split without some class.

    Example:
        >>> datamodule = DigitsDataModule(test_fraction=0.2)
        >>> datamodule.setup("fit")
        >>> inputs, targets = next(iter(datamodule.train_dataloader()))
        >>> tuple(inputs.shape), tuple(targets.shape)
        ((1437, 64), (1437, 10))

    References:
        Cohen, Kaur, Li, Kolter and Talwalkar. Gradient Descent on Neural Networks
        Typically Occurs at the Edge of Stability. ICLR 2021.
    """

    num_classes: int = 10
    input_dim: int = 64

    def __init__(
        self,
        batch_size: int | None = None,
        test_fraction: float = 0.0,
        targets: Literal["one_hot", "labels"] = "one_hot",
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        if batch_size is not None:
            check_int("batch_size", batch_size)
        check_number("test_fraction", test_fraction, low=0.0, high=1.0, high_open=True)
        check_choice("targets", targets, _TARGETS)
        check_seed("seed", seed)
        check_bool("shuffle", shuffle)
        check_int("num_workers", num_workers, low=0)
        check_bool("flatten", flatten)

        self.save_hyperparameters()
        self.batch_size = batch_size
        self.test_fraction = float(test_fraction)
        self.targets = targets
        self.seed = seed
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.flatten = flatten

        self.train_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None
        self.feature_mean: Tensor | None = None
        self.feature_std: Tensor | None = None
        self._generator: torch.Generator | None = None

    @override
    def setup(self, stage: str) -> None:
        """Load the digits, split them and standardize them with training statistics.

        Args:
            stage: The trainer's stage; every stage gets the same splits.

        Raises:
            ValueError: If ``test_fraction`` leaves fewer than 10 examples in a split
                or ``batch_size`` exceeds the training split.
        """
        if self.train_dataset is not None:
            return

        digits = load_digits()
        images, labels = digits.data, digits.target
        train_index, test_index = self._split(labels)
        train_size = len(train_index)
        if self.batch_size is not None and self.batch_size > train_size:
            raise ValueError(
                f"batch_size must not exceed the {train_size} training examples; got "
                f"{self.batch_size}. Pass batch_size=None for full-batch training."
            )

        # Statistics in float64 from the integer pixel counts, then float32 inputs.
        mean = images[train_index].mean(axis=0)
        std = images[train_index].std(axis=0)
        standardized = (images - mean) / np.where(std > 0, std, 1.0)
        inputs = torch.from_numpy(standardized).to(torch.float32)
        if not self.flatten:
            inputs = inputs.reshape(-1, 1, 8, 8)
        classes = torch.from_numpy(labels).to(torch.int64)
        targets = classes
        if self.targets == "one_hot":
            targets = F.one_hot(classes, self.num_classes).to(torch.float32)

        self.feature_mean = torch.from_numpy(mean).to(torch.float32)
        self.feature_std = torch.from_numpy(std).to(torch.float32)
        self.train_dataset = _BatchIndexedTensors(
            inputs[train_index], targets[train_index]
        )
        if len(test_index) > 0:
            self.test_dataset = _BatchIndexedTensors(
                inputs[test_index], targets[test_index]
            )
        self._generator = torch.Generator().manual_seed(self.seed)

    def _split(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return sorted training and held-out indices, stratified by class."""
        indices = np.arange(len(labels))
        if self.test_fraction == 0.0:
            return indices, indices[:0]

        # scikit-learn rounds the held-out count up; a stratified split needs every
        # class on both sides.
        test_size = math.ceil(self.test_fraction * len(labels))
        if min(test_size, len(labels) - test_size) < self.num_classes:
            raise ValueError(
                f"test_fraction={self.test_fraction} leaves {test_size} of "
                f"{len(labels)} examples held out; each split needs at least "
                f"{self.num_classes} (one per class)."
            )
        train_index, test_index = train_test_split(
            indices,
            test_size=self.test_fraction,
            random_state=self.seed,
            stratify=labels,
        )
        return np.sort(train_index), np.sort(test_index)

    @override
    def train_dataloader(self) -> DataLoader:
        """Return the training loader: one full batch, or (shuffled) minibatches."""
        dataset = self._require(self.train_dataset, "train_dataloader")
        batch_size = len(dataset) if self.batch_size is None else self.batch_size
        shuffle = self.shuffle and batch_size < len(dataset)
        return self._loader(dataset, batch_size, shuffle)

    @override
    def val_dataloader(self) -> DataLoader | list:
        """Return the held-out split in one batch, or ``[]`` without one."""
        self._require(self.train_dataset, "val_dataloader")
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, len(self.test_dataset), shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Return the held-out split in one batch.

        Raises:
            ValueError: If ``test_fraction`` is 0, so that there is no held-out split.
        """
        self._require(self.train_dataset, "test_dataloader")
        if self.test_dataset is None:
            raise ValueError(
                "test_dataloader needs a held-out split, so test_fraction must be in "
                f"(0, 1); got {self.test_fraction}."
            )
        return self._loader(self.test_dataset, len(self.test_dataset), shuffle=False)

    def _loader(
        self, dataset: TensorDataset, batch_size: int, shuffle: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=self._generator if shuffle else None,
            collate_fn=_collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @staticmethod
    def _require(dataset: TensorDataset | None, caller: str) -> TensorDataset:
        if dataset is None:
            raise RuntimeError(f"Call setup() before {caller}().")
        return dataset
