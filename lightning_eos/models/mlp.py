"""The fully connected network of the Edge-of-Stability reference experiments."""

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

__all__ = ["MLP"]


class MLP(_Classifier):
    r"""A fully connected classifier, by default the "fc-tanh" network of Cohen et al.

    With hidden widths :math:`d_1, \dots, d_L` and activation :math:`\phi`, the network
    computes

    .. math::
        f(x) = W_{L+1}\, \phi\bigl(W_L \cdots \phi(W_1 x + b_1) \cdots + b_L\bigr)
        + b_{L+1},

    two hidden layers of 200 tanh units by default. Inputs of shape ``(N, ...)`` are
    flattened to ``(N, input_dim)`` first, so images work as well. The weights keep
    PyTorch's default initialization of ``nn.Linear``.

    The loss is the half squared error against one-hot targets (``loss="mse"``, the
    convention of Cohen et al.; integer class labels are one-hot encoded internally)
    or the cross-entropy against class labels or one-hot/probability targets
    (``loss="cross_entropy"``):

    .. math::
        L_{\mathrm{mse}} = \frac{1}{N} \sum_n \frac12 \lVert f(x_n) - y_n \rVert^2,
        \qquad
        L_{\mathrm{ce}} = -\frac{1}{N} \sum_n \sum_c y_{nc}
        \log \operatorname{softmax}(f(x_n))_c.

    ``training_step`` logs ``train/loss`` (every step, on the progress bar) and
    ``train/accuracy``; ``validation_step`` and ``test_step`` log ``val/loss``,
    ``val/accuracy``, ``test/loss`` and ``test/accuracy`` per epoch. The accuracy is
    micro-averaged over the examples. :meth:`curvature_loss` returns the training loss
    of a batch without any side effect, for the curvature probes.

    The module defines no ``configure_optimizers`` on purpose: the step size is the
    experiment's main variable, so the optimizer comes from the ``optimizer:``
    section of the ``lightning-eos`` command line (for example ``--optimizer
    torch.optim.SGD --optimizer.lr 0.05``). In plain Python, subclass it:

    .. code-block:: python

        class SGDMLP(MLP):
            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

    Args:
        input_dim: The number of input features (64 for the 8×8 digits).
        hidden_dims: The widths of the hidden layers, possibly none.
        output_dim: The number of classes, at least 2.
        activation: The activation after each hidden layer.
        loss: ``"mse"`` for the half squared error or ``"cross_entropy"``.
        bias: Whether the linear layers have biases.

    Raises:
        ValueError: If a width is not a positive integer or ``activation`` or
            ``loss`` is not one of the accepted names.

    Example:
        >>> import torch
        >>> model = MLP(hidden_dims=(8,))
        >>> inputs, labels = torch.randn(5, 64), torch.tensor([0, 1, 2, 3, 4])
        >>> model(inputs).shape
        torch.Size([5, 10])
        >>> model.curvature_loss((inputs, labels)).shape
        torch.Size([])

    References:
        Cohen, Kaur, Li, Kolter and Talwalkar. Gradient Descent on Neural Networks
        Typically Occurs at the Edge of Stability. ICLR 2021.
    """

    def __init__(
        self,
        input_dim: int = 64,
        hidden_dims: Sequence[int] = (200, 200),
        output_dim: int = 10,
        activation: Activation = "tanh",
        loss: Loss = "mse",
        bias: bool = True,
    ) -> None:
        super().__init__(output_dim, activation, loss)
        check_int("input_dim", input_dim)
        check_widths("hidden_dims", hidden_dims, allow_empty=True)
        check_bool("bias", bias)
        self.save_hyperparameters()

        widths = [input_dim, *hidden_dims]
        layers: list[nn.Module] = []
        for fan_in, fan_out in pairwise(widths):
            layers += [
                nn.Linear(fan_in, fan_out, bias=bias),
                make_activation(activation),
            ]
        layers.append(nn.Linear(widths[-1], output_dim, bias=bias))
        self.network = nn.Sequential(*layers)

    @override
    def forward(self, inputs: Tensor) -> Tensor:
        """Return the outputs ``f(x)`` of shape ``(N, output_dim)``.

        Args:
            inputs: Inputs of shape ``(N, input_dim)``, or ``(N, ...)`` with
                ``input_dim`` entries per example.
        """
        return self.network(inputs.flatten(start_dim=1))
