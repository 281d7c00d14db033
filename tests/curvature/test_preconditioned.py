import pytest
import torch
from torch import nn

from lightning_eos.curvature import (
    HessianOperator,
    PreconditionedOperator,
    ProbeObjective,
    adaptive_preconditioner,
    lanczos,
)

from .cases import half_squared_error

DTYPE = torch.float64

OPTIMIZERS = {
    "adam": (lambda p: torch.optim.Adam(p, lr=0.01), 38.0),
    "adam-beta-0.5": (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.5, 0.99)), 6.0),
    "adam-coupled-decay": (
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.3),
        38.0,
    ),
    "adam-amsgrad": (lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True), 38.0),
    "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.3), 38.0),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, lr=0.01), 2.0),
    "rmsprop-centered": (lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True), 2.0),
    "rmsprop-momentum": (lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5), 3.0),
}


def trained(name, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    inputs, targets = torch.randn(16, 3, dtype=DTYPE), torch.randn(16, 2, dtype=DTYPE)
    optimizer = OPTIMIZERS[name][0](model.parameters())
    for _ in range(steps):
        optimizer.zero_grad()
        half_squared_error(model(inputs), targets).backward()
        optimizer.step()
    objective = ProbeObjective(model, [(inputs, targets)], loss_fn=half_squared_error)
    return model, optimizer, objective


def dense_preconditioner(name, optimizer, parameters):
    """P and ω written from the optimizer's state, independently of the package."""
    diagonals, decays = [], []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if isinstance(optimizer, torch.optim.RMSprop):
                second = state["square_avg"]
                if group["centered"]:
                    second = second - state["grad_avg"] ** 2
                root = second.sqrt()
            else:
                key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
                correction = 1 - group["betas"][1] ** float(state["step"])
                root = (state[key] / correction).sqrt()
            diagonals.append(((root + group["eps"]) / group["lr"]).reshape(-1))
            coupled = name in ("adam-coupled-decay",) or name.startswith("rmsprop")
            decays.append(
                torch.full_like(diagonals[-1], group["weight_decay"] * coupled)
            )
    return torch.cat(diagonals), torch.cat(decays)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_preconditioned_sharpness_matches_the_dense_matrix(name):
    model, optimizer, objective = trained(name)
    parameters = list(model.parameters())
    theta = objective.point()
    hessian = torch.autograd.functional.hessian(
        lambda t: sum(objective.chunk_losses(t)), theta
    )
    diagonal, decay = dense_preconditioner(name, optimizer, parameters)
    dense = torch.diag(1 / diagonal) @ (hessian + torch.diag(decay))
    expected = torch.linalg.eigvals(dense).real.max()

    result = adaptive_preconditioner(optimizer, parameters)
    operator = PreconditionedOperator(
        HessianOperator(objective), result.diagonal, result.weight_decay
    )
    top = lanczos(operator, 1, tol=1e-10, max_iter=60)

    torch.testing.assert_close(result.diagonal, diagonal, rtol=1e-12, atol=0)
    assert float(top.eigenvalues[0]) == pytest.approx(float(expected), rel=1e-8)
    assert result.threshold == pytest.approx(OPTIMIZERS[name][1])


def frozen_adam_growth(ratio, steps=200):
    """‖θ‖ after Adam on ½θᵀHθ with its preconditioner frozen at λ₁(P⁻¹H) = ratio·38.

    torch's own Adam runs every step; before each one, the second-moment state is
    set so that after Adam's update of it, √v̂ + ε = ηP exactly, and the step count
    is large so that the bias corrections are 1: the iteration is then heavy-ball
    EMA momentum on the preconditioned quadratic.
    """
    generator = torch.Generator().manual_seed(0)
    dim, lr, eps, (beta1, beta2) = 8, 0.01, 1e-8, (0.9, 0.999)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=DTYPE))
    hessian = basis @ torch.diag(torch.linspace(0.1, 1.0, dim, dtype=DTYPE)) @ basis.T
    frozen = torch.rand(dim, generator=generator, dtype=DTYPE) + 0.5  # P
    scale = frozen.rsqrt()
    top = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1]
    hessian = hessian * (ratio * 38 / top)

    theta = nn.Parameter(torch.randn(dim, generator=generator, dtype=DTYPE) * 1e-3)
    optimizer = torch.optim.Adam([theta], lr=lr, betas=(beta1, beta2), eps=eps)
    target = (frozen * lr - eps) ** 2  # v̂ with √v̂ + ε = ηP
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * theta @ hessian @ theta).backward()
        state = optimizer.state[theta]
        if not state:
            state["step"] = torch.tensor(1e6, dtype=DTYPE)
            state["exp_avg"] = torch.zeros_like(theta)
            state["exp_avg_sq"] = torch.zeros_like(theta)
        correction = 1 - beta2 ** (float(state["step"]) + 1)
        state["exp_avg_sq"] = (
            target * correction - (1 - beta2) * theta.grad**2
        ) / beta2
        optimizer.step()
    measured = adaptive_preconditioner(optimizer, [theta])
    return float(theta.detach().norm()), measured, frozen


def test_frozen_adam_diverges_exactly_at_the_threshold():
    # Just below 38 every component shrinks by √β₁ ≈ 0.95 per step; just above,
    # the top one is multiplied by about −1.35 per step; at 38 exactly its size
    # neither shrinks nor grows.
    below, measured, frozen = frozen_adam_growth(0.97, steps=200)
    above, _, _ = frozen_adam_growth(1.03, steps=40)
    at_100, _, _ = frozen_adam_growth(1.0, steps=100)
    at_200, _, _ = frozen_adam_growth(1.0, steps=200)

    torch.testing.assert_close(measured.diagonal, frozen, rtol=1e-9, atol=0)
    assert measured.threshold == pytest.approx(38.0)
    assert below < 1e-6
    assert above > 1.0
    assert at_200 == pytest.approx(at_100, rel=1e-2)


def test_errors_name_the_optimizer():
    model, _, _ = trained("adam", steps=0)
    parameters = list(model.parameters())
    sgd = torch.optim.SGD(parameters, lr=0.1)
    with pytest.raises(
        ValueError, match=r"`optimizer` must be torch.optim.Adam, AdamW or RMSprop.*SGD"
    ):
        adaptive_preconditioner(sgd, parameters)
    fresh = torch.optim.Adam(parameters, lr=0.1)
    with pytest.raises(ValueError, match="no 'exp_avg_sq' state for parameter 0 yet"):
        adaptive_preconditioner(fresh, parameters)
    partial = torch.optim.Adam(parameters[:2], lr=0.1)
    with pytest.raises(ValueError, match="does not hold parameter 2"):
        adaptive_preconditioner(partial, parameters)
    with pytest.raises(ValueError, match="`diagonal` must be positive"):
        PreconditionedOperator(
            HessianOperator(trained("adam")[2]), -torch.ones(32, dtype=DTYPE)
        )
