import pytest
import torch

from lightning_eos.curvature import (
    DenseOperator,
    HessianOperator,
    hutchinson,
    hutchpp,
    spectral_density,
)

from .cases import dense_hessian, make_case
from .test_hessian import objective_for

DTYPE = torch.float64
ESTIMATORS = {"hutchinson": hutchinson, "hutchpp": hutchpp}


def random_symmetric(dim, seed):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    # A few large eigenvalues on a bulk, some negative: a Hessian-like spectrum.
    spectrum = torch.cat(
        [
            torch.tensor([40.0, 25.0, 12.0], dtype=DTYPE),
            torch.randn(dim - 3, generator=generator, dtype=DTYPE),
        ]
    )
    return basis @ torch.diag(spectrum) @ basis.T


def test_hutchinson_is_exact_on_a_diagonal_with_rademacher_vectors():
    diagonal = torch.linspace(-3, 7, 30, dtype=DTYPE)
    result = hutchinson(DenseOperator(torch.diag(diagonal)), 5)
    assert result.estimate == pytest.approx(float(diagonal.sum()), rel=1e-12)
    assert result.stderr == pytest.approx(0, abs=1e-12)
    assert result.num_products == 5


@pytest.mark.stochastic
def test_hutchpp_is_unbiased_on_a_diagonal():
    # Hutch++ is not exact on a diagonal (the deflated remainder is not diagonal),
    # but it is unbiased: over 150 independent runs the mean is within 4 standard
    # errors of the mean of the truth.
    diagonal = torch.linspace(-3, 7, 30, dtype=DTYPE)
    generator = torch.Generator().manual_seed(0)
    estimates = torch.tensor(
        [
            hutchpp(
                DenseOperator(torch.diag(diagonal)), 9, generator=generator
            ).estimate
            for _ in range(150)
        ]
    )
    error = estimates.std() / 150**0.5
    assert abs(float(estimates.mean()) - float(diagonal.sum())) < 4 * float(error)


@pytest.mark.stochastic
@pytest.mark.parametrize("method", list(ESTIMATORS))
def test_estimates_are_within_their_reported_error(method):
    # Over 40 matrices and seeds, every estimate lies within 5 reported standard
    # errors of the trace and at least 80 % within 2 (95 % expected for a normal
    # mean with a known error; the error is itself estimated from 16 samples).
    scores = []
    for seed in range(40):
        matrix = random_symmetric(60, seed)
        result = ESTIMATORS[method](
            DenseOperator(matrix),
            48 if method == "hutchpp" else 16,
            generator=torch.Generator().manual_seed(seed),
        )
        scores.append((result.estimate - float(matrix.trace())) / result.stderr)
    scores = torch.tensor(scores).abs()
    assert float(scores.max()) < 5
    assert float((scores < 2).double().mean()) >= 0.8


def test_hutchpp_has_the_smaller_error_on_a_dominated_spectrum():
    matrix = random_symmetric(60, 1)
    plain = hutchinson(DenseOperator(matrix), 48)
    sketched = hutchpp(DenseOperator(matrix), 48)
    assert sketched.stderr < plain.stderr / 2


@pytest.mark.stochastic
def test_trace_of_a_network_hessian():
    case = make_case("mlp")
    result = hutchpp(HessianOperator(objective_for(case)), 60)
    truth = float(dense_hessian(case).trace())
    assert abs(result.estimate - truth) < 5 * result.stderr


def clustered_spectrum():
    generator = torch.Generator().manual_seed(3)
    clusters = [(0.0, 100), (1.0, 60), (5.0, 30), (20.0, 10)]
    values = torch.cat(
        [
            centre + 0.01 * torch.randn(count, generator=generator, dtype=DTYPE)
            for centre, count in clusters
        ]
    )
    return values, clusters


@pytest.mark.stochastic
def test_density_puts_its_mass_where_the_eigenvalues_are():
    spectrum, clusters = clustered_spectrum()
    generator = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(200, 200, generator=generator, dtype=DTYPE))
    matrix = basis @ torch.diag(spectrum) @ basis.T
    values = torch.linalg.eigvalsh((matrix + matrix.T) / 2)

    result = spectral_density(DenseOperator(matrix), num_probes=16, num_steps=30)

    assert float(result.weights.sum()) == pytest.approx(1, abs=1e-12)
    assert float(result.nodes.max()) == pytest.approx(float(values.max()), rel=1e-8)
    # Ritz values lie inside the spectrum (interlacing).
    assert float(result.nodes.min()) >= float(values.min()) - 1e-10
    # Each cluster's share of the eigenvalues, within 0.05 (the weight of a cluster
    # of n of the 200 eigenvalues has a standard deviation of about
    # sqrt(2 n/200 / 200 / 16) ≤ 0.013 over 16 probes).
    for centre, _ in clusters:
        share = float(((values - centre).abs() < 0.5).double().mean())
        mass = float(result.weights[(result.nodes - centre).abs() < 0.5].sum())
        assert mass == pytest.approx(share, abs=0.05)
    grid = torch.linspace(-5, 25, 3001, dtype=DTYPE)
    density = result.density(grid, sigma=0.2)
    assert float(torch.trapezoid(density, grid)) == pytest.approx(1, abs=1e-6)
    edges = torch.linspace(float(values.min()), float(values.max()), 11)
    assert float(result.histogram(edges).sum()) == pytest.approx(1, abs=1e-12)
    assert result.mass_below(0.5) == pytest.approx(0.5, abs=0.05)
    assert result.num_products == 16 * 30


def test_density_stops_at_an_invariant_subspace():
    # Three distinct eigenvalues: Lanczos finds them all in three steps, exactly.
    values = torch.tensor([1.0] * 5 + [2.0] * 3 + [4.0] * 2, dtype=DTYPE)
    result = spectral_density(DenseOperator(torch.diag(values)), 2, num_steps=8)
    assert result.num_products == 2 * 3
    for run in range(2):
        nodes = result.nodes[run][result.weights[run] > 0]
        torch.testing.assert_close(nodes, torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE))
    assert float(result.weights.sum()) == pytest.approx(1, abs=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda op: hutchinson(op, 0),
            "`num_samples` must be an integer of at least 1",
        ),
        (lambda op: hutchpp(op, 2), "`num_products` must be an integer of at least 3"),
        (
            lambda op: hutchinson(op, 4, distribution="uniform"),
            "`distribution` must be",
        ),
        (lambda op: spectral_density(op, 0), "`num_probes` must be an integer"),
        (lambda op: spectral_density(op, 2, 0), "`num_steps` must be an integer"),
    ],
    ids=["samples", "products", "distribution", "probes", "steps"],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(DenseOperator(torch.eye(4, dtype=DTYPE)))
