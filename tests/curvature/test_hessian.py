import pytest
import torch
from torch import nn

from lightning_eos.curvature import HessianOperator, ProbeObjective

from .cases import CASES, chunks, dense_hessian, dense_loss_function, make_case


@pytest.fixture(params=CASES)
def case(request):
    return make_case(request.param)


def objective_for(case, chunk_size=None, **kwargs):
    return ProbeObjective(
        case.model,
        chunks(case, chunk_size),
        loss_fn=case.loss_fn,
        train_mode=case.train_mode,
        **kwargs,
    )


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_products_match_dense_hessian(case, chunked):
    size = case.chunk_size if chunked else case.inputs.shape[0]
    H = dense_hessian(case, size)
    operator = HessianOperator(objective_for(case, size))
    vectors = torch.randn(3, operator.dim, dtype=torch.float64)

    products = operator.matmat(vectors)

    torch.testing.assert_close(products, vectors @ H, rtol=1e-8, atol=1e-10)
    assert operator.num_products == 3


def test_vectorized_products_match_loop(case):
    objective = objective_for(case)
    vectors = torch.randn(4, objective.dim, dtype=torch.float64)
    looped = HessianOperator(objective).matmat(vectors)
    vectorized = HessianOperator(objective, vectorize=True).matmat(vectors)
    torch.testing.assert_close(vectorized, looped, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_loss_and_gradient_match_dense(case, chunked):
    chunk_size = case.chunk_size if chunked else case.inputs.shape[0]
    loss, theta0 = dense_loss_function(case, chunk_size)
    theta = theta0.clone().requires_grad_()
    value = loss(theta)
    (gradient,) = torch.autograd.grad(value, theta)
    for _ in range(2):  # before and after products have built the graph
        operator = HessianOperator(objective_for(case, chunk_size))
        operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
        torch.testing.assert_close(
            operator.gradient(), gradient, rtol=1e-10, atol=1e-12
        )
        assert operator.loss() == pytest.approx(value.item(), rel=1e-12)


def test_module_is_left_untouched(case):
    model = case.model
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before_params = [p.detach().clone() for p in model.parameters()]
    before_buffers = [b.clone() for b in model.buffers()]
    if isinstance(model, nn.Sequential):
        model[0].eval()  # a mix of flags, to see each one restored
    flags = [m.training for m in model.modules()]
    operator = HessianOperator(objective_for(case))
    vectors = torch.randn(2, operator.dim, dtype=torch.float64)
    before_rng = torch.get_rng_state()

    operator.matmat(vectors)
    operator.gradient()

    assert all(
        torch.equal(a, p)
        for a, p in zip(before_params, model.parameters(), strict=True)
    )
    assert all(
        torch.equal(a, b) for a, b in zip(before_buffers, model.buffers(), strict=True)
    )
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert torch.equal(before_rng, torch.get_rng_state())
    assert flags == [m.training for m in model.modules()]


def test_float64_probe_of_float32_model():
    case = make_case("mlp")
    H = dense_hessian(case)
    case.model.float()
    objective = ProbeObjective(
        case.model,
        [(case.inputs.float(), case.targets.float())],
        loss_fn=case.loss_fn,
        dtype=torch.float64,
    )
    vector = torch.randn(objective.dim, dtype=torch.float64)
    product = HessianOperator(objective).matvec(vector)
    # The model's float32 weights differ from the float64 ones by round-off only.
    torch.testing.assert_close(product, H @ vector, rtol=1e-5, atol=1e-6)
    assert product.dtype == torch.float64
    assert all(p.dtype == torch.float32 for p in case.model.parameters())


def test_float32_products_within_stated_tolerance():
    """In float32 a product agrees with the float64 one to 1e-4 relative (norm)."""
    case = make_case("mlp")
    H = dense_hessian(case)
    case.model.float()
    objective = ProbeObjective(
        case.model,
        [(case.inputs.float(), case.targets.float())],
        loss_fn=case.loss_fn,
    )
    vector = torch.randn(objective.dim, dtype=torch.float64)
    product = HessianOperator(objective).matvec(vector.float()).double()
    exact = H @ vector
    assert (product - exact).norm() <= 1e-4 * exact.norm()


def test_dropout_mask_is_fixed_within_a_seed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 1)
    )
    data = [(torch.randn(8, 4), torch.randn(8, 1))]
    loss_fn = nn.MSELoss()
    vector = torch.randn(sum(p.numel() for p in model.parameters()))

    first = HessianOperator(ProbeObjective(model, data, loss_fn=loss_fn, seed=3))
    again = HessianOperator(ProbeObjective(model, data, loss_fn=loss_fn, seed=3))
    other = HessianOperator(ProbeObjective(model, data, loss_fn=loss_fn, seed=4))

    assert torch.equal(first.matvec(vector), again.matvec(vector))
    assert not torch.allclose(first.matvec(vector), other.matvec(vector))


def test_eval_mode_uses_running_statistics():
    case = make_case("batchnorm")
    bn = case.model[1]
    bn.running_mean.fill_(0.3)
    bn.running_var.fill_(2.0)
    case.train_mode = False
    H = dense_hessian(case)
    operator = HessianOperator(objective_for(case))
    vector = torch.randn(operator.dim, dtype=torch.float64)
    torch.testing.assert_close(
        operator.matvec(vector), H @ vector, rtol=1e-8, atol=1e-10
    )
    assert torch.all(bn.running_mean == 0.3)


