"""Jacobian and Gauss-Newton products from the outputs of one training forward pass."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_eos.optim._base import Derivatives, flatten, split


class OutputProducts:
    r"""Products with the Jacobian :math:`J = \partial f/\partial\theta` and the loss.

    The loss of the batch is :math:`L(\theta) = \ell(f(\theta))`, with
    :math:`f(\theta)` the outputs of the module's forward call recorded during the
    closure call and :math:`\ell` what ``training_step`` does with them. From the
    graphs kept by the backward pass (``create_graph=True``):

    * :math:`J^\top w` is one backward pass from :math:`f`;
    * :math:`Jv` is the derivative of :math:`u \mapsto J^\top u` along :math:`v`
      (the "double-backward" trick), one backward pass through a graph built once;
    * :math:`r = \nabla_f \ell` and :math:`\nabla_f^2 \ell\, u` differentiate the
      loss with respect to the outputs.

    The Gauss-Newton product is :math:`Gv = J^\top \nabla_f^2\ell\, J v`.

    Raises:
        RuntimeError: If the forward pass was not recorded exactly once as one
            tensor, or if the loss depends on the parameters other than through
            the outputs (then :math:`J^\top r \ne \nabla L`).
    """

    def __init__(self, derivatives: Derivatives, name: str) -> None:
        outputs = derivatives.outputs
        loss = derivatives.request.loss
        if len(outputs) != 1 or not isinstance(outputs[0], Tensor):
            kinds = [type(o).__name__ for o in outputs]
            raise RuntimeError(
                f"{name} needs the outputs f(θ) of the module: its forward must be "
                "called exactly once per training_step (as self(inputs)) and return "
                f"one tensor; recorded {len(outputs)} call(s) returning {kinds}."
            )
        if loss is None or not loss.requires_grad:
            raise RuntimeError(
                f"{name} needs the loss with its graph from the backward pass; add "
                "`backward = lightning_eos.optim.backward_with_graph` to the module "
                "(or call lightning_eos.optim.closure_backward in a plain closure)."
            )
        self.params = derivatives.params
        self.outputs = outputs[0]
        with torch.enable_grad():
            (self.residual,) = torch.autograd.grad(
                loss, self.outputs, create_graph=True
            )
            self._dummy = torch.zeros_like(self.outputs, requires_grad=True)
            transposed = torch.autograd.grad(
                self.outputs,
                self.params,
                grad_outputs=self._dummy,
                create_graph=True,
                allow_unused=True,
            )
        self._transposed = [t for t in transposed if t is not None and t.requires_grad]
        self._live = [
            i for i, t in enumerate(transposed) if t is not None and t.requires_grad
        ]
        self.num_outputs = self.outputs.numel()

        # Terms a callback added to the objective (a penalty) do not pass through
        # the outputs: compare Jᵀr with the gradient of the loss alone.
        loss_gradient = derivatives.gradient
        if derivatives.added_gradient is not None:
            loss_gradient = loss_gradient - derivatives.added_gradient
        gradient = self.vjp(self.residual.detach())
        error = float((gradient - loss_gradient).norm())
        # The subtraction loses the digits of the whole gradient, not of ∇L's.
        scale = float(derivatives.gradient.norm())
        tolerance = 10 * math.sqrt(torch.finfo(gradient.dtype).eps) * max(scale, 1e-30)
        if error > tolerance:
            raise RuntimeError(
                f"{name}: the loss depends on the parameters other than through the "
                "recorded outputs (Jᵀ∇_f ℓ differs from ∇L by "
                f"{error / max(scale, 1e-30):.1e} relative): for example a penalty on "
                "the weights added in training_step (attach it with "
                "lightning_eos.penalties.PenaltyCallback instead, which keeps its "
                "gradient apart). Gauss-Newton curvature needs L(θ) = ℓ(f(θ))."
            )

    def jvp(self, vector: Tensor) -> Tensor:
        r""":math:`Jv` for a flat parameter vector, shaped like the outputs."""
        if not self._live:
            return torch.zeros_like(self.outputs)
        pieces = split(vector, self.params)
        with torch.enable_grad():
            (product,) = torch.autograd.grad(
                self._transposed,
                self._dummy,
                grad_outputs=[pieces[i] for i in self._live],
                retain_graph=True,
            )
        return product.detach()

    def vjp(self, outputs_vector: Tensor) -> Tensor:
        r""":math:`J^\top w` as a flat parameter vector."""
        with torch.enable_grad():
            products = torch.autograd.grad(
                self.outputs,
                self.params,
                grad_outputs=outputs_vector,
                retain_graph=True,
                allow_unused=True,
            )
        return flatten(products, self.params)

    def loss_hvp(self, outputs_vector: Tensor) -> Tensor:
        r""":math:`\nabla_f^2 \ell\, u`, shaped like the outputs."""
        if not self.residual.requires_grad:
            return torch.zeros_like(outputs_vector)
        with torch.enable_grad():
            (product,) = torch.autograd.grad(
                self.residual,
                self.outputs,
                grad_outputs=outputs_vector,
                retain_graph=True,
                allow_unused=True,
            )
        return torch.zeros_like(outputs_vector) if product is None else product

    def gauss_newton(self, vector: Tensor) -> Tensor:
        r""":math:`J^\top \nabla_f^2\ell\, J v` for a flat parameter vector."""
        return self.vjp(self.loss_hvp(self.jvp(vector)))
