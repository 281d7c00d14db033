"""Exact Hessian-vector products of a probe objective (Pearlmutter's trick)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_eos.curvature.normalization import native_normalization_calls
from lightning_eos.curvature.objective import ProbeObjective


class HessianOperator:
    r"""The Hessian :math:`H = \nabla^2 L(\theta)` at a point, as a linear operator.

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
        num_third_order: Number of third-order vectors :meth:`third_order` computed.
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
        self.num_third_order = 0
        self._cache: tuple[list[Tensor], list[Tensor]] | None = None
        self._loss: Tensor | None = None
        self._gradient: Tensor | None = None
        self._local_first_order: tuple[Tensor, Tensor] | None = None
        self._third_order_checked = False

    # -- products --------------------------------------------------------------------

    def matvec(self, vector: Tensor) -> Tensor:
        """Return :math:`Hv` for a flat vector ``v``."""
        return self.matmat(vector.unsqueeze(0)).squeeze(0)

    def __matmul__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors) if vectors.dim() == 1 else self.matmat(vectors)

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return the products :math:`Hv_i` for the rows ``v_i`` of ``vectors``.

        Args:
            vectors: The vectors, one per row.

        Returns:
            The products, one per row (summed over processes).
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(
                f"Expected vectors of shape (b, {self.dim}), got "
                f"{tuple(vectors.shape)}."
            )
        vectors = vectors.to(dtype=self.dtype, device=self.device)
        result = torch.zeros_like(vectors)
        for variables, gradient in self._graphs():
            result += self._double_backward(gradient, variables, vectors)
        self.num_products += vectors.shape[0]
        return self.objective._reduce(result)

    # -- third order ------------------------------------------------------------------

    def third_order(self, u: Tensor, v: Tensor) -> Tensor:
        r"""The third-order vector :math:`T[u, v] = \nabla_\theta(u^\top H(\theta) v)`.

        The gradient, with ``u`` and ``v`` held fixed, of the curvature along them;
        for a simple top eigenpair, :math:`\nabla \lambda_1 = T[u_1, u_1]`. Computed
        exactly by reverse mode three times: the Hessian-vector product :math:`Hv`
        is built with its own graph from the kept graph of the first backward pass,
        and differentiated once more with ``u`` as the output gradient. Rows that
        share the same ``v`` share that product, so the pairs :math:`(u_i, v)` of
        one ``v`` cost one product with graph and one backward pass each. On the
        digits MLP on a CPU this route is the fastest exact one measured
        (forward-over-forward-over-reverse and forward-over-reverse-over-reverse
        cost more, see ``benchmarks/third_order.py``).

        PyTorch's fused layer normalization, batch normalization in train mode and
        instance normalization give wrong third derivatives (see
        :mod:`lightning_eos.curvature.normalization`); an objective that calls them
        with ``normalization="native"`` is refused. Build it with
        ``normalization="plain"`` instead.

        Args:
            u: Shape ``(dim,)`` or ``(b, dim)``.
            v: The same shape as ``u``.

        Returns:
            :math:`T[u, v]` with the shape of ``u`` (summed over processes).

        Raises:
            ValueError: If the shapes differ or do not match the dimension, or if
                the objective calls a fused normalization with wrong third
                derivatives.
        """
        if u.shape != v.shape or u.shape[-1] != self.dim or u.dim() > 2:
            raise ValueError(
                f"`u` and `v` must both have shape ({self.dim},) or (b, {self.dim}); "
                f"got {tuple(u.shape)} and {tuple(v.shape)}."
            )
        self._check_third_order()
        single = u.dim() == 1
        us = u.reshape(-1, self.dim).to(dtype=self.dtype, device=self.device)
        vs = v.reshape(-1, self.dim).to(dtype=self.dtype, device=self.device)
        # T is symmetric in u and v: share the product with the more repeated one.
        groups = _rows_by_value(vs)
        by_u = _rows_by_value(us)
        if len(by_u) < len(groups):
            us, vs, groups = vs, us, by_u
        result = torch.zeros_like(us)
        for variables, gradient in self._graphs():
            live = [i for i, g in enumerate(gradient) if g.requires_grad]
            if not live:
                continue  # the loss is at most linear: the Hessian and T are zero
            for rows in groups:
                v_split = self.objective.split(vs[rows[0]])
                hv = torch.autograd.grad(
                    [gradient[i] for i in live],
                    variables,
                    grad_outputs=[v_split[i] for i in live],
                    create_graph=True,
                    retain_graph=True,
                    materialize_grads=True,
                )
                varying = [i for i, h in enumerate(hv) if h.requires_grad]
                if not varying:
                    continue  # the Hessian is constant: T is zero
                for row in rows:
                    u_split = self.objective.split(us[row])
                    derivative = torch.autograd.grad(
                        [hv[i] for i in varying],
                        variables,
                        grad_outputs=[u_split[i] for i in varying],
                        retain_graph=True,
                        materialize_grads=True,
                    )
                    result[row] += self.objective.flatten(derivative)
        self.num_third_order += us.shape[0]
        result = self.objective._reduce(result)
        return result[0] if single else result

    def third_order_form(self, u: Tensor, v: Tensor, w: Tensor) -> Tensor:
        r"""The trilinear form :math:`T[u, v, w] = \langle T[u, v], w\rangle`.

        Symmetric in its three arguments. One third-order vector per row of ``u``
        (with its ``v``); every row of ``w`` is then a dot product.

        Args:
            u: Shape ``(dim,)`` or ``(b, dim)``.
            v: The same shape as ``u``.
            w: Shape ``(dim,)`` or ``(m, dim)``.

        Returns:
            A scalar tensor for single vectors, else shape ``(b,)``, ``(m,)`` or
            ``(b, m)`` (float64, summed over processes).
        """
        if w.shape[-1] != self.dim or w.dim() > 2:
            raise ValueError(
                f"`w` must have shape ({self.dim},) or (m, {self.dim}); got "
                f"{tuple(w.shape)}."
            )
        t = self.third_order(u, v).double()
        w = w.to(device=t.device, dtype=torch.float64)
        return t @ (w.T if w.dim() == 2 else w)

    # -- first-order quantities at the point ------------------------------------------

    def gradient(self) -> Tensor:
        r"""The gradient :math:`\nabla L(\theta)`, flat (summed over processes)."""
        if self._gradient is None:
            self._first_order()
        assert self._gradient is not None
        return self._gradient

    def loss(self) -> float:
        r"""The loss :math:`L(\theta)` (summed over processes)."""
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

    def _check_third_order(self) -> None:
        """Refuse fused normalization layers, whose third derivatives are wrong."""
        if self._third_order_checked:
            return
        calls = native_normalization_calls(self.objective)
        # Every process decides together, so that none waits alone in a collective.
        flag = torch.tensor([float(bool(calls))], device=self.device)
        if float(self.objective._reduce(flag).item()) > 0:
            found = "; ".join(calls) if calls else "a fused normalization layer"
            raise ValueError(
                f"Third derivatives through {found} are wrong in PyTorch: the "
                "fused kernel's double-backward formula is not itself "
                "differentiated correctly (its Hessian-vector products are right). "
                "Build the ProbeObjective with normalization='plain', which "
                "evaluates these layers with plain tensor operations during probes "
                "(the same function, exact to every order; the module and its "
                "training are untouched), or replace the layers with "
                "lightning_eos.nn.use_plain_normalization(module)."
            )
        self._third_order_checked = True

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


def _rows_by_value(rows: Tensor) -> list[list[int]]:
    """Group the indices of equal rows, in order of first appearance."""
    groups: list[list[int]] = []
    for index in range(rows.shape[0]):
        for group in groups:
            if torch.equal(rows[group[0]], rows[index]):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups
