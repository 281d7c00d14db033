import pytest
import torch
from torch.nn import functional as F

from lightning_eos.losses import HalfSquaredError, half_squared_error

# Outputs and targets with hand-computed losses: (1/N) sum_n 1/2 ||f_n - y_n||^2.
VALUE_CASES = {
    "two-examples-two-outputs": (
        [[1.0, 2.0], [0.0, 0.0]],
        [[1.0, 0.0], [0.0, 1.0]],
        (0.5 * 4.0 + 0.5 * 1.0) / 2,
    ),
    "one-dimensional": ([3.0, -1.0, 0.5], [1.0, 1.0, 0.5], (0.5 * 4 + 0.5 * 4) / 3),
    "three-outputs": (
        [[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]],
        [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]],
        (0.5 * (0.25 + 1.0 + 1.0) + 0.5 * (0.0 + 1.0 + 1.0)) / 2,
    ),
}


@pytest.fixture(params=list(VALUE_CASES.values()), ids=list(VALUE_CASES))
def value_case(request):
    outputs, targets, expected = request.param
    return (
        torch.tensor(outputs, dtype=torch.float64, requires_grad=True),
        torch.tensor(targets, dtype=torch.float64),
        expected,
    )


def test_value_matches_hand_computation(value_case):
    outputs, targets, expected = value_case
    loss = half_squared_error(outputs, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.item(), expected, rtol=1e-12, atol=0.0)


def test_gradient_is_residual_over_batch_size(value_case):
    outputs, targets, _ = value_case
    (gradient,) = torch.autograd.grad(half_squared_error(outputs, targets), outputs)
    expected = (outputs - targets).detach() / outputs.shape[0]
    torch.testing.assert_close(gradient, expected, rtol=1e-12, atol=1e-15)


def test_scale_relative_to_mse_loss(value_case):
    outputs, targets, _ = value_case
    loss = half_squared_error(outputs, targets)
    num_examples = outputs.shape[0]
    num_outputs = outputs[0].numel()
    summed = F.mse_loss(outputs, targets, reduction="sum")
    averaged = F.mse_loss(outputs, targets)

    torch.testing.assert_close(2 * loss, summed / num_examples)
    torch.testing.assert_close(loss, num_outputs / 2 * averaged)


def test_module_matches_function(value_case):
    outputs, targets, _ = value_case
    torch.testing.assert_close(
        HalfSquaredError()(outputs, targets), half_squared_error(outputs, targets)
    )


def test_targets_are_cast_to_outputs_dtype():
    outputs = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    loss = half_squared_error(outputs, torch.tensor([[1, 0]]))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(2.5)


BAD_SHAPES = {
    "labels-against-outputs": ((4, 3), (4,), r"targets must have the shape.*\(4,\)"),
    "column-against-vector": ((4, 1), (4,), r"targets must have the shape.*\(4, 1\)"),
    "scalar": ((), (), r"outputs must have a leading batch dimension.*\(\)"),
    "empty-batch": ((0, 3), (0, 3), r"at least one example.*\(0, 3\)"),
}


@pytest.mark.parametrize(
    ("output_shape", "target_shape", "match"), BAD_SHAPES.values(), ids=BAD_SHAPES
)
def test_bad_shapes_raise(output_shape, target_shape, match):
    with pytest.raises(ValueError, match=match):
        half_squared_error(torch.zeros(output_shape), torch.zeros(target_shape))
