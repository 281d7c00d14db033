"""Steps, losses and metrics shared by the reference classifiers."""

from collections.abc import Sequence
from typing import Any, Literal

from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_eos._validation import check_int
from lightning_eos.losses import half_squared_error
from lightning_eos.optim import backward_with_graph

Activation = Literal["tanh", "relu", "elu", "gelu"]
Loss = Literal["mse", "cross_entropy"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
_LOSSES = ("mse", "cross_entropy")


def make_activation(activation: str) -> nn.Module:
    """Return a fresh activation layer for the name ``activation``.

    Raises:
        ValueError: If ``activation`` is not one of the supported names.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {tuple(_ACTIVATIONS)}; got {activation!r}."
        )
    return _ACTIVATIONS[activation]()


def check_widths(name: str, widths: Sequence[int], allow_empty: bool) -> None:
    """Check that ``widths`` is a sequence of positive integers.

    Raises:
        ValueError: If an entry is not a positive integer, or if the sequence is
            empty and ``allow_empty`` is false.
    """
    valid = isinstance(widths, Sequence) and not isinstance(widths, str)
    if valid:
        valid = all(
            isinstance(width, int) and not isinstance(width, bool) and width >= 1
            for width in widths
        )
    if not valid or (not widths and not allow_empty):
        accepted = "a" if allow_empty else "a non-empty"
        raise ValueError(
            f"{name} must be {accepted} sequence of positive integers; got {widths!r}."
        )


def _labels(targets: Tensor) -> Tensor:
    """Class labels of one-hot (or probability) targets, or the labels themselves."""
    return targets.argmax(dim=-1) if targets.ndim == 2 else targets


class _Classifier(LightningModule):
    r"""A classifier trained with the half squared error or the cross-entropy.

    Subclasses build the network and define ``forward``. This class computes the loss
    of a batch ``(inputs, targets)`` of :math:`N` examples with outputs
    :math:`f(x_n) \in \mathbb{R}^C`,

    * ``loss="mse"``: :math:`\frac{1}{N} \sum_n \frac12 \lVert f(x_n) - y_n \rVert^2`
      against one-hot targets :math:`y_n`; integer class labels are one-hot encoded
      first, with :math:`C` classes;
    * ``loss="cross_entropy"``: :math:`-\frac{1}{N} \sum_n \sum_c y_{nc}
      \log \operatorname{softmax}(f(x_n))_c`, with class labels or one-hot (or
      probability) targets :math:`y_n`,

    and logs it with the micro-averaged accuracy of :math:`\arg\max_c f(x_n)_c`.
    ``training_step`` and :meth:`curvature_loss` both take the loss from
    ``_outputs_and_loss``, so the probed loss is the trained loss by construction.
    ``backward`` is :func:`~lightning_eos.optim.backward_with_graph`, so the
    second-order optimizers of :mod:`lightning_eos.optim` get exact Hessian-vector
    products; with any other optimizer it is Lightning's backward.

    Args:
        num_classes: The number of classes :math:`C`, at least 2.
        activation: The name of the activation the subclass builds its layers with.
        loss: ``"mse"`` or ``"cross_entropy"``.
    """

    def __init__(self, num_classes: int, activation: Activation, loss: Loss) -> None:
        super().__init__()
        make_activation(activation)  # fails fast on a bad name, even without layers
        check_int("output_dim", num_classes, low=2)
        if loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}; got {loss!r}.")

        self.loss_name = loss
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    backward = backward_with_graph

    def criterion(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Return the mean loss of ``outputs`` against ``targets`` (see the class).

        Args:
            outputs: Outputs of shape ``(N, C)``.
            targets: Class labels of shape ``(N,)`` or targets of shape ``(N, C)``.

        Returns:
            The scalar loss.
        """
        if self.loss_name == "mse":
            if not targets.is_floating_point() and targets.ndim == outputs.ndim - 1:
                targets = F.one_hot(targets.long(), outputs.shape[-1])
            return half_squared_error(outputs, targets)
        if targets.is_floating_point():
            targets = targets.to(outputs.dtype)
        return F.cross_entropy(outputs, targets)

    def curvature_loss(self, batch: Any) -> Tensor:
        """Return the loss of ``batch`` exactly as ``training_step`` computes it.

        This is the function of the parameters that curvature probes differentiate,
        often under :func:`torch.func.functional_call` with substituted parameters, so
        it runs the network through ``self(...)`` and neither logs nor updates any
        metric. The forward pass is that of training: a BatchNorm layer in train mode
        normalizes with the batch statistics and updates its running statistics,
        unless the caller substitutes copies of the buffers, as the probes do.

        Args:
            batch: A tuple ``(inputs, targets)``.

        Returns:
            The scalar loss.
        """
        return self._outputs_and_loss(batch)[1]

    def _outputs_and_loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        outputs = self(inputs)
        return outputs, self.criterion(outputs, targets)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Return the training loss; log it and the accuracy of this batch."""
        outputs, loss = self._outputs_and_loss(batch)
        batch_size = outputs.shape[0]

        self.train_accuracy(outputs.detach().argmax(dim=-1), _labels(batch[1]))
        self.log(
            "train/loss",
            loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=batch_size,
        )
        self.log(
            "train/accuracy",
            self.train_accuracy,
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log the loss and the accuracy on the validation data, per epoch."""
        self._evaluation_step(batch, "val", self.val_accuracy)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log the loss and the accuracy on the test data, per epoch."""
        self._evaluation_step(batch, "test", self.test_accuracy)

    def _evaluation_step(
        self, batch: Any, prefix: str, accuracy: MulticlassAccuracy
    ) -> None:
        outputs, loss = self._outputs_and_loss(batch)
        batch_size = outputs.shape[0]

        accuracy.update(outputs.argmax(dim=-1), _labels(batch[1]))
        self.log(
            f"{prefix}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=prefix == "val",
            batch_size=batch_size,
            sync_dist=True,
        )
        self.log(
            f"{prefix}/accuracy",
            accuracy,
            on_step=False,
            on_epoch=True,
            batch_size=batch_size,
        )
