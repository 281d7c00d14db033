r"""The half squared error, the regression loss of the Edge-of-Stability experiments.

For a batch of :math:`N` examples with outputs :math:`f(x_n) \in \mathbb{R}^C` and
targets :math:`y_n \in \mathbb{R}^C`,

.. math::
    L = \frac{1}{N} \sum_{n=1}^{N} \frac{1}{2} \lVert f(x_n) - y_n \rVert_2^2,

the squared error summed over the output coordinates, halved, and averaged over the
examples. This is the convention of Cohen et al. (2021), under which the Hessian of the
loss with respect to the outputs is :math:`I / N` and gradient descent with step size
:math:`\eta` is stable on a quadratic exactly while the sharpness stays below
:math:`2 / \eta`.

It is not the scale of ``torch.nn.MSELoss()``: with its default ``reduction="mean"``
that loss averages over all :math:`N C` elements and does not halve, so

.. math::
    L = \frac{C}{2}\, \mathrm{MSELoss}_{\mathrm{mean}}
      = \frac{1}{2N}\, \mathrm{MSELoss}_{\mathrm{sum}},

and the sharpness of the two differs by the factor :math:`C / 2` (five for ten
classes).

References:
    Cohen, Kaur, Li, Kolter and Talwalkar. Gradient Descent on Neural Networks
    Typically Occurs at the Edge of Stability. ICLR 2021.
"""

from torch import Tensor, nn

__all__ = ["HalfSquaredError", "half_squared_error"]


def half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Half the squared error, summed over outputs and averaged over examples.

    Computes :math:`\frac{1}{N} \sum_n \frac{1}{2} \lVert f(x_n) - y_n \rVert^2` where
    the first dimension indexes the :math:`N` examples and all further dimensions are
    output coordinates; one-dimensional tensors hold one scalar output per example.
    This is ``C / 2`` times ``torch.nn.functional.mse_loss(outputs, targets)`` for
    ``C`` output coordinates (see the module docstring).

    Args:
        outputs: Model outputs of shape ``(N,)`` or ``(N, C, ...)``.
        targets: Targets of the same shape; they are cast to the dtype of
            ``outputs``. Class labels must be one-hot encoded first.

    Returns:
        The scalar loss, differentiable with respect to ``outputs``.

    Raises:
        ValueError: If ``outputs`` is a scalar or holds no examples, or if the shapes
            of ``outputs`` and ``targets`` differ (no broadcasting: a ``(N, 1)``
            against ``(N,)`` mismatch would otherwise silently give an
            ``(N, N)`` error).

    Example:
        >>> import torch
        >>> outputs = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
        >>> targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> half_squared_error(outputs, targets)  # (4 / 2 + 1 / 2) / 2
        tensor(1.2500)
    """
    if outputs.ndim == 0 or outputs.shape[0] == 0:
        raise ValueError(
            "outputs must have a leading batch dimension holding at least one "
            f"example; got shape {tuple(outputs.shape)}."
        )
    if outputs.shape != targets.shape:
        raise ValueError(
            f"targets must have the shape of outputs {tuple(outputs.shape)}; got "
            f"{tuple(targets.shape)}. Class labels must be one-hot encoded first."
        )

    residuals = outputs - targets.to(outputs.dtype)
    squared_norms = residuals.square().reshape(outputs.shape[0], -1).sum(dim=1)
    return 0.5 * squared_norms.mean()


class HalfSquaredError(nn.Module):
    r"""Module form of :func:`half_squared_error`.

    Computes :math:`\frac{1}{N} \sum_n \frac{1}{2} \lVert f(x_n) - y_n \rVert^2`, which
    is ``C / 2`` times ``torch.nn.MSELoss()`` for ``C`` output coordinates. It has no
    parameters and no options, so it can be handed to any code that expects a
    criterion module.

    Example:
        >>> import torch
        >>> criterion = HalfSquaredError()
        >>> criterion(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0]))
        tensor(1.)
    """

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Return the half squared error of ``outputs`` against ``targets``.

        Args:
            outputs: Model outputs of shape ``(N,)`` or ``(N, C, ...)``.
            targets: Targets of the same shape.

        Returns:
            The scalar loss.
        """
        return half_squared_error(outputs, targets)
