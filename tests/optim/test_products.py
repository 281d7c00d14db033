"""Hessian-vector, Jacobian and Gauss-Newton products inside the optimizers."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_eos.optim import GaussNewton, HessianFree, NewtonCG, closure_backward
from lightning_eos.optim._base import Derivatives
from lightning_eos.optim._outputs import OutputProducts

COEFFICIENTS = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)


def cubic(x):
    return (COEFFICIENTS * x**3).sum() + 0.5 * (x**2).sum() + x[0] * x[1]


def derivatives_at(x, loss_fn, products, fd_step=1e-4, backward=closure_backward):
    optimizer = NewtonCG([x], hessian_products=products, fd_step=fd_step)

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(x)
        backward(loss)
        return loss

    return Derivatives(optimizer, optimizer._begin(closure), products, fd_step)


def test_exact_products_equal_the_dense_hessian():
    x = nn.Parameter(torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64))
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    derivatives = derivatives_at(x, cubic, "exact")
    dense = torch.autograd.functional.hessian(cubic, x.detach())

    torch.testing.assert_close(derivatives.hvp(v), dense @ v, rtol=1e-13, atol=1e-13)
    derivatives.release()
    assert not x.grad.requires_grad  # the graph is dropped


def test_finite_difference_error_is_half_h_times_third_derivative():
    # For a cubic, ∇L(θ + hv) − ∇L(θ) = hHv + (h²/2)T[v, v] exactly.
    fd_step = 1e-3
    x = nn.Parameter(torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64))
    v = torch.tensor([1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    derivatives = derivatives_at(x, cubic, "finite_difference", fd_step)
    dense = torch.autograd.functional.hessian(cubic, x.detach())
    h = fd_step * max(1.0, float(x.detach().norm())) / float(v.norm())
    third = 6 * COEFFICIENTS * v**2  # T[v, v]

    error = derivatives.hvp(v) - dense @ v
    torch.testing.assert_close(error, h / 2 * third, rtol=1e-7, atol=1e-12)
    assert torch.equal(
        x.detach(), torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64)
    )


def test_missing_graph_is_refused_with_the_one_line_fix():
    x = nn.Parameter(torch.tensor([0.3, -0.7, 1.1, 0.2], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="backward_with_graph"):
        derivatives_at(x, cubic, "exact", backward=lambda loss: loss.backward())


def small_network(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 12), nn.Tanh(), nn.Linear(12, 4)).double()


DATA = torch.randn(
    10, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64
)
TARGETS = torch.randn(
    10, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64
)
LABELS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])


def half_squared_error(outputs):
    return 0.5 * ((outputs - TARGETS) ** 2).sum(dim=1).mean()


def cross_entropy(outputs):
    return nn.functional.cross_entropy(outputs, LABELS)


def dense_jacobian(network):
    names = [name for name, _ in network.named_parameters()]
    params = [p.detach() for p in network.parameters()]
    theta = torch.cat([p.reshape(-1) for p in params])

    def outputs_of(flat):
        pieces = torch.split(flat, [p.numel() for p in params])
        state = {n: q.view_as(p) for n, q, p in zip(names, pieces, params, strict=True)}
        return functional_call(network, state, (DATA,))

    jacobian = torch.autograd.functional.jacobian(outputs_of, theta)
    return theta, outputs_of(theta), jacobian.reshape(-1, theta.numel())


def output_products(network, criterion):
    optimizer = HessianFree(network.parameters(), curvature="gauss_newton").attach(
        network
    )

    def closure():
        optimizer.zero_grad()
        loss = criterion(network(DATA))
        closure_backward(loss)
        return loss

    calls = optimizer._begin(closure)
    derivatives = Derivatives(optimizer, calls, "exact", capture=network)
    return OutputProducts(derivatives, "test"), derivatives


@pytest.mark.parametrize(
    "criterion", [half_squared_error, cross_entropy], ids=["mse", "ce"]
)
def test_gauss_newton_products_equal_dense_jacobians(criterion):
    network = small_network()
    products, derivatives = output_products(network, criterion)
    theta, outputs, J = dense_jacobian(network)
    loss_hessian = torch.autograd.functional.hessian(criterion, outputs).reshape(
        outputs.numel(), outputs.numel()
    )
    v = torch.randn(
        theta.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )

    torch.testing.assert_close(
        products.jvp(v).reshape(-1), J @ v, rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        products.gauss_newton(v), J.T @ loss_hessian @ J @ v, rtol=1e-11, atol=1e-12
    )
    derivatives.release()


def test_loss_depending_on_weights_beyond_the_outputs_is_refused():
    network = small_network()

    def penalized(outputs):
        return half_squared_error(outputs) + sum(
            (p**2).sum() for p in network.parameters()
        )

    with pytest.raises(RuntimeError, match="other than through"):
        output_products(network, penalized)


def step_gauss_newton(network, criterion, **options):
    optimizer = GaussNewton(network.parameters(), **options).attach(network)

    def closure():
        optimizer.zero_grad()
        loss = criterion(network(DATA))
        closure_backward(loss)
        return loss

    optimizer.step(closure)
    return optimizer


def test_gauss_newton_step_equals_the_dense_function_space_step():
    lr, damping = 0.5, 1e-2
    network = small_network()
    theta, outputs, J = dense_jacobian(network)
    residual = ((outputs - TARGETS) / 10).reshape(-1)  # ∇_f ℓ, and ∇²_f ℓ = I/10
    kernel = J @ J.T / 10 + damping * torch.eye(J.shape[0], dtype=torch.float64)
    expected = theta - lr * J.T @ torch.linalg.solve(kernel, residual)

    step_gauss_newton(
        network,
        half_squared_error,
        lr=lr,
        damping=damping,
        cg_tol=1e-13,
        max_cg_iter=200,
    )
    new = torch.cat([p.detach().reshape(-1) for p in network.parameters()])
    torch.testing.assert_close(new, expected, rtol=1e-10, atol=1e-12)


def test_gauss_newton_refuses_a_loss_with_non_scalar_output_curvature():
    with pytest.raises(RuntimeError, match="HessianFree"):
        step_gauss_newton(small_network(), cross_entropy)


def test_gauss_newton_needs_the_module_outside_lightning():
    network = small_network()
    optimizer = GaussNewton(network.parameters())
    with pytest.raises(RuntimeError, match="attach"):
        optimizer.step(lambda: half_squared_error(network(DATA)))


def test_two_forward_calls_are_refused():
    network = small_network()
    with pytest.raises(RuntimeError, match="exactly once"):
        output_products(
            network,
            lambda outputs: half_squared_error(outputs) + 0 * network(DATA).sum(),
        )
