"""The stable flow and the central flow of RMSProp."""

import statistics

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from lightning_eos.curvature import HessianOperator
from lightning_eos.flows import (
    PreconditionedHessian,
    RMSPropCentralFlow,
    RMSPropFlow,
)

from .test_flows import S0, C, K, Quadratic, Toy, objective, quadratic_loss, toy_loss


def test_preconditioned_sharpness_is_the_generalized_eigenvalue():
    model = Quadratic([0.5, 1.0, 3.0, 6.0])
    flow = RMSPropFlow(
        objective(model, quadratic_loss), model.w.detach(), lr=0.1, alpha=0.9
    )
    preconditioner = (flow.nu.sqrt() + flow.eps) / flow.lr
    scale = preconditioner.rsqrt()
    dense = scale[:, None] * model.matrix * scale[None, :]
    expected = torch.linalg.eigvalsh(dense)[-1]
    assert flow.observe().sharpness == pytest.approx(float(expected), rel=1e-8)
    operator = PreconditionedHessian(HessianOperator(flow.objective), scale)
    torch.testing.assert_close(operator.matmat(torch.eye(4).double()), dense)


def test_stable_flow_matches_a_dense_ode_solution():
    # θ̇ = −η∇L/(√ν + ε), ν̇ = κ(∇L² − ν) on a quadratic, against scipy's RK45 at
    # tolerance 1e-12.
    model = Quadratic([0.5, 1.0, 3.0, 6.0])
    lr, alpha, eps = 0.02, 0.9, 1e-3
    flow = RMSPropFlow(
        objective(model, quadratic_loss),
        model.w.detach(),
        lr=lr,
        alpha=alpha,
        eps=eps,
        substep_bound=0.1,
    )
    matrix, linear = model.matrix.numpy(), model.linear.numpy()
    kappa = (1 - alpha) / alpha

    def field(_, state):
        theta, nu = state[:4], state[4:]
        gradient = matrix @ theta - linear
        return np.concatenate(
            [-lr * gradient / (np.sqrt(nu) + eps), kappa * (gradient**2 - nu)]
        )

    start = np.concatenate([model.w.detach().numpy(), flow.nu.numpy()])
    exact = solve_ivp(field, (0, 10), start, rtol=1e-12, atol=1e-14).y[:, -1]
    for _ in range(10):
        flow.advance()
    np.testing.assert_allclose(flow.theta.numpy(), exact[:4], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(flow.nu.numpy(), exact[4:], rtol=1e-5, atol=1e-9)


def discrete_rmsprop_on_the_toy(lr, alpha, steps, x=0.3, z=4.0):
    """RMSProp from ν = 0 in plain float arithmetic: (x_t, z_t, L_t) for each t."""
    nu_x = nu_z = 0.0
    path = []
    for _ in range(steps + 1):
        path.append((x, z, 0.5 * (S0 + C * z) * x * x - K * z))
        grad_x, grad_z = (S0 + C * z) * x, 0.5 * C * x * x - K
        nu_x = alpha * nu_x + (1 - alpha) * grad_x**2
        nu_z = alpha * nu_z + (1 - alpha) * grad_z**2
        x, z = x - lr * grad_x / nu_x**0.5, z - lr * grad_z / nu_z**0.5
    return path


def test_central_flow_predicts_rmsprop_on_the_toy():
    # At the edge the oscillation sets ν_x so that λ(P⁻¹H) = 2: σ = η/2 whatever
    # the sharpness, and z drifts at the rate RMSProp's own z does.
    lr, alpha = 0.2, 0.9
    path = discrete_rmsprop_on_the_toy(lr, alpha, 200)
    model = Toy(0.3, 4.0)
    flow = RMSPropCentralFlow(
        objective(model, toy_loss),
        torch.tensor([0.3, 4.0]),
        lr=lr,
        alpha=alpha,
        eps=0.0,
    )
    records, heights = [], []
    for _ in range(191):
        records.append(flow.observe())
        heights.append(float(flow.theta[1]))
        flow.advance()

    for t in (100, 150, 190):
        mean_square = statistics.mean(x * x for x, _, _ in path[t - 10 : t + 11])
        assert records[t].variances[0] == pytest.approx(mean_square, rel=0.01)
        assert records[t].variances[0] == pytest.approx(lr**2 / 4, rel=0.04)
        assert records[t].sharpness == pytest.approx(2.0, rel=1e-4)
        assert records[t].critical == 1
    rmsprop_rate = (path[190][1] - path[100][1]) / 90
    assert (heights[190] - heights[100]) / 90 == pytest.approx(rmsprop_rate, rel=0.01)


def test_central_flow_is_the_stable_flow_below_the_threshold():
    model = Quadratic([0.5, 1.0, 3.0, 6.0])
    point = model.w.detach()
    options = {"lr": 0.01, "alpha": 0.9, "eps": 1e-3}
    central = RMSPropCentralFlow(objective(model, quadratic_loss), point, **options)
    stable = RMSPropFlow(objective(model, quadratic_loss), point, **options)
    for _ in range(8):
        assert central.observe().critical == 0
        central.advance()
        stable.advance()
    assert torch.equal(central.theta, stable.theta)
    assert torch.equal(central.nu, stable.nu)


def test_a_stiff_stable_flow_stops_with_a_reason():
    # On the toy, ν_x decays with x and λ(P⁻¹H) grows without bound.
    model = Toy(0.3, 4.0)
    flow = RMSPropFlow(
        objective(model, toy_loss),
        torch.tensor([0.3, 4.0]),
        lr=0.2,
        alpha=0.9,
        eps=0.0,
        max_substeps=8,
    )
    for _ in range(40):
        flow.advance()
    assert flow.failed is not None and "too stiff" in flow.failed
    assert flow.time == 40.0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"alpha": 1.0}, "`alpha` must be a finite number in \\(0, 1\\), got 1.0"),
        ({"eps": -1.0}, "`eps`"),
        ({"nu": -torch.ones(2)}, "`nu` must be a flat, finite, non-negative"),
        ({"nu": torch.ones(3)}, "`nu`"),
    ],
    ids=["alpha", "eps", "negative-nu", "shape-nu"],
)
def test_bad_settings_are_refused(options, match):
    model = Toy(0.3, 4.0)
    with pytest.raises(ValueError, match=match):
        RMSPropCentralFlow(
            objective(model, toy_loss), torch.tensor([0.3, 4.0]), lr=0.1, **options
        )
