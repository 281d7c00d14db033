"""Each penalty's value and gradient against the explicit penalty built densely."""

import pytest
import torch
from torch.nn.utils import vector_to_parameters

from lightning_eos.curvature import ProbeObjective
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    MinibatchGradientNormPenalty,
    SharpnessPenalty,
    TracePenalty,
)
from tests.curvature.cases import Case, chunks, dense_loss_function
from tests.penalties.cases import make_case

# Exact products in float64: agreement to round-off, bounded by the eigensolver's
# residual (tol 1e-11) for the penalties built on an eigenvector.
EXACT = {"rtol": 1e-8, "atol": 1e-11}
# Central differences with step 1e-5: truncation ≈ 1e-10 · P''', round-off ≈ 1e-11.
FINITE_DIFFERENCE_RTOL = 1e-6


def objective_for(case: Case, normalization: str = "native") -> ProbeObjective:
    return ProbeObjective(
        case.model,
        chunks(case),
        loss_fn=case.loss_fn,
        train_mode=case.train_mode,
        normalization=normalization,
    )


def subset(case: Case, start: int, stop: int) -> Case:
    return Case(
        case.name,
        case.model,
        case.inputs[start:stop],
        case.targets[start:stop],
        case.loss_fn,
        chunk_size=stop - start,
        train_mode=case.train_mode,
    )


