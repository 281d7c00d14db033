import math

import pytest
import torch

from lightning_eos.curvature.thresholds import stability_threshold
from lightning_eos.optim import GSAM, SAM

A = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.8, -1.1]], dtype=torch.float64)


def loss_fn(w, b):
    return (torch.tanh(A @ w + b) ** 2).sum() + 0.1 * (w**4).sum()


def gradient(w, b):
    w, b = w.detach().requires_grad_(), b.detach().requires_grad_()
    return torch.autograd.grad(loss_fn(w, b), (w, b))


def make_params():
    w = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.2, -0.3], dtype=torch.float64))
    return w, b


def recording_closure(optimizer, params, points):
    def closure():
        points.append([p.detach().clone() for p in params])
        optimizer.zero_grad()
        loss = loss_fn(*params)
        loss.backward()
        return loss

    return closure


def test_perturbation_is_rho_times_normalized_gradient():
    params = make_params()
    optimizer = SAM(params, torch.optim.SGD, rho=0.07, lr=0.1)
    points = []
    optimizer.step(recording_closure(optimizer, params, points))

    g = torch.cat(gradient(*points[0]))
    epsilon = torch.cat([q - p for p, q in zip(points[0], points[1], strict=True)])
    torch.testing.assert_close(epsilon, 0.07 * g / g.norm(), rtol=1e-13, atol=1e-15)
    assert len(points) == 2
    assert optimizer.last_stats["epsilon_norm"] == pytest.approx(0.07, rel=1e-13)
    assert optimizer.last_stats["grad_norm"] == pytest.approx(float(g.norm()))


def test_two_steps_equal_hand_computed_sam_with_momentum_and_weight_decay():
    rho, lr, beta, decay = 0.05, 0.1, 0.9, 1e-2
    params = make_params()
    optimizer = SAM(
        params,
        torch.optim.SGD,
        rho=rho,
        lr=lr,
        base_kwargs={"momentum": beta, "weight_decay": decay},
    )
    closure = recording_closure(optimizer, params, [])
    optimizer.step(closure)
    optimizer.step(closure)

    theta = [p.detach().clone() for p in make_params()]
    buffers = None
    for _ in range(2):
        g = gradient(*theta)
        norm = torch.cat(g).norm()
        perturbed = [t + rho * gi / norm for t, gi in zip(theta, g, strict=True)]
        d = [gp + decay * t for gp, t in zip(gradient(*perturbed), theta, strict=True)]
        buffers = (
            d
            if buffers is None
            else [beta * m + di for m, di in zip(buffers, d, strict=True)]
        )
        theta = [t - lr * m for t, m in zip(theta, buffers, strict=True)]
    for p, expected in zip(params, theta, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-13, atol=1e-15)


def test_asam_perturbation_has_unit_normalized_radius():
    rho, eta = 0.5, 0.01
    params = make_params()
    optimizer = SAM(params, torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=0.1)
    points = []
    optimizer.step(recording_closure(optimizer, params, points))

    t = torch.cat([p.abs() + eta for p in points[0]])
    g = torch.cat(gradient(*points[0]))
    epsilon = torch.cat([q - p for p, q in zip(points[0], points[1], strict=True)])
    assert float((epsilon / t).norm()) == pytest.approx(rho, rel=1e-13)
    torch.testing.assert_close(
        epsilon, rho * t**2 * g / (t * g).norm(), rtol=1e-12, atol=1e-15
    )


PERTURB_CASES = {"all": ("all", True), "weights": ("weights", False)}


@pytest.mark.parametrize(
    ("perturb", "bias_moves"), PERTURB_CASES.values(), ids=PERTURB_CASES
)
def test_perturb_chooses_the_tensors(perturb, bias_moves):
    params = make_params()
    matrix_weight = torch.nn.Parameter(torch.ones(2, 2, dtype=torch.float64))
    optimizer = SAM([*params, matrix_weight], rho=0.1, perturb=perturb, lr=0.1)
    points = []

    def closure():
        points.append([p.detach().clone() for p in (*params, matrix_weight)])
        optimizer.zero_grad()
        loss = loss_fn(*params) + (matrix_weight**3).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    moved = [not torch.equal(p, q) for p, q in zip(points[0], points[1], strict=True)]
    assert moved == [bias_moves, bias_moves, True]  # w and b are 1-D here


def test_group_with_zero_rho_is_not_perturbed():
    w, b = make_params()
    optimizer = SAM([{"params": [w]}, {"params": [b], "rho": 0.0}], rho=0.1, lr=0.1)
    points = []
    optimizer.step(recording_closure(optimizer, (w, b), points))

    assert torch.equal(points[0][1], points[1][1])
    assert float((points[1][0] - points[0][0]).norm()) == pytest.approx(0.1)


