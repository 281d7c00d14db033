import pytest
import torch

from lightning_eos.curvature import block_derivatives, directional_derivatives

from .third_order_cases import DTYPE, make_third_order_case

GROUPINGS = {
    "per-tensor": None,
    "per-layer": {"first": ["0.weight", "0.bias"], "second": ["2.weight", "2.bias"]},
    "mixed": [["0.weight", "2.weight"], ["0.bias"], ["2.bias"]],
}


@pytest.fixture(scope="module")
def reference():
    case = make_third_order_case("mlp", chunk_size=4)  # three chunks
    theta = case.point().requires_grad_()
    loss = case.loss_of(theta)
    (gradient,) = torch.autograd.grad(loss, theta)
    # Without batch statistics the loss does not depend on the chunking: the dense
    # tensor of the one-chunk version is cheaper and the same.
    tensor = make_third_order_case("mlp", chunk_size=10).dense_third()
    return case, float(loss.detach()), gradient, case.dense_hessian(), tensor


def block_rows(case, direction, grouping):
    names = [n for n, _ in case.model.named_parameters()]
    sizes = [p.numel() for p in case.model.parameters()]
    owner = []
    for name, size in zip(names, sizes, strict=True):
        owner += [name] * size
    if grouping is None:
        groups = [[n] for n in names]
    elif isinstance(grouping, dict):
        groups = list(grouping.values())
    else:
        groups = grouping
    masks = torch.tensor([[o in group for o in owner] for group in groups], dtype=DTYPE)
    return masks * direction


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("third", ["diagonal", "full"])
def test_block_derivatives_match_dense_derivatives(reference, grouping, third):
    case, loss, gradient, hessian, tensor = reference
    direction = torch.randn(gradient.numel(), dtype=DTYPE)
    rows = block_rows(case, direction, GROUPINGS[grouping])

    result = block_derivatives(
        case.objective(), direction, GROUPINGS[grouping], third_order=third
    )

    assert result.loss == pytest.approx(loss, rel=1e-12)
    torch.testing.assert_close(result.gradient, rows @ gradient, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        result.hessian, rows @ hessian @ rows.T, rtol=1e-8, atol=1e-10
    )
    full = torch.einsum("ijk,ai,bj,ck->abc", tensor, rows, rows, rows)
    expected = full if third == "full" else torch.diagonal(torch.diagonal(full))
    torch.testing.assert_close(result.third_order, expected, rtol=1e-8, atol=1e-10)
    assert len(result.names) == rows.shape[0]


def test_directions_as_tensors_or_mapping_give_the_same(reference):
    case, *_ = reference
    objective = case.objective()
    direction = torch.randn(objective.dim, dtype=DTYPE)
    pieces = objective.split(direction)
    by_name = dict(zip(objective.names, pieces, strict=True))

    flat = block_derivatives(objective, direction, third_order="none")
    listed = block_derivatives(objective, pieces, third_order="none")
    mapped = block_derivatives(objective, by_name, third_order="none")

    assert flat.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert flat.third_order is None
    for other in (listed, mapped):
        torch.testing.assert_close(other.hessian, flat.hessian, rtol=0, atol=0)


def test_directional_derivatives_of_an_analytic_function():
    case = make_third_order_case("rosenbrock")
    x, y = (float(v) for v in case.point())
    directions = torch.eye(2, dtype=DTYPE)

    result = directional_derivatives(
        case.objective(), directions, third_order="full", names=["x", "y"]
    )

    gradient = [-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)]
    hessian = [[2 - 400 * y + 1200 * x**2, -400 * x], [-400 * x, 200.0]]
    torch.testing.assert_close(result.gradient, torch.tensor(gradient, dtype=DTYPE))
    torch.testing.assert_close(result.hessian, torch.tensor(hessian, dtype=DTYPE))
    assert result.third_order[0, 0, 0] == pytest.approx(2400 * x)
    assert result.third_order[0, 1, 0] == pytest.approx(-400)
    assert result.third_order[1, 1, 1] == pytest.approx(0, abs=1e-9)


def test_float64_block_derivatives_of_a_float32_model(reference):
    case, _, _, hessian, _ = reference
    direction = torch.randn(hessian.shape[0], dtype=DTYPE)
    rows = block_rows(case, direction, None)
    model = make_third_order_case("mlp", chunk_size=4).model.float()
    chunks = [(x.float(), y.float()) for x, y in case.chunks]
    from lightning_eos.curvature import ProbeObjective

    objective = ProbeObjective(model, chunks, loss_fn=case.loss_fn, dtype=torch.float64)
    result = block_derivatives(objective, direction)
    assert result.hessian.dtype == torch.float64
    expected = rows @ hessian @ rows.T
    assert (result.hessian - expected).norm() <= 1e-5 * expected.norm()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"directions": torch.ones(5)},
            r"flat vector must have shape \(22,\), got \(5,\)",
        ),
        (
            {"directions": [torch.ones(4, 2)]},
            r"one tensor per trainable parameter \(4\)",
        ),
        (
            {"directions": {"0.weight": torch.ones(4, 2)}},
            r"missing \['0.bias', '2.weight', '2.bias'\]",
        ),
        (
            {"groups": [["0.weight", "0.bias"], ["2.weight"]]},
            r"must cover every trainable parameter; \['2.bias'\] are in no group",
        ),
        (
            {"groups": [["0.weight"], ["0.weight", "0.bias", "2.weight", "2.bias"]]},
            "in two groups",
        ),
        ({"groups": [["fc.weight"]]}, "names 'fc.weight', which is not a trainable"),
        (
            {"third_order": "cubic"},
            "`third_order` must be 'none', 'diagonal' or 'full'",
        ),
    ],
    ids=[
        "flat-shape",
        "count",
        "mapping",
        "not-covering",
        "duplicate",
        "unknown",
        "third",
    ],
)
def test_bad_arguments_are_named(reference, kwargs, message):
    case, *_ = reference
    objective = case.objective()
    arguments = {"directions": torch.ones(objective.dim, dtype=DTYPE), **kwargs}
    with pytest.raises(ValueError, match=message):
        block_derivatives(objective, **arguments)


def test_piece_of_the_wrong_shape_is_named(reference):
    case, *_ = reference
    objective = case.objective()
    pieces = objective.split(torch.ones(objective.dim, dtype=DTYPE))
    pieces[2] = torch.ones(3, 3, dtype=DTYPE)
    with pytest.raises(
        ValueError, match=r"parameter '2.weight' must have shape \(2, 4\)"
    ):
        block_derivatives(objective, pieces)
