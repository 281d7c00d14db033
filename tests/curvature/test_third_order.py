import pytest
import torch

from lightning_eos.curvature import (
    HessianOperator,
    ProbeObjective,
    directional_derivatives,
    sharpness_gradient,
)

from .third_order_cases import (
    DTYPE,
    THIRD_ORDER_CASES,
    finite_difference_third,
    make_third_order_case,
)


@pytest.fixture(params=THIRD_ORDER_CASES)
def case(request):
    return make_third_order_case(request.param)


def unit_rows(count, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, dim, generator=generator, dtype=DTYPE)
    return rows / rows.norm(dim=1, keepdim=True)


def test_third_order_vectors_match_the_dense_reference(case):
    operator = HessianOperator(case.objective())
    u, v, w = unit_rows(3, operator.dim, seed=1)
    # Rows 0 and 2 share v, so they share one product with graph.
    left = torch.stack([u, w, v])
    right = torch.stack([v, u, v])

    result = operator.third_order(left, right)

    expected = case.dense_third_vectors(left, right)
    torch.testing.assert_close(result, expected, rtol=1e-8, atol=1e-10)
    form = operator.third_order_form(u, v, torch.stack([w, u]))
    torch.testing.assert_close(
        form, expected[0] @ torch.stack([w, u]).T, rtol=1e-8, atol=1e-10
    )
    assert operator.num_third_order == 3 + 1


@pytest.mark.parametrize("name", ["mlp", "cubic"])
def test_every_entry_matches_the_nested_dense_tensor(name):
    """The whole tensor from T[e_i, e_j], i ≤ j, against nested autograd calls."""
    case = make_third_order_case(name)
    dense = case.dense_third()
    operator = HessianOperator(case.objective())
    basis = torch.eye(operator.dim, dtype=DTYPE)
    pairs = [(i, j) for j in range(operator.dim) for i in range(j + 1)]

    rows = operator.third_order(
        basis[[i for i, _ in pairs]], basis[[j for _, j in pairs]]
    )

    for (i, j), row in zip(pairs, rows, strict=True):
        torch.testing.assert_close(row, dense[:, i, j], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "layernorm-plain"])
def test_chunking_does_not_change_third_order(name):
    whole = make_third_order_case(name, chunk_size=10)
    chunked = make_third_order_case(name, chunk_size=3)
    assert len(chunked.chunks) == 4
    u, v = unit_rows(2, whole.objective().dim, seed=2)
    one = HessianOperator(whole.objective()).third_order(u, v)
    many = HessianOperator(chunked.objective()).third_order(u, v)
    torch.testing.assert_close(many, one, rtol=1e-10, atol=1e-12)


def test_native_layer_norm_is_refused_and_plain_matches_finite_differences():
    case = make_third_order_case("layernorm-native")
    native = ProbeObjective(case.model, case.chunks, loss_fn=case.loss_fn)
    u, v = unit_rows(2, native.dim, seed=3)
    with pytest.raises(ValueError, match=r"layer_norm.*normalization='plain'"):
        HessianOperator(native).third_order(u, v)

    # Finite differences of exact (native) Hessian-vector products are an
    # independent reference; the plain route agrees with it, the native one not.
    reference = finite_difference_third(native, u, v)
    plain = HessianOperator(case.objective()).third_order(u, v)
    assert (plain - reference).norm() <= 1e-6 * reference.norm()
    theta = native.point().requires_grad_()
    loss = sum(native.chunk_losses(theta))
    (gradient,) = torch.autograd.grad(loss, theta, create_graph=True)
    (hv,) = torch.autograd.grad(gradient @ v, theta, create_graph=True)
    (wrong,) = torch.autograd.grad(hv @ u, theta)
    assert (wrong - reference).norm() > 0.01 * reference.norm()


def test_sharpness_gradient_is_the_gradient_of_the_top_eigenvalue():
    case = make_third_order_case("mlp")
    theta = case.point()
    eigenvalues, eigenvectors = torch.linalg.eigh(case.dense_hessian())
    top = eigenvectors[:, [-1, -2]].T
    operator = HessianOperator(case.objective())

    result = sharpness_gradient(operator, top, tensor=True)

    eps = 1e-5
    steps = torch.eye(theta.numel(), dtype=DTYPE) * eps
    difference = torch.stack(
        [
            torch.linalg.eigvalsh(case.dense_hessian(theta + step))[-1]
            - torch.linalg.eigvalsh(case.dense_hessian(theta - step))[-1]
            for step in steps
        ]
    ) / (2 * eps)
    torch.testing.assert_close(result.vector, difference, rtol=1e-6, atol=1e-8)

    left, right = top[[0, 0, 1, 1]], top[[0, 1, 0, 1]]
    vectors = case.dense_third_vectors(left, right) @ top.T
    expected = vectors.reshape(2, 2, 2)
    torch.testing.assert_close(result.tensor, expected, rtol=1e-8, atol=1e-10)
    assert result.eigen_coefficients[0] == pytest.approx(float(expected[0, 0, 0]))
    gradient = operator.gradient()
    assert result.cosine == pytest.approx(
        float(difference @ gradient / (difference.norm() * gradient.norm())),
        rel=1e-5,
    )
    outside = difference - (top @ difference) @ top
    assert result.complement_norm == pytest.approx(float(outside.norm()), rel=1e-5)
    assert result.num_third_order == 3  # pairs (1,1), (1,2), (2,2)
    # The same tensor from the directional derivatives along the eigenvectors.
    along = directional_derivatives(case.objective(), top, third_order="full")
    torch.testing.assert_close(along.third_order, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        along.hessian, torch.diag(eigenvalues[[-1, -2]]), rtol=1e-8, atol=1e-10
    )


def test_float64_third_order_of_a_float32_model():
    case = make_third_order_case("mlp")
    u, v = unit_rows(2, case.objective().dim, seed=4)
    exact = case.dense_third_vectors(u[None], v[None])[0]
    case.model.float()
    chunks = [(x.float(), y.float()) for x, y in case.chunks]
    objective = ProbeObjective(
        case.model, chunks, loss_fn=case.loss_fn, dtype=torch.float64
    )

    result = HessianOperator(objective).third_order(u, v)

    assert result.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in case.model.parameters())
    # The float32 weights differ from the float64 ones by round-off only.
    assert (result - exact).norm() <= 1e-5 * exact.norm()


@pytest.mark.parametrize(
    ("u_shape", "v_shape", "message"),
    [
        ((22,), (21,), r"`u` and `v` must both have shape \(22,\) or \(b, 22\)"),
        ((2, 5), (2, 5), r"got \(2, 5\) and \(2, 5\)"),
    ],
    ids=["mismatch", "wrong-dimension"],
)
def test_third_order_refuses_wrong_shapes(u_shape, v_shape, message):
    operator = HessianOperator(make_third_order_case("mlp").objective())
    with pytest.raises(ValueError, match=message):
        operator.third_order(torch.ones(u_shape), torch.ones(v_shape))


def test_sharpness_gradient_refuses_wrong_eigenvectors():
    operator = HessianOperator(make_third_order_case("mlp").objective())
    with pytest.raises(ValueError, match=r"`eigenvectors` must have shape \(k, 22\)"):
        sharpness_gradient(operator, torch.ones(2, 21))
    with pytest.raises(ValueError, match="between 1 and 22 vectors"):
        sharpness_gradient(operator, torch.ones(23, 22))