def test_gsam_steps_along_perturbed_gradient_minus_alpha_orthogonal_part():
    rho, alpha, lr = 0.05, 0.3, 0.1
    params = make_params()
    optimizer = GSAM(params, torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    optimizer.step(recording_closure(optimizer, params, []))

    theta = [p.detach().clone() for p in make_params()]
    g = torch.cat(gradient(*theta))
    perturbed = [
        t + rho * gi / g.norm() for t, gi in zip(theta, gradient(*theta), strict=True)
    ]
    gp = torch.cat(gradient(*perturbed))
    orthogonal = g - (g @ gp) / (gp @ gp) * gp
    expected = torch.cat(theta) - lr * (gp - alpha * orthogonal)
    torch.testing.assert_close(
        torch.cat([p.detach() for p in params]), expected, rtol=1e-13, atol=1e-15
    )
    assert optimizer.last_stats["cosine"] == pytest.approx(
        float(g @ gp / (g.norm() * gp.norm()))
    )


def test_zero_gradient_gives_no_perturbation():
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    optimizer = SAM([w], rho=0.1, lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.last_stats["epsilon_norm"] == 0.0
    assert torch.equal(w.detach(), torch.zeros(3, dtype=torch.float64))


def test_non_finite_gradient_warns_once_and_does_not_crash():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = SAM([w], rho=0.1, lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (w * torch.tensor([math.inf, 1.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="not finite"):
        optimizer.step(closure)
    optimizer.step(closure)  # no second warning (pytest would not fail, so count)
    assert optimizer._warned == {"non-finite"}


def test_scheduler_drives_the_learning_rate_the_base_optimizer_uses():
    params = make_params()
    optimizer = SAM(params, torch.optim.SGD, rho=0.05, lr=0.4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step(recording_closure(optimizer, params, []))
    scheduler.step()

    assert optimizer.base_optimizer.param_groups[0]["lr"] == 0.2
    assert optimizer.param_groups is optimizer.base_optimizer.param_groups


def run_steps(optimizer, scheduler, params, count):
    closure = recording_closure(optimizer, params, [])
    for _ in range(count):
        optimizer.step(closure)
        scheduler.step()


def build(params):
    optimizer = SAM(
        params, torch.optim.SGD, rho=0.05, lr=0.3, base_kwargs={"momentum": 0.9}
    )
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)


def test_state_dict_resumes_exactly_and_rebinds_the_groups():
    straight = make_params()
    optimizer, scheduler = build(straight)
    run_steps(optimizer, scheduler, straight, 4)

    first = make_params()
    optimizer, scheduler = build(first)
    run_steps(optimizer, scheduler, first, 2)
    saved = (optimizer.state_dict(), scheduler.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    optimizer, scheduler = build(resumed)
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    run_steps(optimizer, scheduler, resumed, 2)

    assert optimizer.param_groups is optimizer.base_optimizer.param_groups
    for p, q in zip(straight, resumed, strict=True):
        assert torch.equal(p.detach(), q.detach())


def test_nested_callable_base_optimizer_and_its_own_learning_rate():
    params = make_params()
    factory = lambda groups: torch.optim.SGD(groups, lr=0.25, momentum=0.5)  # noqa: E731
    optimizer = SAM(params, factory, rho=0.05)
    assert optimizer.param_groups[0]["lr"] == 0.25
    assert optimizer.param_groups[0]["momentum"] == 0.5
    assert optimizer.param_groups[0]["rho"] == 0.05


def test_sam_edge_threshold():
    rho, lr = 0.05, 0.1
    params = make_params()
    optimizer = SAM(params, torch.optim.SGD, rho=rho, lr=lr)
    assert stability_threshold(optimizer).value == pytest.approx(2 / lr)
    optimizer.step(recording_closure(optimizer, params, []))

    threshold = stability_threshold(optimizer)
    g = optimizer.last_stats["grad_norm"]
    # On a quadratic, the multiplier along an eigenvector at the threshold is −1.
    assert 1 - lr * threshold.value * (1 + rho * threshold.value / g) == pytest.approx(
        -1
    )
    assert threshold.value < 2 / lr
    assert "SAM-edge" in threshold.rule


THRESHOLD_NONE = {
    "momentum": {"base_kwargs": {"momentum": 0.9}},
    "asam": {"adaptive": True},
    "adam-base": {"base_optimizer": torch.optim.Adam},
}


@pytest.mark.parametrize("options", THRESHOLD_NONE.values(), ids=THRESHOLD_NONE)
def test_no_threshold_where_none_is_known(options):
    options = {"base_optimizer": torch.optim.SGD, "lr": 0.1, **options}
    optimizer = SAM(make_params(), **options)
    threshold = stability_threshold(optimizer)
    assert threshold.value is None
    assert threshold.reason
