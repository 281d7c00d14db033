"""Exact Hessian-vector products of a probe objective (Pearlmutter's trick)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_eos.curvature.objective import ProbeObjective


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2 L(\theta)` at a fixed point, as a linear operator.

    A product :math:`Hv` is the gradient of :math:`\langle \nabla L(\theta), v\rangle`
    (Pearlmutter 1994), obtained by differentiating the first backward pass a second
    time; it is exact up to round-off, for any model autograd can differentiate twice.
    The first backward pass is built with ``create_graph=True``.

    Cost. When the probe set held by this process is a single chunk, the graph of
    the first backward pass is kept for the life of the operator and every product
    is one double-backward pass (about 1.5 gradient evaluations on the digits MLP on
    a CPU, see ``benchmarks/``). With several chunks, the graph of each chunk is
    rebuilt for every call and freed before the next chunk, so memory stays that of
    one chunk; a call with ``b`` vectors then costs one forward and backward pass per
    chunk plus ``b`` double-backward passes. Products with several vectors at once
    (``matmat``) share those passes.

    Under data parallelism each process holds a shard of the probe set and
    ``objective.all_reduce`` sums the local products: every process then holds the
    same product, and every call runs exactly one collective on every process.

    Args:
        objective: The loss on the probe set.
        point: θ as a flat vector; the module's current parameters by default. It is
            copied: later changes to the module do not change this operator.
        vectorize: Compute several products in one vectorized double-backward pass
            (``torch.autograd.grad(..., is_grads_batched=True)``) instead of a loop.
            On a CPU the loop is faster (see ``benchmarks/``).

    Attributes:
        num_products: Number of Hessian-vector products computed so far.
    """

    def __init__(
        self,
        objective: ProbeObjective,
        point: Tensor | None = None,
        *,
        vectorize: bool = False,
    ) -> None:
        self.objective = objective
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.device = objective.device
        self.vectorize = vectorize
        theta = objective.point() if point is None else point.detach().to(self.dtype)
        if theta.shape != (self.dim,):
            raise ValueError(
                f"`point` must be a flat vector of {self.dim} entries, got shape "
                f"{tuple(theta.shape)}."
            )
        self.point = theta.clone()
        self.num_products = 0
        self._cache: tuple[list[Tensor], list[Tensor]] | None = None
        self._loss: Tensor | None = None
        self._gradient: Tensor | None = None
        self._local_first_order: tuple[Tensor, Tensor] | None = None

    # -- products --------------------------------------------------------------------

    def matvec(self, vector: Tensor) -> Tensor:
        """Return :math:`Hv` for a flat vector ``v``."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors) if vectors.dim() == 1 else self.matmat(vectors)

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return the products :math:`Hv_i` for the rows ``v_i`` of a ``(b, dim)`` tensor."""
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"Expected vectors of shape (b, {self.dim}), got {tuple(vectors.shape)}."
            )
        vectors = vectors.to(dtype=self.dtype, device=self.device)
        result = torch.zeros_like(vectors)
        for variables, gradient in self._graphs():
            result += self._double_backward(gradient, variables, vectors)
        self.num_products += vectors.shape[0]
        return self.objective._reduce(result)

    # -- first-order quantities at the point --------------------------------------------

    def gradient(self) -> Tensor:
        r"""The gradient :math:`\nabla L(\theta)` as a flat vector (summed over ranks)."""
        if self._gradient is None:
            self._first_order()
        assert self._gradient is not None
        return self._gradient

    def loss(self) -> float:
        """The loss :math:`L(\\theta)` (summed over ranks)."""
        if self._loss is None:
            self._first_order()
        assert self._loss is not None
        return float(self._loss.item())

    # -- internals -------------------------------------------------------------------

    def _leaf_variables(self) -> list[Tensor]:
        return [
            t.detach().requires_grad_()
            for t in self.objective.split(self.point.clone())
        ]

    def _graphs(self):
        """Yield ``(variables, gradient-with-graph)`` for each local chunk."""
        if self._cache is not None:
            yield self._cache
            return
        keep = len(self.objective.chunks) == 1
        variables = self._leaf_variables()
        losses = self.objective.chunk_losses(variables)
        for loss in losses:
            gradient = torch.autograd.grad(
                loss, variables, create_graph=True, materialize_grads=True
            )
            pair = (variables, list(gradient))
            if keep:
                self._cache = pair
                flat = self.objective.flatten([g.detach() for g in gradient])
                self._local_first_order = (loss.detach(), flat)
            yield pair

    def _double_backward(
        self, gradient: list[Tensor], variables: list[Tensor], vectors: Tensor
    ) -> Tensor:
        # A gradient entry without graph is constant in θ (the loss is at most linear
        # in those parameters): it contributes nothing to the product.
        live = [i for i, g in enumerate(gradient) if g.requires_grad]
        if not live:
            return torch.zeros_like(vectors)
        outputs = [gradient[i] for i in live]
        split = self.objective.split(vectors)
        if self.vectorize and vectors.shape[0] > 1:
            products = torch.autograd.grad(
                outputs,
                variables,
                grad_outputs=[split[i] for i in live],
                retain_graph=True,
                is_grads_batched=True,
                materialize_grads=True,
            )
            return self.objective.flatten(products, batched=True)
        rows = []
        for row in range(vectors.shape[0]):
            products = torch.autograd.grad(
                outputs,
                variables,
                grad_outputs=[split[i][row] for i in live],
                retain_graph=True,
                materialize_grads=True,
            )
            rows.append(self.objective.flatten(products))
        return torch.stack(rows)

    def _first_order(self) -> None:
        if len(self.objective.chunks) == 1:
            if self._cache is None:
                for _ in self._graphs():  # builds the graph and keeps loss and gradient
                    pass
            assert self._local_first_order is not None
            loss, gradient = self._local_first_order
        else:
            loss = torch.zeros((), dtype=self.dtype, device=self.device)
            gradient = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
            variables = self._leaf_variables()
            for chunk_loss in self.objective.chunk_losses(variables):
                grads = torch.autograd.grad(
                    chunk_loss, variables, materialize_grads=True
                )
                loss = loss + chunk_loss.detach()
                gradient += self.objective.flatten(grads)
        packed = self.objective._reduce(torch.cat([loss.reshape(1), gradient]))
        self._loss, self._gradient = packed[0], packed[1:]
