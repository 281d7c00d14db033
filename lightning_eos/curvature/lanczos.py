"""Top algebraic eigenpairs of a symmetric operator by block Lanczos."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from lightning_eos._validation import check_int

#: Eigenvalues below this fraction of ‖H‖ are resolved to an absolute accuracy of
#: ``tol`` times this fraction of ‖H‖ instead of to a relative one.
_SMALL_EIGENVALUE = 1e-2


class SymmetricOperator(Protocol):
    """What the eigensolver needs: a dimension, a type and products with blocks."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return the products with the rows of a ``(b, dim)`` tensor."""


class DenseOperator:
    """A symmetric matrix held in memory, as a :class:`SymmetricOperator`."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                f"`matrix` must be square, got shape {tuple(matrix.shape)}."
            )
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.num_products = 0

    def matmat(self, vectors: Tensor) -> Tensor:
        """Return the products with the rows of a ``(b, dim)`` tensor."""
        self.num_products += vectors.shape[0]
        return vectors @ self.matrix.T


@dataclass
class Eigenpairs:
    """Result of :func:`lanczos`.

    Attributes:
        eigenvalues: The ``k`` largest Ritz values, in decreasing order (float64).
        eigenvectors: The matching unit Ritz vectors, one per row.
        extra_vectors: The Ritz vectors ranked after the top ``k`` (``extra`` of them,
            fewer if the basis is smaller), whose convergence was not required.
        residuals: Their residual norms ``‖Hu − λu‖`` (float64).
        converged: Whether every residual met the tolerance. When ``False`` the
            values are the best found within ``max_iter`` steps, not answers.
        finite: ``False`` if a product contained NaN or infinity; the eigenvalues
            are then NaN.
        num_products: Operator-vector products spent.
        num_iterations: Block Lanczos steps taken.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    extra_vectors: Tensor
    residuals: Tensor
    converged: bool
    finite: bool
    num_products: int
    num_iterations: int


class _Basis:
    """Orthonormal rows, stored in a buffer that grows geometrically."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self._rows = torch.empty(0, dim, dtype=dtype, device=device)
        self.size = 0

    @property
    def rows(self) -> Tensor:
        return self._rows[: self.size]

    def append(self, block: Tensor) -> None:
        needed = self.size + block.shape[0]
        if needed > self._rows.shape[0]:
            grown = torch.empty(
                max(needed, 2 * self._rows.shape[0], 8),
                self._rows.shape[1],
                dtype=self._rows.dtype,
                device=self._rows.device,
            )
            grown[: self.size] = self.rows
            self._rows = grown
        self._rows[self.size : needed] = block
        self.size = needed

    def project_out(self, vectors: Tensor, extra: Tensor | None = None) -> Tensor:
        """Remove the components along the basis (and ``extra`` rows), twice (CGS2)."""
        rows = self.rows if extra is None else torch.cat([self.rows, extra])
        for _ in range(2):
            vectors = vectors - (vectors @ rows.T) @ rows
        return vectors


def _orthonormalize(
    vectors: Tensor,
    basis: _Basis,
    tiny: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Orthonormalize rows against the basis and each other.

    Returns the new rows ``Q`` and coefficients ``R`` with ``vectors ≈ Rᵀ Q`` (rows),
    ignoring the parts along the basis. A row whose new part is below ``tiny`` (the
    Krylov space has become invariant along it) is replaced by a random direction
    orthogonal to everything so far, with a zero coefficient; when the whole space
    is spanned, it is dropped.
    """
    dim = vectors.shape[1]
    new_rows: list[Tensor] = []
    coefficients = torch.zeros(vectors.shape[0], vectors.shape[0], dtype=torch.float64)
    for column, vector in enumerate(vectors):
        vector = basis.project_out(vector.unsqueeze(0))
        if new_rows:
            block = torch.stack(new_rows)
            for _ in range(2):
                coef = vector @ block.T
                vector = vector - coef @ block
                coefficients[: len(new_rows), column] += coef.squeeze(0).double().cpu()
        norm = float(vector.norm())
        if norm > tiny:
            coefficients[len(new_rows), column] = norm
            new_rows.append(vector.squeeze(0) / norm)
            continue
        if basis.size + len(new_rows) >= dim:
            continue  # the space is exhausted: nothing left to add
        extra = torch.stack(new_rows) if new_rows else None
        fresh = _random_rows(1, dim, vectors.dtype, vectors.device, generator)
        fresh = basis.project_out(fresh, extra)
        new_rows.append(fresh.squeeze(0) / fresh.norm())
    if not new_rows:
        return vectors.new_zeros(0, dim), coefficients[:0]
    return torch.stack(new_rows), coefficients[: len(new_rows)]


