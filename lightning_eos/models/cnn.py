"""A small convolutional network for the 8×8 digits."""

from collections.abc import Sequence
from itertools import pairwise

from torch import Tensor, nn
from typing_extensions import override

from lightning_eos._validation import check_bool, check_int
from lightning_eos.models._classifier import (
    Activation,
    Loss,
    _Classifier,
    check_widths,
    make_activation,
)

__all__ = ["SmallCNN"]


class SmallCNN(_Classifier):
    r"""A small convolutional classifier for tiny images such as the 8×8 digits.

    Each entry :math:`c_i` of ``channels`` adds a block

    .. math::
        h \mapsto \mathrm{BN}\bigl(\phi(\mathrm{conv}_{3 \times 3}(h))\bigr),

    a 3×3 convolution with :math:`c_i` output channels and padding 1 (the image size
    is kept), the activation :math:`\phi`, and a BatchNorm layer when
    ``batch_norm=True``. The feature maps of the last block are averaged over all
    pixels and a linear layer maps the :math:`c_L` averages to the outputs. Global
    average pooling makes the network independent of the image size. The layers keep
    PyTorch's default initialization.

    The losses, the logged metrics, :meth:`curvature_loss` and the missing
    ``configure_optimizers`` are those of :class:`~lightning_eos.models.MLP`.

    With ``batch_norm=True`` the loss depends on the mode: in train mode (as in
    ``training_step`` and :meth:`curvature_loss` during training) each BatchNorm layer
    normalizes with the statistics of the batch, so the loss of a batch is not a mean
    of per-example losses and its Hessian depends on the batch size; in eval mode the
    running statistics are used.

    Args:
        in_channels: The number of input channels (1 for the digits).
        channels: The output channels of the convolution blocks, at least one block.
        output_dim: The number of classes, at least 2.
        activation: The activation after each convolution.
        loss: ``"mse"`` for the half squared error or ``"cross_entropy"``.
        batch_norm: Whether each block ends with a ``BatchNorm2d`` layer.

    Raises:
        ValueError: If a width is not a positive integer, ``channels`` is empty, or
            ``activation`` or ``loss`` is not one of the accepted names.

    Example:
        >>> import torch
        >>> model = SmallCNN(channels=(4,))
        >>> model(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32),
        output_dim: int = 10,
        activation: Activation = "relu",
        loss: Loss = "mse",
        batch_norm: bool = False,
    ) -> None:
        super().__init__(output_dim, activation, loss)
        check_int("in_channels", in_channels)
        check_widths("channels", channels, allow_empty=False)
        check_bool("batch_norm", batch_norm)
        self.save_hyperparameters()

        widths = [in_channels, *channels]
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths):
            layers += [
                nn.Conv2d(fan_in, fan_out, kernel_size=3, padding=1),
                make_activation(activation),
            ]
            if batch_norm:
                layers.append(nn.BatchNorm2d(fan_out))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], output_dim)

    @override
    def forward(self, inputs: Tensor) -> Tensor:
        """Return the outputs ``f(x)`` of shape ``(N, output_dim)``.

        Args:
            inputs: Images of shape ``(N, in_channels, H, W)``.

        Raises:
            ValueError: If ``inputs`` is not four-dimensional.
        """
        if inputs.ndim != 4:
            raise ValueError(
                "inputs must be images of shape (N, C, H, W); got shape "
                f"{tuple(inputs.shape)}. DigitsDataModule(flatten=False) serves them."
            )
        return self.head(self.pool(self.features(inputs)).flatten(start_dim=1))
