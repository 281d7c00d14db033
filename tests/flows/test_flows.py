"""Gradient flow and the central flow against exact solutions."""

import math

import pytest
import torch
from torch import nn

from lightning_eos.curvature import ProbeObjective
from lightning_eos.flows import (
    CentralFlow,
    GradientFlow,
    RMSPropCentralFlow,
    RMSPropFlow,
)

DATA = [torch.zeros(1, 1, dtype=torch.float64)]  # the losses below ignore the batch


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw − bᵀw with the spectrum given."""

    def __init__(self, spectrum, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        n = len(spectrum)
        basis, _ = torch.linalg.qr(
            torch.randn(n, n, dtype=torch.float64, generator=generator)
        )
        matrix = basis @ torch.diag(torch.tensor(spectrum).double()) @ basis.T
        self.register_buffer("matrix", (matrix + matrix.T) / 2)
        self.register_buffer(
            "linear", torch.randn(n, dtype=torch.float64, generator=generator)
        )
        self.w = nn.Parameter(torch.randn(n, dtype=torch.float64, generator=generator))

    def exact_gradient_flow(self, lr, t):
        """w(t) = w* + exp(−ηAt)(w(0) − w*)."""
        optimum = torch.linalg.solve(self.matrix, self.linear)
        decay = torch.linalg.matrix_exp(-lr * t * self.matrix)
        return optimum + decay @ (self.w.detach() - optimum)


def quadratic_loss(module, batch):
    w = module.w
    return 0.5 * w @ module.matrix @ w - module.linear @ w


class Toy(nn.Module):
    """L(x, z) = ½(s₀ + cz)x² − kz: the sharpness s₀ + cz grows with z."""

    def __init__(self, x, z):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x, dtype=torch.float64))
        self.z = nn.Parameter(torch.tensor(z, dtype=torch.float64))


S0, C, K, ETA = 190.0, 2.0, 0.1, 0.01


def toy_loss(module, batch):
    return 0.5 * (S0 + C * module.z) * module.x**2 - K * module.z


def objective(module, batch_loss):
    return ProbeObjective(module, DATA, batch_loss=batch_loss)


def run(flow, steps):
    records = []
    for _ in range(steps):
        records.append(flow.observe())
        flow.advance(1.0)
    records.append(flow.observe())
    return records


# -- gradient flow -------------------------------------------------------------------


@pytest.mark.parametrize(("method", "order"), [("rk4", 4), ("euler", 1)])
def test_gradient_flow_converges_at_the_order_of_its_method(method, order):
    model = Quadratic([0.5, 1.0, 3.0, 6.0, 8.0])
    exact = model.exact_gradient_flow(lr=0.2, t=5.0)
    errors = []
    for bound in (0.1, 0.05):  # h = 1/16 and 1/32: the asymptotic regime
        flow = GradientFlow(
            objective(model, quadratic_loss),
            model.w.detach(),
            lr=0.2,
            method=method,
            substep_bound=bound,
        )
        for _ in range(5):
            flow.advance(1.0)
        errors.append(float((flow.theta - exact).norm()))
    # Halving the substep divides the error by 2^order (within 20 %).
    assert errors[0] / errors[1] == pytest.approx(2**order, rel=0.2)


def test_gradient_flow_is_accurate_with_the_default_bound():
    model = Quadratic([0.5, 1.0, 3.0, 6.0, 9.5])
    flow = GradientFlow(objective(model, quadratic_loss), model.w.detach(), lr=0.2)
    records = run(flow, 20)
    exact = model.exact_gradient_flow(lr=0.2, t=20.0)
    travelled = float((exact - model.w.detach()).norm())
    assert float((flow.theta - exact).norm()) < 1e-4 * travelled
    # ηλ₁ = 1.9 and h·ηλ₁ ≤ 1: two RK4 substeps (8 gradients, one from observe).
    assert records[1].substeps == 2
    assert records[1].gradients == 8
    assert records[1].sharpness == pytest.approx(9.5, rel=1e-6)
    assert [r.time for r in records] == list(range(21))


# -- the central flow below the threshold ---------------------------------------------


def test_central_flow_is_gradient_flow_below_the_threshold_on_a_quadratic():
    model = Quadratic([0.5, 1.0, 3.0, 6.0, 9.5])
    point = model.w.detach()
    central = CentralFlow(objective(model, quadratic_loss), point, lr=0.2)
    gradient = GradientFlow(objective(model, quadratic_loss), point, lr=0.2)
    records = run(central, 10)
    run(gradient, 10)
    assert torch.equal(central.theta, gradient.theta)  # bit for bit
    assert all(r.variances == [] and r.critical == 0 for r in records)
    assert all(r.loss_average == r.loss for r in records)


def test_curvature_just_below_the_threshold_gets_no_weight():
    # λ₁ = 9.95 is within the 1 % margin of 2/η = 10: a candidate, but the Hessian
    # is constant, nothing pushes it across, and Σ stays 0.
    model = Quadratic([1.0, 4.0, 9.95])
    flow = CentralFlow(objective(model, quadratic_loss), model.w.detach(), lr=0.2)
    records = run(flow, 5)
    assert all(r.candidates == 1 for r in records)
    assert all(r.critical == 0 and r.loss_average == r.loss for r in records)
    exact = model.exact_gradient_flow(lr=0.2, t=5.0)
    # Euler substeps (h = 1/4) near the threshold: first-order accurate.
    assert float((flow.theta - exact).norm()) < 0.05 * float(exact.norm())


# -- the toy model of the paper --------------------------------------------------------


@pytest.mark.parametrize("refresh_every", [None, 12], ids=lambda r: f"refresh{r}")
def test_toy_central_flow_is_stationary_at_the_predicted_point(refresh_every):
    # z grows at rate ηk until s₀ + cz = 2/η at z* = 5; there Σ = σ² = 2k/c = 0.1
    # balances the gradient: ∇L + ½σ²∇S = (0, −k + ½σ²c) = 0.
    model = Toy(0.3, 4.95)
    point = torch.tensor([0.3, 4.95])
    flow = CentralFlow(
        objective(model, toy_loss), point, lr=ETA, refresh_every=refresh_every
    )
    records = run(flow, 90)
    late = records[-10:]
    for record in late:
        assert record.variances == [pytest.approx(0.1, rel=1e-6)]
        assert record.sharpness == pytest.approx(200.0, rel=1e-6)
        assert record.loss_average == pytest.approx(9.5, rel=1e-6)
    assert flow.theta[0].abs() < 1e-6
    assert flow.theta[1] == pytest.approx(5.0, rel=1e-6)
    assert records[0].critical == 0  # z < z*: not yet at the edge


def test_toy_gradient_descent_time_average_matches_the_prediction():
    # GD near its period-two orbit x = ±√0.1, z = 5: the mean loss over 100,000
    # steps is the central flow's prediction 9.5 (shorter windows wander).
    x, z, total, steps = 0.3, 5.0, 0.0, 100_000
    for _ in range(steps):
        total += 0.5 * (S0 + C * z) * x * x - K * z
        x, z = x - ETA * (S0 + C * z) * x, z - ETA * (0.5 * C * x * x - K)
    assert total / steps == pytest.approx(9.5, rel=5e-3)


# -- determinism, checkpoints, bad settings --------------------------------------------


@pytest.mark.parametrize("refresh_every", [None, 2, 12], ids=lambda r: f"refresh{r}")
def test_integration_is_deterministic_and_resumable(refresh_every):
    def fresh():
        model = Toy(0.3, 4.97)
        return CentralFlow(
            objective(model, toy_loss),
            torch.tensor([0.3, 4.97]),
            lr=ETA,
            refresh_every=refresh_every,
        )

    straight = fresh()
    run(straight, 40)
    first = fresh()
    run(first, 20)
    state = first.state_dict()
    second = fresh()
    second.load_state_dict(state)
    records = run(second, 20)
    assert torch.equal(second.theta, straight.theta)
    assert records[-1].time == 40.0
    again = fresh()
    run(again, 40)
    assert torch.equal(again.theta, straight.theta)


def test_adopting_a_gradient_flow_changes_nothing():
    model = Toy(0.3, 4.85)
    point = torch.tensor([0.3, 4.85])
    # With a margin of 0.1 %, z is a candidate from z = 4.9 on (λ₁ ≥ 199.8).
    alone = CentralFlow(objective(model, toy_loss), point, lr=ETA, margin=1e-3)
    together = CentralFlow(objective(model, toy_loss), point, lr=ETA, margin=1e-3)
    companion = GradientFlow(objective(model, toy_loss), point, lr=ETA)
    adopted = []
    for _ in range(80):
        alone.observe()
        alone.advance()
        companion.advance()
        adopted.append(together.adopt(companion))
        while together.time < alone.time:  # on its own once it has detached
            together.advance()
    assert adopted[0] and not adopted[-1]  # z* is reached on the way
    assert torch.equal(together.theta, alone.theta)
    with pytest.raises(ValueError, match="settings"):
        CentralFlow(objective(model, toy_loss), point, lr=ETA, tol=0.1).adopt(companion)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": 0.0}, "`lr` must be a finite number in \\(0, inf\\), got 0.0"),
        ({"lr": -0.1}, "`lr`"),
        ({"lr": math.inf}, "`lr`"),
        ({"substeps": 0}, "`substeps` must be an integer of at least 1"),
        ({"refresh_every": 0}, "`refresh_every`"),
        ({"margin": 0.0}, "`margin`"),
        ({"method": "rk45"}, "`method` must be one of"),
        ({"substep_bound": 3.0}, "`substep_bound` .* in \\(0, 2.785\\], got 3.0"),
        ({"method": "euler", "substep_bound": 2.5}, "\\(0, 2\\], got 2.5"),
        ({"tol": 0.0}, "`tol`"),
        ({"max_critical": 0}, "`max_critical`"),
        ({"point": torch.tensor([math.nan, 4.9])}, "`point` must be finite"),
    ],
    ids=lambda value: str(value)[:30],
)
def test_bad_settings_are_refused(options, match):
    model = Toy(0.3, 4.9)
    options = {"lr": ETA, "point": torch.tensor([0.3, 4.9]), **options}
    with pytest.raises(ValueError, match=match):
        CentralFlow(objective(model, toy_loss), **options)


FLOWS = {
    "gradient": GradientFlow,
    "central": CentralFlow,
    "rmsprop": RMSPropFlow,
    "rmsprop-central": RMSPropCentralFlow,
}
SEEDS = {
    "negative": (-1, "got -1"),
    "nan": (math.nan, "got nan"),
    "str": ("abc", "got 'abc'"),
    "none": (None, "got None"),
    "float": (1.0, "got 1.0"),
    "bool": (True, "got True"),
    "huge": (2**64, "got 18446744073709551616"),
}


@pytest.mark.parametrize(("seed", "received"), SEEDS.values(), ids=SEEDS)
@pytest.mark.parametrize("flow_class", FLOWS.values(), ids=FLOWS)
def test_bad_seeds_are_refused(flow_class, seed, received):
    model = Toy(0.3, 4.9)
    with pytest.raises(
        ValueError, match=rf"`seed` must be an integer in \[0, 4294967295\], {received}"
    ):
        flow_class(
            objective(model, toy_loss), torch.tensor([0.3, 4.9]), lr=ETA, seed=seed
        )


def test_bad_advance_is_refused():
    model = Toy(0.3, 4.9)
    flow = GradientFlow(objective(model, toy_loss), torch.tensor([0.3, 4.9]), lr=ETA)
    with pytest.raises(ValueError, match="`duration`"):
        flow.advance(0.0)
    with pytest.raises(ValueError, match="`lr`"):
        flow.advance(1.0, lr=-1.0)
    with pytest.raises(ValueError, match="flat vector of 2 entries"):
        GradientFlow(objective(model, toy_loss), torch.zeros(3), lr=ETA)


def test_too_many_critical_directions_stop_the_flow_with_a_reason():
    # Four eigenvalues far above 2/η: beyond max_critical=3 the flow stops, fast,
    # instead of solving an ever larger complementarity problem at every substep.
    model = Quadratic([40.0, 35.0, 30.0, 25.0, 1.0])
    flow = CentralFlow(
        objective(model, quadratic_loss), model.w.detach(), 0.1, max_critical=3
    )
    record = flow.observe()
    assert flow.failed is not None and "max_critical=3" in flow.failed
    assert record.critical == 0
    start = flow.theta.clone()
    flow.advance(1.0)
    assert torch.equal(flow.theta, start) and flow.time == 1.0
    # With room for all four it goes on to the complementarity problem, which a
    # quadratic (no third derivative to lower the curvature) cannot solve.
    roomy = CentralFlow(
        objective(model, quadratic_loss), model.w.detach(), 0.1, max_critical=4
    )
    assert roomy.observe().candidates == 4
    assert "complementarity problem has no solution" in roomy.failed
