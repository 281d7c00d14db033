import pytest
import torch

from lightning_eos.curvature import (
    DenseOperator,
    HessianOperator,
    ProbeObjective,
    lanczos,
)

from .cases import CASES, chunks, dense_hessian, make_case, quadratic_spectrum


def assert_eigenpairs_match(result, H, k, rtol=1e-8):
    values, vectors = torch.linalg.eigh(H)
    values, vectors = values.flip(0), vectors.flip(1)
    scale = values.abs().max()
    torch.testing.assert_close(
        result.eigenvalues, values[:k], rtol=rtol, atol=rtol * scale
    )
    # Eigenvectors are compared through the projector on each eigenspace, which is
    # defined even when an eigenvalue is repeated.
    for i in range(k):
        same = (values - values[i]).abs() <= 1e-6 * scale
        projector = vectors[:, same] @ vectors[:, same].T
        u = result.eigenvectors[i].double()
        assert (projector @ u - u).norm() <= 1e-6


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenpairs_match_eigh(name, k):
    case = make_case(name)
    H = dense_hessian(case)
    objective = ProbeObjective(case.model, chunks(case), loss_fn=case.loss_fn)
    result = lanczos(HessianOperator(objective), k=k, tol=1e-10, max_iter=200)
    assert result.converged and result.finite
    assert_eigenpairs_match(result, H, k)


def test_quadratic_spectrum_is_recovered_exactly():
    """Large negative, triple top and zero eigenvalues, ranked algebraically."""
    case = make_case("quadratic")
    objective = ProbeObjective(case.model, chunks(case), loss_fn=case.loss_fn)
    result = lanczos(HessianOperator(objective), k=9, tol=1e-10)
    expected = quadratic_spectrum().sort(descending=True).values[:9]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-8, atol=1e-8)
    assert result.eigenvalues.min() == pytest.approx(0.0, abs=1e-8)


def test_no_ghost_copies_with_single_vector():
    """Without reorthogonalization converged eigenvalues reappear as copies."""
    torch.manual_seed(0)
    values = torch.cat(
        [torch.tensor([100.0, 50.0]), torch.linspace(0, 1, 298)]
    ).double()
    basis, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    H = basis @ torch.diag(values) @ basis.T
    result = lanczos(DenseOperator(H), k=3, block_size=1, tol=1e-10, max_iter=300)
    torch.testing.assert_close(
        result.eigenvalues, values.sort(descending=True).values[:3]
    )


def test_largest_magnitude_negative_is_not_returned():
    H = torch.diag(torch.tensor([-50.0, 3.0, 1.0, 0.5], dtype=torch.float64))
    result = lanczos(DenseOperator(H), k=1, tol=1e-12)
    assert result.eigenvalues.item() == pytest.approx(3.0, rel=1e-10)


def test_stopping_rule_bounds_the_residual():
    torch.manual_seed(1)
    A = torch.randn(80, 80, dtype=torch.float64)
    H = A @ A.T / 80 - 0.5 * torch.eye(80, dtype=torch.float64)
    tol = 1e-3
    result = lanczos(DenseOperator(H), k=2, tol=tol)
    assert result.converged
    for value, vector, reported in zip(
        result.eigenvalues, result.eigenvectors, result.residuals, strict=True
    ):
        true_residual = (H @ vector - value * vector).norm()
        assert true_residual == pytest.approx(reported.item(), rel=1e-6, abs=1e-12)
        assert true_residual <= tol * abs(value)
    exact = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert ((result.eigenvalues - exact).abs() <= result.residuals).all()


def test_unconverged_solve_says_so():
    torch.manual_seed(2)
    values = torch.linspace(1, 2, 200, dtype=torch.float64)
    H = torch.diag(values)
    result = lanczos(DenseOperator(H), k=1, tol=1e-12, max_iter=3)
    assert not result.converged
    assert result.num_iterations == 3
    assert result.residuals.item() > 1e-12 * 2


def test_warm_start_from_eigenvectors_needs_one_block():
    torch.manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    values = torch.linspace(-3, 10, 50, dtype=torch.float64)
    H = basis @ torch.diag(values) @ basis.T
    cold = lanczos(DenseOperator(H), k=2, tol=1e-8)
    operator = DenseOperator(H)
    warm = lanczos(operator, k=2, tol=1e-8, init=cold.eigenvectors)
    assert warm.num_products == 2 == operator.num_products
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-10, atol=0)
    assert cold.num_products > 2


def test_extra_vectors_are_the_next_ritz_vectors():
    H = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    result = lanczos(DenseOperator(H), k=1, extra=2, block_size=3, tol=1e-12)
    assert result.extra_vectors.shape == (2, 5)
    overlap = result.extra_vectors.abs() @ torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(
        overlap[:, 1:3].diagonal(), torch.ones(2, dtype=torch.float64)
    )


def test_non_finite_products_are_reported():
    H = torch.eye(4, dtype=torch.float64)
    H[0, 0] = float("nan")
    result = lanczos(DenseOperator(H), k=1)
    assert not result.finite and not result.converged
    assert torch.isnan(result.eigenvalues).all()


def test_random_start_is_reproducible_and_leaves_global_rng():
    H = torch.diag(torch.linspace(0, 1, 30, dtype=torch.float64))
    state = torch.get_rng_state()
    first = lanczos(DenseOperator(H), k=1, tol=1e-2)
    second = lanczos(DenseOperator(H), k=1, tol=1e-2)
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"`k` must be an integer in \[1, 6\] \(the dimension\), got 0"),
        ({"k": 7}, r"`k` must be an integer in \[1, 6\]"),
        ({"tol": 0.0}, "`tol` must be positive, got 0.0"),
        ({"max_iter": 0}, "`max_iter` must be an integer of at least 1, got 0"),
        ({"block_size": 0}, "`block_size` must be an integer of at least 1, got 0"),
        ({"extra": -1}, "`extra` must be an integer of at least 0, got -1"),
        ({"k": 4, "block_size": 1, "max_iter": 3}, "must be at least `k` = 4"),
        ({"init": torch.ones(2, 5)}, r"`init` must have shape \(n, 6\) or \(6,\)"),
    ],
    ids=[
        "k-zero",
        "k-too-large",
        "tol",
        "max-iter",
        "block",
        "extra",
        "budget",
        "init",
    ],
)
def test_bad_arguments(kwargs, message):
    operator = DenseOperator(torch.eye(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=message):
        lanczos(operator, **kwargs)