def _random_rows(
    count: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Tensor:
    rows = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    return rows.to(device=device, dtype=dtype)


def _block_tridiagonal(diagonal: list[Tensor], lower: list[Tensor]) -> Tensor:
    sizes = [block.shape[0] for block in diagonal]
    total = sum(sizes)
    matrix = torch.zeros(total, total, dtype=torch.float64)
    start = 0
    for index, block in enumerate(diagonal):
        stop = start + sizes[index]
        matrix[start:stop, start:stop] = block
        if index + 1 < len(diagonal):
            below = lower[index]
            matrix[stop : stop + below.shape[0], start:stop] = below
            matrix[start:stop, stop : stop + below.shape[0]] = below.T
        start = stop
    return matrix


def warm_start(vectors: Tensor | None, dim: int) -> Tensor | None:
    """The eigenvectors of an earlier solve as the next start block, if they fit.

    A callback keeps the eigenvectors of its last solve to start the next one.
    When the trainable parameters change between two solves (a layer frozen or
    unfrozen during training) those vectors have another length: the next solve
    then starts cold, from random vectors, instead of failing. A change to as
    many other parameters keeps the vectors as a start block like any other:
    the solve converges from it all the same, only not faster.

    Args:
        vectors: The kept eigenvectors, one per row, or ``None``.
        dim: The dimension of the operator of the next solve.
    """
    if vectors is None or vectors.shape[-1] != dim:
        return None
    return vectors


def lanczos(
    operator: SymmetricOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: Tensor | None = None,
    block_size: int | None = None,
    generator: torch.Generator | None = None,
    extra: int = 0,
) -> Eigenpairs:
    r"""The ``k`` largest (algebraic) eigenpairs of a symmetric operator.

    Block Lanczos with full reorthogonalization (classical Gram-Schmidt, applied
    twice) builds an orthonormal basis :math:`Q` of the block Krylov space
    :math:`\{V_0, HV_0, H^2V_0, \dots\}` and the block tridiagonal
    :math:`T = Q^\top H Q`; the Ritz pairs :math:`(\theta_i, Qs_i)` of :math:`T` are
    the estimates (Golub and Van Loan, *Matrix Computations*, §10.3). Eigenvalues
    are ranked algebraically, so a large negative eigenvalue is never mistaken for
    the top one. Full reorthogonalization prevents the ghost copies of converged
    eigenvalues that plain Lanczos produces, and a block of ``block_size`` vectors
    resolves eigenvalues repeated up to ``block_size`` times, which a single
    starting vector cannot.

    Stopping rule: the residual norm of each of the top ``k`` Ritz pairs,
    :math:`\|Hu_i - \theta_i u_i\| = \|B_{j+1} s_i^{(j)}\|` (exact in exact
    arithmetic, no extra product), is at most ``tol · |θ_i|``. Since some
    eigenvalue of :math:`H` lies within the residual norm of :math:`\theta_i`, each
    returned value is then accurate to ``tol`` relative, and usually much better (the
    error is about the residual squared over the spectral gap). For a Ritz value
    smaller than 1 % of the largest one in magnitude (an estimate of
    :math:`\|H\|`), ``|θ_i|`` is replaced by that 1 %, so that a zero eigenvalue is
    resolved to an absolute accuracy instead. A solve that runs out of steps returns
    ``converged=False``.

    Warm start: the rows of ``init`` (for example the previous eigenvectors) start
    the block; missing rows are random. When ``init`` is already an invariant
    subspace of :math:`H` the solve stops after one block; an eigenvalue whose
    eigenvector is orthogonal to every start vector and to their Krylov space is
    invisible to any Krylov method.

    Memory: the basis holds at most ``(max_iter + 1) · block_size`` vectors.

    Args:
        operator: The symmetric operator (see :class:`SymmetricOperator`).
        k: How many of the largest eigenvalues to return, ``1 ≤ k ≤ dim``.
        tol: Relative residual tolerance, positive.
        max_iter: Most block steps, at least 1.
        init: Start vectors, shape ``(n, dim)`` or ``(dim,)``; need not be orthonormal.
        block_size: Vectors per block, at least 1; defaults to ``k``.
        extra: How many Ritz vectors ranked after the top ``k`` to return too, not
            required to converge. Passed with the eigenvectors as ``init`` of the next
            solve (with ``block_size = k + extra``), they guard against the
            ``k + 1``-th eigenvalue overtaking the ``k``-th unnoticed.
        generator: Source of the random start vectors (a CPU generator); a
            generator seeded with 0 by default, so results are reproducible and the
            global random stream is left alone.

    Returns:
        The :class:`Eigenpairs`.

    Raises:
        ValueError: If an argument is outside the range stated above.

    Example:
        >>> import torch
        >>> from lightning_eos.curvature import DenseOperator, lanczos
        >>> H = torch.diag(torch.tensor([-5.0, 1.0, 2.0, 3.0], dtype=torch.float64))
        >>> result = lanczos(DenseOperator(H), k=2, tol=1e-10)
        >>> [round(v, 6) for v in result.eigenvalues.tolist()]
        [3.0, 2.0]
    """
    dim = operator.dim
    if not isinstance(k, int) or not 1 <= k <= dim:
        raise ValueError(
            f"`k` must be an integer in [1, {dim}] (the dimension), got {k!r}."
        )
    if not tol > 0:
        raise ValueError(f"`tol` must be positive, got {tol!r}.")
    check_int("max_iter", max_iter)
    block = min(check_int("block_size", k if block_size is None else block_size), dim)
    check_int("extra", extra, low=0)
    if max_iter * block < k:
        raise ValueError(
            f"`max_iter` × `block_size` must be at least `k` = {k} to find {k} "
            f"eigenvalues, got {max_iter} × {block}."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    dtype, device = operator.dtype, operator.device
    eps = torch.finfo(dtype).eps

    # Start block: the given vectors, completed with random ones.
    start = _random_rows(0, dim, dtype, device, generator)
    if init is not None:
        init = init.reshape(-1, dim) if init.dim() == 1 else init
        if init.dim() != 2 or init.shape[1] != dim:
            raise ValueError(
                f"`init` must have shape (n, {dim}) or ({dim},), got "
                f"{tuple(init.shape)}."
            )
        start = init[:block].to(dtype=dtype, device=device)
    if start.shape[0] < block:
        fill = _random_rows(block - start.shape[0], dim, dtype, device, generator)
        start = torch.cat([start, fill])
    basis = _Basis(dim, dtype, device)
    scale = float(start.norm(dim=1).max()) or 1.0
    current, _ = _orthonormalize(start, basis, 100 * eps * scale, generator)
    basis.append(current)

    diagonal: list[Tensor] = []
    lower: list[Tensor] = []
    products = 0
    h_norm = 0.0
    for iteration in range(1, max_iter + 1):
        images = operator.matmat(current)
        products += current.shape[0]
        if not torch.isfinite(images).all():
            return _non_finite(k, dim, dtype, device, products, iteration)
        h_norm = max(h_norm, float(images.norm(dim=1).max()))

        diagonal_block = (current @ images.T).double().cpu()
        diagonal.append((diagonal_block + diagonal_block.T) / 2)
        residual = basis.project_out(images)
        following, coupling = _orthonormalize(
            residual, basis, 100 * eps * h_norm, generator
        )

        ritz_values, ritz_coords = torch.linalg.eigh(
            _block_tridiagonal(diagonal, lower)
        )
        if ritz_values.numel() < k and following.shape[0] > 0:
            lower.append(coupling)
            basis.append(following)
            current = following
            continue
        order = torch.argsort(ritz_values, descending=True)
        top, following_top = order[:k], order[k : k + extra]
        last = ritz_coords[-current.shape[0] :, top]
        residuals = (
            (coupling @ last).norm(dim=0) if coupling.numel() else last.new_zeros(k)
        )
        floor = _SMALL_EIGENVALUE * float(ritz_values.abs().max())
        bound = tol * ritz_values[top].abs().clamp_min(floor)
        converged = bool((residuals <= bound).all()) or following.shape[0] == 0
        if converged or iteration == max_iter:
            coords = ritz_coords[:, torch.cat([top, following_top])]
            vectors = coords.T.to(dtype=dtype, device=device) @ basis.rows
            vectors = vectors / vectors.norm(dim=1, keepdim=True)
            return Eigenpairs(
                eigenvalues=ritz_values[top].clone(),
                eigenvectors=vectors[:k],
                extra_vectors=vectors[k:],
                residuals=residuals,
                converged=converged,
                finite=True,
                num_products=products,
                num_iterations=iteration,
            )
        lower.append(coupling)
        basis.append(following)
        current = following
    raise AssertionError("unreachable")  # pragma: no cover


def _non_finite(
    k: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    products: int,
    iteration: int,
) -> Eigenpairs:
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    return Eigenpairs(
        eigenvalues=nan,
        eigenvectors=torch.full((k, dim), float("nan"), dtype=dtype, device=device),
        extra_vectors=torch.empty(0, dim, dtype=dtype, device=device),
        residuals=nan.clone(),
        converged=False,
        finite=False,
        num_products=products,
        num_iterations=iteration,
    )
