import copy

import pytest
import torch
from torch import nn

from lightning_eos.curvature import (
    HessianOperator,
    ProbeObjective,
    native_normalization_calls,
    plain_normalization,
)
from lightning_eos.nn import use_plain_normalization

DTYPE = torch.float64

# (layer, input shape, train mode)
LAYERS = {
    "layernorm": (lambda: nn.LayerNorm(4), (6, 4), True),
    "layernorm-no-affine": (
        lambda: nn.LayerNorm(4, elementwise_affine=False),
        (6, 4),
        True,
    ),
    "layernorm-2d": (lambda: nn.LayerNorm([2, 2]), (6, 3, 2, 2), True),
    "batchnorm1d-train": (lambda: nn.BatchNorm1d(4), (6, 4), True),
    "batchnorm1d-cumulative": (lambda: nn.BatchNorm1d(4, momentum=None), (6, 4), True),
    "batchnorm2d-train": (lambda: nn.BatchNorm2d(4), (6, 4, 3, 3), True),
    "batchnorm1d-eval": (lambda: nn.BatchNorm1d(4), (6, 4), False),
    "batchnorm-untracked": (
        lambda: nn.BatchNorm1d(4, track_running_stats=False),
        (6, 4),
        False,
    ),
    "instancenorm1d": (lambda: nn.InstanceNorm1d(4, affine=True), (6, 4, 5), True),
    "instancenorm-tracked": (
        lambda: nn.InstanceNorm1d(4, track_running_stats=True),
        (6, 4, 5),
        True,
    ),
}


def randomized(layer):
    generator = torch.Generator().manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5, generator=generator)
        if getattr(layer, "running_var", None) is not None:
            layer.running_mean.uniform_(-1, 1, generator=generator)
            layer.running_var.uniform_(0.5, 2, generator=generator)
    return layer


@pytest.mark.parametrize("name", list(LAYERS))
def test_plain_layers_compute_the_native_function(name):
    make, shape, training = LAYERS[name]
    native = randomized(make()).train(training)
    plain = copy.deepcopy(native)
    assert use_plain_normalization(plain) == [""]
    inputs = torch.randn(
        *shape, dtype=DTYPE, generator=torch.Generator().manual_seed(1)
    )

    for _ in range(2):  # twice, to compare the running statistics as they evolve
        expected, result = native(inputs), plain(inputs)
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
        for a, b in zip(native.buffers(), plain.buffers(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=0)
    assert native.state_dict().keys() == plain.state_dict().keys()


def network(norm, shape):
    if len(shape) == 2:
        return nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 1)).double()
    return nn.Sequential(
        nn.Conv1d(3, 4, 1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(20, 1)
    ).double()


def raw_third_order(objective, u, v):
    """T[u, v] by reverse mode three times, without the package's checks."""
    theta = objective.point().requires_grad_()
    loss = sum(objective.chunk_losses(theta))
    (gradient,) = torch.autograd.grad(loss, theta, create_graph=True)
    (hv,) = torch.autograd.grad(gradient @ v, theta, create_graph=True)
    (t,) = torch.autograd.grad(hv @ u, theta)
    return t


# Whether PyTorch's native layer gives right third derivatives (torch 2.13).
NATIVE_EXACT = {
    "layernorm": False,
    "batchnorm1d-train": False,
    "batchnorm1d-eval": True,
    "instancenorm1d": False,
    "groupnorm": True,
    "rmsnorm": True,
}


@pytest.mark.parametrize("name", list(NATIVE_EXACT))
def test_which_native_layers_have_wrong_third_derivatives(name):
    if name == "groupnorm":
        norm, shape, training = nn.GroupNorm(2, 4), (6, 4), True
    elif name == "rmsnorm":
        norm, shape, training = nn.RMSNorm(4), (6, 4), True
    else:
        make, shape, training = LAYERS[name]
        norm = make()
    torch.manual_seed(0)
    model = network(randomized(norm), shape)
    inputs_shape = (6, 3) if len(shape) == 2 else (6, 3, 5)
    generator = torch.Generator().manual_seed(2)
    data = [
        (
            torch.randn(*inputs_shape, dtype=DTYPE, generator=generator),
            torch.randn(6, 1, dtype=DTYPE, generator=generator),
        )
    ]
    loss = nn.MSELoss()
    native = ProbeObjective(model, data, loss_fn=loss, train_mode=training)
    plain = ProbeObjective(
        model, data, loss_fn=loss, train_mode=training, normalization="plain"
    )
    u, v = torch.randn(2, native.dim, dtype=DTYPE, generator=generator)
    # Finite differences of exact Hessian-vector products, fourth order in the step.
    theta, eps = native.point(), 1e-5

    def hv(shift):
        return HessianOperator(native, theta + shift * eps * u).matvec(v)

    reference = (8 * (hv(1) - hv(-1)) - (hv(2) - hv(-2))) / (12 * eps)

    native_error = (raw_third_order(native, u, v) - reference).norm() / reference.norm()
    plain_error = (raw_third_order(plain, u, v) - reference).norm() / reference.norm()

    assert plain_error < 1e-7, float(plain_error)
    if NATIVE_EXACT[name]:
        assert native_error < 1e-7, float(native_error)
    else:
        assert native_error > 1e-2, float(native_error)
    # Second order is right either way.
    vector = torch.randn(native.dim, dtype=DTYPE, generator=generator)
    torch.testing.assert_close(
        HessianOperator(native).matvec(vector),
        HessianOperator(plain).matvec(vector),
        rtol=1e-10,
        atol=1e-12,
    )
    calls = native_normalization_calls(native)
    assert bool(calls) == (not NATIVE_EXACT[name]), calls
    assert native_normalization_calls(plain) == []
    if calls:
        with pytest.raises(ValueError, match="normalization='plain'"):
            HessianOperator(native).third_order(u, v)


def test_functional_calls_are_routed_too():
    inputs = torch.randn(5, 4, dtype=DTYPE)
    weight = torch.rand(4, dtype=DTYPE) + 0.5
    with plain_normalization():
        layer = torch.nn.functional.layer_norm(inputs, (4,), weight)
        batch = torch.batch_norm(
            inputs, weight, None, None, None, True, 0.1, 1e-5, False
        )
    torch.testing.assert_close(
        layer, torch.nn.functional.layer_norm(inputs, (4,), weight)
    )
    torch.testing.assert_close(
        batch,
        torch.batch_norm(inputs, weight, None, None, None, True, 0.1, 1e-5, False),
    )


def test_swapping_keeps_the_module_and_its_parameters():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    changed = use_plain_normalization(model)

    assert changed == ["1", "2"]
    assert [type(m).__module__ for m in model[1:]] == [
        "lightning_eos.nn.normalization"
    ] * 2
    assert isinstance(model[1], nn.LayerNorm)
    assert all(a is b for a, b in zip(parameters, model.parameters(), strict=True))
    assert optimizer.param_groups[0]["params"][2] is model[1].weight
    assert use_plain_normalization(model) == []


def test_bad_normalization_argument():
    with pytest.raises(ValueError, match="`normalization` must be 'native' or 'plain'"):
        ProbeObjective(
            nn.Linear(2, 1),
            [(torch.ones(1, 2), torch.ones(1, 1))],
            loss_fn=nn.MSELoss(),
            normalization="fused",
        )