def gradient_norm_penalty(case, c):
    loss, theta0 = dense_loss_function(case)

    def penalty(theta):
        (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        return c / 4 * gradient.square().sum()

    return penalty, theta0


def minibatch_penalty(case, c, size):
    n = case.inputs.shape[0]
    losses = [
        dense_loss_function(subset(case, s, min(s + size, n)))[0]
        for s in range(0, n, size)
    ]
    theta0 = dense_loss_function(case)[1]

    def penalty(theta):
        total = theta.new_zeros(())
        for loss in losses:
            (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
            total = total + gradient.square().sum()
        return c / 4 * total / len(losses)

    return penalty, theta0


def dense_hessian_with_graph(loss, theta):
    return torch.autograd.functional.hessian(
        loss, theta, create_graph=True, vectorize=True
    )


def sharpness_penalty(case, mu):
    loss, theta0 = dense_loss_function(case)

    def penalty(theta):
        return mu * torch.linalg.eigvalsh(dense_hessian_with_graph(loss, theta))[-1]

    return penalty, theta0


def quadratic_forms_penalty(case, mu, vectors):
    loss, theta0 = dense_loss_function(case)

    def penalty(theta):
        H = dense_hessian_with_graph(loss, theta)
        return mu * ((vectors @ H) * vectors).sum(dim=1).mean()

    return penalty, theta0


def value_and_gradient(penalty, theta0):
    theta = theta0.clone().requires_grad_()
    value = penalty(theta)
    (gradient,) = torch.autograd.grad(value, theta)
    return value.item(), gradient


def assert_matches_dense(result, penalty, theta0):
    value, gradient = value_and_gradient(penalty, theta0)
    assert result.value == pytest.approx(value, rel=1e-9)
    torch.testing.assert_close(result.gradient, gradient, **EXACT)


def finite_difference_and_slope(case, make_penalty, step_size=None, **options):
    """(P(θ + εw) − P(θ − εw)) / 2ε and ⟨∇P, w⟩, each P from a fresh penalty."""
    objective = objective_for(case, **options)
    theta = objective.point()
    direction = torch.randn(objective.dim, dtype=torch.float64, generator=GEN)
    direction /= direction.norm()
    slope = make_penalty().evaluate(objective, step_size).gradient @ direction
    eps = 1e-5
    values = []
    for sign in (1, -1):
        vector_to_parameters(theta + sign * eps * direction, case.model.parameters())
        values.append(make_penalty().evaluate(objective, step_size).value)
    vector_to_parameters(theta, case.model.parameters())
    return (values[0] - values[1]) / (2 * eps), float(slope)


def assert_matches_finite_differences(case, make_penalty, step_size=None):
    difference, slope = finite_difference_and_slope(case, make_penalty, step_size)
    assert difference == pytest.approx(slope, rel=FINITE_DIFFERENCE_RTOL)


GEN = torch.Generator().manual_seed(7)
MODELS = ["mlp", "cnn"]


@pytest.mark.parametrize("name", [*MODELS, "batchnorm"])
@pytest.mark.parametrize("coefficient", [0.3, "lr"], ids=["c=0.3", "c=lr"])
def test_gradient_norm_penalty(name, coefficient):
    case = make_case(name)
    penalty = GradientNormPenalty(coefficient)
    result = penalty.evaluate(objective_for(case), step_size=0.3)
    assert_matches_dense(result, *gradient_norm_penalty(case, 0.3))
    assert result.num_products == 1
    assert_matches_finite_differences(
        case, lambda: GradientNormPenalty(coefficient), 0.3
    )


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("size", [5, 12], ids=["uneven", "even"])
def test_minibatch_gradient_norm_penalty(name, size):
    case = make_case(name)
    penalty = MinibatchGradientNormPenalty(batch_size=size, coefficient=0.5)
    result = penalty.evaluate(objective_for(case))
    assert_matches_dense(result, *minibatch_penalty(case, 0.5, size))
    n = case.inputs.shape[0]
    assert result.metrics["minibatches"] == -(-n // size)
    assert_matches_finite_differences(
        case, lambda: MinibatchGradientNormPenalty(size, coefficient=0.5)
    )


def test_minibatch_penalty_with_one_minibatch_is_the_full_batch_penalty():
    case = make_case("mlp")
    full = GradientNormPenalty(0.5).evaluate(objective_for(case))
    single = MinibatchGradientNormPenalty(10_000, 0.5).evaluate(objective_for(case))
    assert single.value == pytest.approx(full.value, rel=1e-12)
    torch.testing.assert_close(single.gradient, full.gradient, rtol=1e-10, atol=0)


def test_shuffled_minibatches_are_a_permutation_drawn_from_the_seed():
    case = make_case("mlp")
    objective = objective_for(case)
    first = MinibatchGradientNormPenalty(5, shuffle=True, seed=3)
    second = MinibatchGradientNormPenalty(5, shuffle=True, seed=3)
    batches = first.minibatches(objective)
    inputs = torch.cat([b[0] for b in batches])
    assert not torch.equal(inputs, case.inputs)
    assert torch.equal(inputs.sort(dim=0).values, case.inputs.sort(dim=0).values)
    assert torch.equal(torch.cat([b[0] for b in second.minibatches(objective)]), inputs)
    state = first.state_dict()
    again = first.minibatches(objective)
    first.load_state_dict(state)
    assert all(
        torch.equal(a[0], b[0])
        for a, b in zip(again, first.minibatches(objective), strict=True)
    )


@pytest.mark.parametrize("name", MODELS)
def test_sharpness_penalty(name):
    case = make_case(name)
    penalty = SharpnessPenalty(
        coefficient=0.7, tol=1e-10, max_iter=200, extra_vectors=0
    )
    result = penalty.evaluate(objective_for(case))
    assert result.metrics["converged"] == 1.0
    assert_matches_dense(result, *sharpness_penalty(case, 0.7))
    assert result.num_third_order == 1
    assert_matches_finite_differences(
        case, lambda: SharpnessPenalty(0.7, tol=1e-10, max_iter=200, extra_vectors=0)
    )


def test_sharpness_penalty_warm_start_saves_products():
    case = make_case("mlp")
    objective = objective_for(case)
    penalty = SharpnessPenalty(coefficient=1.0, tol=1e-6, extra_vectors=1)
    cold = penalty.evaluate(objective)
    warm = penalty.evaluate(objective)
    assert warm.value == pytest.approx(cold.value, rel=1e-10)
    assert warm.num_products <= 4 < cold.num_products


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_trace_penalty_is_exact_for_its_vectors(name, distribution):
    case = make_case(name)
    penalty = TracePenalty(coefficient=0.4, num_samples=3, distribution=distribution)
    result = penalty.evaluate(objective_for(case))
    vectors = penalty.last_vectors
    assert vectors.shape == (3, result.gradient.numel())
    if distribution == "rademacher":
        assert set(vectors.unique().tolist()) == {-1.0, 1.0}
    assert_matches_dense(result, *quadratic_forms_penalty(case, 0.4, vectors))
    assert result.metrics["trace_standard_error"] > 0


@pytest.mark.stochastic
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_trace_estimate_is_unbiased(distribution):
    """The estimate is exact for its vectors (above) and linear in vvᵀ, so it is
    unbiased when E[vvᵀ] = I: checked on 4000 drawn vectors, and end to end on
    the value, within 5 standard errors."""
    case = make_case("mlp")
    loss, theta0 = dense_loss_function(case)
    H = torch.autograd.functional.hessian(loss, theta0)
    penalty = TracePenalty(0.0, num_samples=4000, distribution=distribution)
    case.chunk_size = len(case.inputs)  # one chunk: every product reuses one graph
    result = penalty.evaluate(objective_for(case))
    assert not result.active and result.value == 0  # μ = 0: no third order spent
    assert result.num_third_order == 0

    vectors = penalty.last_vectors
    second_moment = vectors.T @ vectors / len(vectors)
    spread = (2 if distribution == "gaussian" else 1) ** 0.5 / len(vectors) ** 0.5
    identity = torch.eye(vectors.shape[1], dtype=torch.float64)
    assert (second_moment - identity).abs().max() < 5 * spread
    error = result.metrics["trace_standard_error"]
    assert abs(result.metrics["trace"] - torch.trace(H).item()) < 5 * error


def test_trace_vectors_are_fresh_at_every_evaluation_and_reproducible():
    case = make_case("mlp")
    first, second = TracePenalty(1.0, seed=5), TracePenalty(1.0, seed=5)
    draws = []
    for _ in range(2):
        first.evaluate(objective_for(case))
        draws.append(first.last_vectors)
    assert not torch.equal(draws[0], draws[1])
    second.evaluate(objective_for(case))
    assert torch.equal(second.last_vectors, draws[0])


def central_flow_quantities(case):
    """S, ∇L and ∇S at the case's parameters, from dense float64 autograd."""
    loss, theta0 = dense_loss_function(case)
    theta = theta0.clone().requires_grad_()
    (loss_gradient,) = torch.autograd.grad(loss(theta), theta)
    H = dense_hessian_with_graph(loss, theta)
    sharpness = torch.linalg.eigvalsh(H)[-1]
    (sharpness_gradient,) = torch.autograd.grad(sharpness, theta)
    return sharpness.item(), loss_gradient, sharpness_gradient


def central_flow(threshold):
    return CentralFlowPenalty(
        target_lr=2 / threshold, tol=1e-10, max_iter=200, extra_vectors=0
    )


# At its initialization the MLP's sharpness falls along −∇L (⟨∇L, ∇S⟩ > 0, so the
# multiplier is zero at the threshold) and the CNN's rises (σ² > 0).
@pytest.mark.parametrize("name", MODELS)
def test_central_flow_multiplier_at_the_threshold(name):
    """At S = 2/η★: σ² = max(0, −2⟨∇L, ∇S⟩/‖∇S‖²), value ½σ²S, gradient ½σ²∇S."""
    case = make_case(name)
    sharpness, g, grad_s = central_flow_quantities(case)
    result = central_flow(sharpness).evaluate(objective_for(case), step_size=0.01)

    sigma2 = max(0.0, -2 * float(g @ grad_s) / float(grad_s @ grad_s))
    assert (sigma2 > 0) == (name == "cnn") == result.active
    assert result.metrics["sigma2"] == pytest.approx(sigma2, rel=1e-6, abs=1e-12)
    assert result.metrics["sharpening"] == pytest.approx(-float(g @ grad_s), rel=1e-6)
    assert result.value == pytest.approx(0.5 * sigma2 * sharpness, rel=1e-6)
    torch.testing.assert_close(
        result.gradient, 0.5 * sigma2 * grad_s, rtol=1e-6, atol=1e-11
    )


@pytest.mark.parametrize("name", MODELS)
def test_central_flow_gradient_is_that_of_half_sigma2_sharpness(name):
    """With σ² held fixed, ∇(½σ²λ₁) by dense autograd and by finite differences."""
    case = make_case(name)
    sharpness, _, _ = central_flow_quantities(case)
    penalty = central_flow(0.99 * sharpness)  # above the threshold: σ² > 0
    result = penalty.evaluate(objective_for(case), step_size=0.01)
    half_sigma2 = 0.5 * result.metrics["sigma2"]
    assert half_sigma2 > 0
    assert_matches_dense(result, *sharpness_penalty(case, half_sigma2))

    def fixed_multiplier():
        return SharpnessPenalty(half_sigma2, tol=1e-10, max_iter=200, extra_vectors=0)

    assert_matches_finite_differences(case, fixed_multiplier)


@pytest.mark.parametrize("position", ["stays-below", "crosses", "at", "above"])
def test_central_flow_projection_lands_on_the_threshold(position):
    """After one GD step with the penalty, S is at 2/η★ up to second-order terms."""
    case = make_case("cnn")
    loss, theta0 = dense_loss_function(case)
    sharpness, g, grad_s = central_flow_quantities(case)
    eta = 1e-2
    rise = -eta * float(g @ grad_s)  # the plain step's first-order change of S
    assert rise > 0
    offset = {"stays-below": 1.5, "crosses": 0.5, "at": 0.0, "above": -0.5}[position]
    threshold = sharpness + offset * rise
    result = central_flow(threshold).evaluate(objective_for(case), step_size=eta)

    def sharpness_after(step):
        H = torch.autograd.functional.hessian(loss, theta0 - eta * step)
        return torch.linalg.eigvalsh(H)[-1].item()

    if position == "stays-below":
        assert not result.active
        assert result.metrics["sigma2"] == 0
        assert torch.equal(result.gradient, torch.zeros_like(g))
        return
    assert result.active
    landed = sharpness_after(g + result.gradient)
    plain = sharpness_after(g)
    assert abs(plain - threshold) > 0.4 * rise
    assert abs(landed - threshold) < 0.02 * rise


THIRD_ORDER = {
    "sharpness": lambda: SharpnessPenalty(
        0.7, tol=1e-10, max_iter=200, extra_vectors=0
    ),
    "trace": lambda: TracePenalty(0.7, num_samples=2, seed=3),
}


@pytest.mark.parametrize("layer", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("penalty", list(THIRD_ORDER))
def test_third_order_penalties_are_exact_with_plain_normalization(layer, penalty):
    # The penalty's gradient needs third derivatives, which PyTorch's fused
    # normalization gets wrong: the curvature core refuses them. With the layers
    # evaluated in plain operations (what PenaltyCallback does) the gradient
    # matches finite differences of the value.
    case = make_case(layer)
    plain = finite_difference_and_slope(
        case, THIRD_ORDER[penalty], normalization="plain"
    )
    assert plain[0] == pytest.approx(plain[1], rel=FINITE_DIFFERENCE_RTOL)
    with pytest.raises(ValueError, match="normalization='plain'"):
        THIRD_ORDER[penalty]().evaluate(objective_for(case))
