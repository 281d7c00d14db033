"""PenaltyTerm, the penalties as functions of θ, against dense float64 references.

Tolerances: values and gradients are the same formulas evaluated two ways (rtol
1e-9); Hessians are compared with ``torch.autograd.functional.hessian`` of the
explicit penalty (rtol 1e-7), and with central differences of exact gradients,
step 1e-5 (error O(h²) ≈ 1e-10 relative, so rtol 1e-6).
"""

import pytest
import torch
from torch import nn

from lightning_eos.curvature import ProbeObjective
from lightning_eos.penalties import (
    CentralFlowPenalty,
    CurvatureTerm,
    GradientNormPenalty,
    GradientNormTerm,
    MinibatchGradientNormPenalty,
    SharpnessPenalty,
    TracePenalty,
)
from tests.penalties.dense import flat_params, outputs_of_flat, term_of_flat


def half_squared_error(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1).mean()


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(24, 3, generator=generator, dtype=torch.float64)
    targets = torch.randn(24, 2, generator=generator, dtype=torch.float64)
    return model, inputs, targets


def objective_for(model, inputs, targets, chunk=12):
    chunks = [
        (inputs[i : i + chunk], targets[i : i + chunk]) for i in range(0, 24, chunk)
    ]
    return ProbeObjective(model, chunks, loss_fn=half_squared_error)


def dense_loss(model, inputs, targets):
    """θ ↦ L(θ) on a flat vector, written without the package."""
    outputs = outputs_of_flat(model, inputs)
    return lambda theta: half_squared_error(outputs(theta), targets)


def assert_term_hessian(term, model, explicit):
    """The term's Hessian is that of ``explicit``, a dense function of flat θ."""
    theta = flat_params(model)
    expected = torch.autograd.functional.hessian(explicit, theta)
    got = torch.autograd.functional.hessian(term_of_flat(term, model), theta)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)


PENALTIES = {
    "gradient-norm": lambda: GradientNormPenalty(0.3),
    "minibatch": lambda: MinibatchGradientNormPenalty(7, coefficient=0.3),
    # Minibatches larger than a chunk are evaluated in chunks.
    "large-minibatch": lambda: MinibatchGradientNormPenalty(48, coefficient=0.3),
    "sharpness": lambda: SharpnessPenalty(0.1, tol=1e-12),
    "trace": lambda: TracePenalty(0.1, num_samples=3, seed=2),
    "central-flow": lambda: CentralFlowPenalty(target_lr=5.0, tol=1e-12),
}


@pytest.mark.parametrize("make", PENALTIES.values(), ids=PENALTIES.keys())
def test_term_has_the_value_and_gradient_of_the_evaluation(make):
    model, inputs, targets = model_and_data()
    result = make().evaluate(objective_for(model, inputs, targets), step_size=0.1)
    assert result.active and result.term is not None

    params = list(model.parameters())
    value = result.term(params)
    gradient = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])

    assert float(value.detach()) == pytest.approx(result.value, rel=1e-9)
    torch.testing.assert_close(gradient, result.gradient, rtol=1e-9, atol=1e-13)