def test_frozen_parameters_are_constants():
    case = make_case("mlp")
    case.model[0].weight.requires_grad_(False)
    objective = objective_for(case)
    assert objective.dim == sum(p.numel() for p in case.model.parameters()) - 35
    H = dense_hessian(case)  # built over the trainable parameters only
    vector = torch.randn(objective.dim, dtype=torch.float64)
    product = HessianOperator(objective).matvec(vector)
    torch.testing.assert_close(product, H @ vector, rtol=1e-8, atol=1e-10)


def test_sum_reduction_adds_chunks():
    case = make_case("mlp")
    mean = HessianOperator(objective_for(case))
    total = HessianOperator(objective_for(case, reduction="sum"))
    vector = torch.randn(mean.dim, dtype=torch.float64)
    sizes = [len(x) for x, _ in chunks(case)]
    # With equal chunk sizes the sum of chunk means is (number of chunks) × the mean.
    assert sizes[:-1] == [sizes[0]] * (len(sizes) - 1)
    assert total.loss() == pytest.approx(
        sum(case.loss_fn(case.model(x), y).item() for x, y in chunks(case)), rel=1e-12
    )
    assert mean.loss() == pytest.approx(
        case.loss_fn(case.model(case.inputs), case.targets).item(), rel=1e-12
    )
    assert not torch.allclose(total.matvec(vector), mean.matvec(vector))


def test_all_reduce_is_called_once_per_product():
    case = make_case("mlp")
    calls = []

    def all_reduce(tensor):
        calls.append(tuple(tensor.shape))
        return tensor

    objective = objective_for(case, all_reduce=all_reduce)
    assert calls == [()]  # the example count, once, at construction
    operator = HessianOperator(objective)
    operator.matmat(torch.randn(2, operator.dim, dtype=torch.float64))
    operator.matmat(torch.randn(1, operator.dim, dtype=torch.float64))
    assert calls[1:] == [(2, operator.dim), (1, operator.dim)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_fn": None}, "exactly one of `loss_fn` and `batch_loss`"),
        ({"batch_loss": lambda m, b: 0.0}, "exactly one of `loss_fn` and `batch_loss`"),
        ({"reduction": "max"}, "`reduction` must be 'mean' or 'sum', got 'max'"),
        ({"dtype": torch.int64}, "`dtype` must be a floating-point type"),
    ],
    ids=["no-loss", "two-losses", "reduction", "dtype"],
)
def test_bad_arguments(kwargs, message):
    case = make_case("mlp")
    arguments = {"loss_fn": case.loss_fn, **kwargs}
    with pytest.raises(ValueError, match=message):
        ProbeObjective(case.model, chunks(case), **arguments)


def test_module_without_trainable_parameters():
    model = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="has no trainable parameter"):
        ProbeObjective(
            model, [(torch.ones(1, 2), torch.ones(1, 1))], loss_fn=nn.MSELoss()
        )


def test_non_scalar_loss_is_refused():
    model = nn.Linear(2, 1)
    objective = ProbeObjective(
        model,
        [(torch.ones(3, 2), torch.ones(3, 1))],
        loss_fn=nn.MSELoss(reduction="none"),
    )
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        HessianOperator(objective).matvec(torch.ones(3))


def test_wrong_vector_shape_is_refused():
    case = make_case("mlp")
    operator = HessianOperator(objective_for(case))
    with pytest.raises(
        ValueError, match=r"Expected vectors of shape \(b, 66\), got \(2, 5\)"
    ):
        operator.matmat(torch.ones(2, 5, dtype=torch.float64))


def dense_third_order(case, u, v):
    """T[u, v] = ∇(uᵀ H(θ) v), from a dense Hessian built with graph, then one grad."""
    loss, theta0 = dense_loss_function(case)
    theta = theta0.clone().requires_grad_()
    H = torch.autograd.functional.hessian(
        loss, theta, create_graph=True, vectorize=True
    )
    rows = [
        torch.autograd.grad(a @ H @ b, theta, retain_graph=True)[0]
        for a, b in zip(u, v, strict=True)
    ]
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunked"])
def test_third_order_matches_dense_tensor(name, chunked):
    case = make_case(name)
    if not chunked:
        case.chunk_size = case.inputs.shape[0]
    operator = HessianOperator(objective_for(case))
    u, v = torch.randn(2, 3, operator.dim, dtype=torch.float64)

    result = operator.third_order(u, v)

    expected = dense_third_order(case, u, v)
    torch.testing.assert_close(result, expected, rtol=1e-8, atol=1e-10)
    single = operator.third_order(u[0], v[0])
    torch.testing.assert_close(single, expected[0], rtol=1e-8, atol=1e-10)
    assert operator.num_third_order == 4


def test_third_order_of_a_quadratic_is_zero():
    case = make_case("quadratic")
    operator = HessianOperator(objective_for(case))
    u = torch.randn(operator.dim, dtype=torch.float64)
    assert torch.equal(operator.third_order(u, u), torch.zeros_like(u))