def test_term_defaults_to_the_module_parameters_and_leaves_them_alone():
    model, inputs, targets = model_and_data()
    before = flat_params(model)
    result = GradientNormPenalty(0.3).evaluate(objective_for(model, inputs, targets))
    assert torch.equal(
        result.term().detach(), result.term(list(model.parameters())).detach()
    )
    assert torch.equal(flat_params(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_inactive_penalty_has_no_term():
    model, inputs, targets = model_and_data()
    result = SharpnessPenalty(0.0).evaluate(objective_for(model, inputs, targets))
    assert not result.active and result.term is None


def test_gradient_norm_term_hessian_is_that_of_the_explicit_penalty():
    model, inputs, targets = model_and_data()
    result = GradientNormPenalty(0.3).evaluate(objective_for(model, inputs, targets))
    assert isinstance(result.term, GradientNormTerm)
    loss = dense_loss(model, inputs, targets)

    def explicit(theta):
        (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        return 0.3 / 4 * gradient.square().sum()

    assert_term_hessian(result.term, model, explicit)


def test_minibatch_term_hessian_is_that_of_the_minibatch_mean():
    model, inputs, targets = model_and_data()
    penalty = MinibatchGradientNormPenalty(10, coefficient=0.3)
    result = penalty.evaluate(objective_for(model, inputs, targets))
    slices = [(0, 10), (10, 20), (20, 24)]

    def explicit(theta):
        total = 0.0
        for start, stop in slices:
            loss = dense_loss(model, inputs[start:stop], targets[start:stop])
            (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
            total = total + gradient.square().sum()
        return 0.3 / (4 * len(slices)) * total

    assert_term_hessian(result.term, model, explicit)


def test_trace_term_is_the_estimate_for_its_vectors_with_its_exact_hessian():
    model, inputs, targets = model_and_data()
    penalty = TracePenalty(0.1, num_samples=2, seed=4)
    result = penalty.evaluate(objective_for(model, inputs, targets))
    assert isinstance(result.term, CurvatureTerm)
    vectors = penalty.last_vectors
    loss = dense_loss(model, inputs, targets)

    def explicit(theta):
        hessian = torch.autograd.functional.hessian(loss, theta, create_graph=True)
        return 0.1 * torch.einsum("si,ij,sj->s", vectors, hessian, vectors).mean()

    assert_term_hessian(result.term, model, explicit)


def test_sharpness_term_hessian_misses_exactly_the_eigenvector_rotation():
    """∇²λ₁ = ∇²(u₁ᵀHu₁)|u₁ fixed + 2Σⱼ T[u₁,uⱼ]T[u₁,uⱼ]ᵀ/(λ₁ − λⱼ), the second PSD."""
    model, inputs, targets = model_and_data()
    mu = 0.1
    result = SharpnessPenalty(mu, tol=1e-12).evaluate(
        objective_for(model, inputs, targets)
    )
    loss = dense_loss(model, inputs, targets)
    theta = flat_params(model)

    def hessian(point):
        return torch.autograd.functional.hessian(loss, point, create_graph=True)

    def sharpness_gradient(point):
        point = point.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(
            torch.linalg.eigvalsh(hessian(point))[-1], point
        )
        return gradient

    # The Hessian of μλ₁ by central differences of its exact gradient.
    h, dim = 1e-5, theta.numel()
    columns = [
        (sharpness_gradient(theta + h * e) - sharpness_gradient(theta - h * e))
        / (2 * h)
        for e in torch.eye(dim, dtype=theta.dtype)
    ]
    full = mu * torch.stack(columns, dim=1)
    full = (full + full.T) / 2

    eigenvalues, eigenvectors = torch.linalg.eigh(hessian(theta).detach())
    third = torch.autograd.functional.jacobian(
        lambda p: hessian(p), theta
    )  # T[i, j, k]
    top = eigenvectors[:, -1]
    rotation = torch.zeros(dim, dim, dtype=theta.dtype)
    for j in range(dim - 1):
        mixed = torch.einsum("ijk,i,j->k", third, top, eigenvectors[:, j])
        rotation += 2 * torch.outer(mixed, mixed) / (eigenvalues[-1] - eigenvalues[j])

    term = torch.autograd.functional.hessian(term_of_flat(result.term, model), theta)
    torch.testing.assert_close(term + mu * rotation, full, rtol=1e-6, atol=1e-8)
    assert torch.linalg.eigvalsh(full - term).min() > -1e-8  # the term's is smaller


def test_curvature_term_needs_one_weight_per_vector():
    model, inputs, targets = model_and_data()
    objective = objective_for(model, inputs, targets)
    with pytest.raises(ValueError, match="one weight per vector"):
        CurvatureTerm(objective, torch.zeros(2, objective.dim), [1.0])


def test_term_needs_the_parameters_of_the_objective():
    model, inputs, targets = model_and_data()
    result = GradientNormPenalty(0.3).evaluate(objective_for(model, inputs, targets))
    with pytest.raises(ValueError, match="needs the 4 trainable parameter tensors"):
        result.term(list(model.parameters())[:2])


@pytest.mark.parametrize("layer", ["batch_norm", "layer_norm"])
def test_gradient_norm_term_is_exact_through_normalization_layers(layer):
    """Its Hessian takes third derivatives of L, wrong in the fused kernels."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(4) if layer == "batch_norm" else nn.LayerNorm(4)
    model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 2)).double()
    _, inputs, targets = model_and_data()
    objective = ProbeObjective(model, [(inputs, targets)], loss_fn=half_squared_error)
    result = GradientNormPenalty(0.3).evaluate(objective)
    value = term_of_flat(result.term, model)

    def gradient(theta):
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(value(theta), theta)[0]

    theta = flat_params(model)
    h = 1e-5
    columns = [
        (gradient(theta + h * e) - gradient(theta - h * e)) / (2 * h)
        for e in torch.eye(theta.numel(), dtype=theta.dtype)
    ]
    expected = torch.stack(columns, dim=1)
    got = torch.autograd.functional.hessian(value, theta)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


def test_term_holds_the_buffers_it_was_made_with():
    """Running statistics moved after the evaluation do not move the term."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)
    ).double()
    _, inputs, targets = model_and_data()
    model.train()
    model(inputs)  # running statistics away from their initial values
    objective = ProbeObjective(
        model, [(inputs, targets)], loss_fn=half_squared_error, train_mode=False
    )
    result = GradientNormPenalty(0.3).evaluate(objective)
    model(inputs * 3 + 1)  # a training forward pass moves them again
    value = float(result.term().detach())
    assert value == pytest.approx(result.value, rel=1e-12)
    moved = GradientNormPenalty(0.3).evaluate(objective).value
    assert abs(moved - result.value) > 1e-6 * result.value  # the statistics matter


@pytest.mark.parametrize("make", PENALTIES.values(), ids=PENALTIES.keys())
def test_chunked_value_and_gradient_equal_the_term_and_its_gradient(make):
    model, inputs, targets = model_and_data()
    objective = objective_for(model, inputs, targets, chunk=6)
    term = make().evaluate(objective, step_size=0.1).term
    # At a point away from the evaluation too: the same function everywhere.
    for shift in (0.0, 0.05):
        params = [
            (p.detach() + shift * torch.ones_like(p)).requires_grad_(True)
            for p in model.parameters()
        ]
        value = term(params)
        expected = torch.autograd.grad(value, params)

        chunked, gradient = term.value_and_gradient(params)

        assert chunked == pytest.approx(float(value.detach()), rel=1e-12, abs=1e-15)
        assert term.value(params) == pytest.approx(chunked, rel=1e-12, abs=1e-15)
        for got, want in zip(gradient, expected, strict=True):
            assert got.shape == want.shape and got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
        assert all(p.grad is None for p in params)


def _peak_saved_elements(function):
    """The most tensor elements autograd held for backward at once during a call."""
    live, peak = [0], [0]

    class Saved:
        def __init__(self, tensor):
            self.tensor = tensor
            live[0] += tensor.numel()
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.tensor.numel()

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.tensor):
        function()
    return peak[0]


@pytest.mark.parametrize("make", PENALTIES.values(), ids=PENALTIES.keys())
def test_chunked_evaluation_holds_the_graph_of_one_chunk_only(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2)).double()
    inputs = torch.randn(96, 3, dtype=torch.float64)
    targets = torch.randn(96, 2, dtype=torch.float64)

    chunks = [(inputs[i : i + 12], targets[i : i + 12]) for i in range(0, 96, 12)]
    objective = ProbeObjective(model, chunks, loss_fn=half_squared_error)
    term = make().evaluate(objective, step_size=0.1).term
    params = list(model.parameters())

    whole = _peak_saved_elements(lambda: torch.autograd.grad(term(params), params))
    chunked = _peak_saved_elements(lambda: term.value_and_gradient(params))

    # Saved activations scale with the examples in a graph: one chunk of eight
    # (or one minibatch of 7) holds at most an eighth of all of them.
    assert chunked < 0.3 * whole, (chunked, whole)
