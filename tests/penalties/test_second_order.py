"""PenaltyCallback with the second-order optimizers: the penalty in their objective.

The reference is the same optimizer on a module whose ``training_step`` returns
L + P written by hand (float64; rtol 1e-9 leaves room for the different order of
the additions), or the dense Gauss-Newton step.
"""

import copy
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_eos.curvature import ProbeObjective
from lightning_eos.optim import (
    ClosureOptimizer,
    CubicNewton,
    GaussNewton,
    GroupedNewton,
    HessianFree,
    NewtonCG,
    backward_with_graph,
    closure_backward,
)
from lightning_eos.optim._base import Derivatives
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    Penalty,
    PenaltyCallback,
    PenaltyResult,
    SharpnessPenalty,
    TracePenalty,
)
from tests.callbacks.modules import (
    Regressor,
    half_squared_error,
    loader,
    regression_data,
    trainer,
)
from tests.penalties.dense import outputs_of_flat
from tests.penalties.test_callback import fit, flat

OPTIMIZERS = {
    "newton-cg": lambda p: NewtonCG(p, lr=1.0),
    "newton-cg-fd": lambda p: NewtonCG(p, lr=1.0, hessian_products="finite_difference"),
    "hessian-free": lambda p: HessianFree(p, lr=1.0),
    "cubic": lambda p: CubicNewton(p),
    "grouped-newton": lambda p: GroupedNewton(p),
}


class SecondOrder(Regressor):
    backward = backward_with_graph

    def __init__(self, make_optimizer, **kwargs):
        super().__init__(**kwargs)
        self.make_optimizer = make_optimizer

    def configure_optimizers(self):
        return self.make_optimizer(self.parameters())


class HandPenalized(SecondOrder):
    """L + (c/4)‖∇L‖² written into training_step, the reference."""

    def __init__(self, make_optimizer, coefficient):
        super().__init__(make_optimizer)
        self.coefficient = coefficient

    def training_step(self, batch, batch_idx):
        loss = half_squared_error(self(batch[0]), batch[1])
        params = [p for p in self.parameters() if p.requires_grad]
        gradients = torch.autograd.grad(loss, params, create_graph=True)
        return loss + self.coefficient / 4 * sum(g.square().sum() for g in gradients)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_gradient_norm_penalty_is_in_the_objective_of_the_optimizer(tmp_path, name):
    torch.manual_seed(0)
    module = SecondOrder(OPTIMIZERS[name])
    reference = HandPenalized(OPTIMIZERS[name], 0.3)
    reference.load_state_dict(module.state_dict())
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=3)
    fit(tmp_path, reference, [], steps=3)

    torch.testing.assert_close(flat(module), flat(reference), rtol=1e-9, atol=1e-12)
    ours = module.trainer.optimizers[0].last_stats
    theirs = reference.trainer.optimizers[0].last_stats
    # The optimizer's loss is L + P: its line search and acceptance tests use it.
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-9)
    assert [r.step for r in callback.history] == [0, 1, 2]
    assert callback.num_evaluations == 3  # once per step, whatever the closure calls
    assert all(r.added and r.value > 0 for r in callback.history)


def test_probe_data_penalizes_the_probe_set(tmp_path):
    torch.manual_seed(0)
    module = SecondOrder(OPTIMIZERS["newton-cg"])
    reference = HandPenalized(OPTIMIZERS["newton-cg"], 0.3)
    reference.load_state_dict(module.state_dict())
    callback = PenaltyCallback(
        GradientNormPenalty(0.3),
        data="probe",
        probe_size=64,
        loss_fn=half_squared_error,
    )
    fit(tmp_path, module, [callback], steps=2)
    fit(tmp_path, reference, [], steps=2)
    torch.testing.assert_close(flat(module), flat(reference), rtol=1e-9, atol=1e-12)


class FixedCurvaturePenalized(SecondOrder):
    """L + μ·uᵀ∇²L(θ)u with u fixed, written into training_step."""

    def __init__(self, make_optimizer, mu, u):
        super().__init__(make_optimizer)
        self.mu, self.u = mu, u

    def training_step(self, batch, batch_idx):
        loss = half_squared_error(self(batch[0]), batch[1])
        params = [p for p in self.parameters() if p.requires_grad]
        gradient = torch.cat(
            [
                g.reshape(-1)
                for g in torch.autograd.grad(loss, params, create_graph=True)
            ]
        )
        product = torch.autograd.grad(gradient @ self.u, params, create_graph=True)
        curvature = torch.cat([h.reshape(-1) for h in product]) @ self.u
        return loss + self.mu * curvature


@pytest.mark.parametrize("name", ["newton-cg", "cubic"])
def test_sharpness_penalty_is_the_rayleigh_quotient_of_the_step(tmp_path, name):
    torch.manual_seed(0)
    module = SecondOrder(OPTIMIZERS[name])
    inputs, targets = regression_data().tensors
    outputs = outputs_of_flat(module, inputs)

    def loss(theta):
        return half_squared_error(outputs(theta), targets)

    hessian = torch.autograd.functional.hessian(loss, flat(module))
    u = torch.linalg.eigh(hessian).eigenvectors[:, -1]
    reference = FixedCurvaturePenalized(OPTIMIZERS[name], 0.05, u)
    reference.load_state_dict(module.state_dict())

    callback = PenaltyCallback(
        SharpnessPenalty(0.05, tol=1e-10), loss_fn=half_squared_error
    )
    fit(tmp_path, module, [callback], steps=1)
    fit(tmp_path, reference, [], steps=1)
    # The eigenvector is Lanczos's to a residual of 1e-10 relative.
    torch.testing.assert_close(flat(module), flat(reference), rtol=1e-7, atol=1e-9)
    assert callback.history[0].metrics["lambda_1"] == pytest.approx(
        float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-9
    )


def dense_jacobian(module, inputs):
    outputs = outputs_of_flat(module, inputs)
    return torch.autograd.functional.jacobian(
        lambda theta: outputs(theta).reshape(-1), flat(module)
    )


def test_gauss_newton_step_is_the_damped_step_on_the_penalized_gradient(tmp_path):
    torch.manual_seed(0)
    damping = 0.05
    module = SecondOrder(
        lambda p: GaussNewton(p, lr=0.5, damping=damping, cg_tol=1e-13, max_cg_iter=500)
    )
    start = copy.deepcopy(module)
    inputs, targets = regression_data().tensors
    objective = ProbeObjective(start, [(inputs, targets)], loss_fn=half_squared_error)
    penalty = GradientNormPenalty(0.3).evaluate(objective)
    jacobian = dense_jacobian(start, inputs)
    residual = (start(inputs) - targets).detach().reshape(-1) / len(inputs)
    c = 1 / len(inputs)  # ∇²_f ℓ = I/N for ½‖f − y‖² averaged over N examples
    matrix = c * jacobian.T @ jacobian + damping * torch.eye(jacobian.shape[1]).double()
    step = -0.5 * torch.linalg.solve(matrix, jacobian.T @ residual + penalty.gradient)

    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="left out of the Gauss-Newton matrix"):
        fit(tmp_path, module, [callback], steps=1)
    torch.testing.assert_close(flat(module), flat(start) + step, rtol=1e-8, atol=1e-11)


def test_gauss_newton_curvature_of_hessian_free_takes_the_penalized_gradient(tmp_path):
    torch.manual_seed(0)
    module = SecondOrder(lambda p: HessianFree(p, curvature="gauss_newton"))
    start = copy.deepcopy(module)
    inputs, targets = regression_data().tensors
    objective = ProbeObjective(start, [(inputs, targets)], loss_fn=half_squared_error)
    penalty = GradientNormPenalty(0.3).evaluate(objective)
    start.zero_grad()
    half_squared_error(start(inputs), targets).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in start.parameters()])

    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=1)
    stats = module.trainer.optimizers[0].last_stats
    assert stats["grad_norm"] == pytest.approx(
        float((gradient + penalty.gradient).norm()), rel=1e-10
    )
    assert stats["loss"] == pytest.approx(module.losses[0] + penalty.value, rel=1e-12)
    assert stats["new_loss"] < stats["loss"]


ZERO = {
    "gradient-norm": lambda: GradientNormPenalty(0.0),
    "sharpness": lambda: SharpnessPenalty(0.0),
    "trace": lambda: TracePenalty(0.0),
    "central-flow": lambda: CentralFlowPenalty(target_lr=1e-6),  # never reached
}


@pytest.mark.parametrize("name", list(ZERO))
@pytest.mark.parametrize("optimizer", ["hessian-free", "cubic"])
def test_zero_coefficient_gives_a_bit_identical_run(tmp_path, name, optimizer):
    runs = []
    for callbacks in ([], [PenaltyCallback(ZERO[name](), loss_fn=half_squared_error)]):
        torch.manual_seed(0)
        module = SecondOrder(OPTIMIZERS[optimizer], dropout=0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = fit(tmp_path, module, callbacks, steps=3)
        state = copy.deepcopy(run.optimizers[0].state_dict())
        runs.append((module, state, torch.get_rng_state()))
    (plain, plain_state, plain_rng), (penalized, state, rng) = runs
    assert plain.losses == penalized.losses
    assert torch.equal(flat(plain), flat(penalized))
    assert torch.equal(plain_rng, rng)
    for index, entry in plain_state["state"].items():
        for key, value in entry.items():
            other = state["state"][index][key]
            assert (
                torch.equal(value, other) if torch.is_tensor(value) else value == other
            )


def test_gauss_newton_without_damping_is_refused_before_the_first_step(tmp_path):
    module = SecondOrder(lambda p: GaussNewton(p, damping=0.0))
    start = flat(module)
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    with pytest.raises(MisconfigurationException, match=r"damping=0.*damping > 0"):
        fit(tmp_path, module, [callback], steps=1)
    assert torch.equal(flat(module), start)


class GradientOnly(Penalty):
    """A user's penalty that knows its gradient but not its term."""

    def evaluate(self, objective, step_size=None):
        return PenaltyResult(0.0, torch.zeros(objective.dim).double(), active=False)


def test_penalty_without_a_term_is_refused_before_the_first_step(tmp_path):
    module = SecondOrder(OPTIMIZERS["newton-cg"])
    start = flat(module)
    callback = PenaltyCallback(GradientOnly(), loss_fn=half_squared_error)
    with pytest.raises(MisconfigurationException, match="GradientOnly returns no"):
        fit(tmp_path, module, [callback], steps=1)
    assert torch.equal(flat(module), start)


def test_resume_continues_as_uninterrupted(tmp_path):
    def callbacks():
        return [PenaltyCallback(SharpnessPenalty(0.05), loss_fn=half_squared_error)]

    torch.manual_seed(0)
    straight = SecondOrder(OPTIMIZERS["hessian-free"])
    interrupted = copy.deepcopy(straight)
    straight_callbacks = callbacks()
    fit(tmp_path, straight, straight_callbacks, steps=4)

    first = fit(tmp_path, interrupted, callbacks(), steps=2)
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    resumed, resumed_callbacks = SecondOrder(OPTIMIZERS["hessian-free"]), callbacks()
    run = trainer(tmp_path, resumed_callbacks, 4)
    run.fit(resumed, loader(regression_data()), ckpt_path=path)

    assert torch.equal(flat(resumed), flat(straight))
    values = [r.value for r in resumed_callbacks[0].history]
    assert values == [r.value for r in straight_callbacks[0].history[2:]]


def test_term_is_a_loss_wrapper_for_a_plain_training_loop():
    """The loop of docs/penalties.md equals the closure on L + P written by hand."""
    torch.manual_seed(0)
    model = Regressor().net
    reference = copy.deepcopy(model)
    inputs, targets = regression_data().tensors
    penalty = GradientNormPenalty(0.3)
    optimizer = NewtonCG(model.parameters(), lr=1.0)
    for _ in range(3):
        objective = ProbeObjective(
            model, [(inputs, targets)], loss_fn=half_squared_error
        )
        term = penalty.evaluate(objective).term

        def closure(term=term):
            optimizer.zero_grad()
            loss = half_squared_error(model(inputs), targets) + term()
            closure_backward(loss)
            return loss

        optimizer.step(closure)

    hand = NewtonCG(reference.parameters(), lr=1.0)

    def hand_closure():
        hand.zero_grad()
        loss = half_squared_error(reference(inputs), targets)
        gradients = torch.autograd.grad(loss, reference.parameters(), create_graph=True)
        loss = loss + 0.3 / 4 * sum(g.square().sum() for g in gradients)
        closure_backward(loss)
        return loss

    for _ in range(3):
        hand.step(hand_closure)
    ours = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    theirs = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-13)
    assert optimizer.last_stats["loss"] == pytest.approx(hand.last_stats["loss"])


def test_settings_the_optimizer_cannot_serve_are_refused_when_fitting_starts(tmp_path):
    module = SecondOrder(OPTIMIZERS["newton-cg"])
    start = flat(module)
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    with pytest.raises(MisconfigurationException, match="gradient accumulation"):
        fit(tmp_path, module, [callback], steps=1, accumulate_grad_batches=2)
    # Accumulation that a scheduler switches on later is known when fitting starts.
    schedule = GradientAccumulationScheduler({1: 2})
    with pytest.raises(MisconfigurationException, match="switches on during the run"):
        fit(tmp_path, module, [callback, schedule], steps=4, batch_size=16)
    assert torch.equal(flat(module), start)
    assert callback.num_evaluations == 0


class Probe(ClosureOptimizer):
    """Records what a second-order optimizer sees of its objective; takes no step."""

    second_order = True

    def __init__(self, params, vector, products="exact"):
        super().__init__(params, {"lr": 0.1})
        self.vector, self.products = vector, products
        self.seen = {}

    @torch.no_grad()
    def step(self, closure=None):
        derivatives = Derivatives(self, self._begin(closure), self.products, 1e-6)
        trial = derivatives.point + 0.1 * self.vector
        self.seen = {
            "loss": float(derivatives.loss),
            "gradient": derivatives.gradient.clone(),
            "added": derivatives.added_gradient,
            "product": derivatives.hvp(self.vector),
            "trial": derivatives.loss_at(trial),
        }
        derivatives.release()
        return derivatives.loss


def dense_objective(module, mu_u=None):
    """L and P (gradient norm c = 0.3, or μuᵀHu with u fixed) as dense functions."""
    inputs, targets = regression_data().tensors
    outputs = outputs_of_flat(module, inputs)

    def loss(theta):
        return half_squared_error(outputs(theta), targets)

    def penalty(theta):
        if not theta.requires_grad:
            theta = theta.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
        if mu_u is None:
            return 0.3 / 4 * gradient.square().sum()
        mu, u = mu_u
        (product,) = torch.autograd.grad(gradient @ u, theta, create_graph=True)
        return mu * product @ u

    return loss, penalty


@pytest.mark.parametrize("chunk_size", [None, 24], ids=["one-chunk", "chunks"])
@pytest.mark.parametrize("products", ["exact", "finite_difference"])
@pytest.mark.parametrize("term_curvature", [True, False], ids=["exact", "left-out"])
@pytest.mark.parametrize("name", ["gradient-norm", "sharpness"])
def test_optimizer_sees_the_loss_gradient_and_curvature_of_the_term(
    tmp_path, name, term_curvature, products, chunk_size
):
    torch.manual_seed(0)
    module = SecondOrder(lambda p: p)
    theta = flat(module)
    vector = torch.randn(theta.shape, dtype=theta.dtype)
    module.make_optimizer = lambda params: Probe(params, vector, products)
    loss, _ = dense_objective(module)
    u = torch.linalg.eigh(torch.autograd.functional.hessian(loss, theta))[1][:, -1]
    mu_u = None if name == "gradient-norm" else (0.05, u)
    loss, penalty = dense_objective(module, mu_u)
    made = (
        GradientNormPenalty(0.3) if mu_u is None else SharpnessPenalty(0.05, tol=1e-12)
    )

    callback = PenaltyCallback(
        made,
        loss_fn=half_squared_error,
        term_curvature=term_curvature,
        chunk_size=chunk_size,  # 64 examples: three chunks of at most 24
    )
    fit(tmp_path, module, [callback], steps=1)
    seen = module.trainer.optimizers[0].seen

    def gradient(function, point):
        point = point.clone().requires_grad_(True)
        return torch.autograd.grad(function(point), point)[0]

    def product(function):
        return torch.autograd.functional.hvp(function, theta, vector)[1]

    expected_product = product(loss) + (product(penalty) if term_curvature else 0)
    expected_loss = float((loss(theta) + penalty(theta)).detach())
    assert seen["loss"] == pytest.approx(expected_loss, rel=1e-10)
    torch.testing.assert_close(
        seen["added"], gradient(penalty, theta), rtol=1e-8, atol=1e-12
    )
    torch.testing.assert_close(
        seen["gradient"],
        gradient(loss, theta) + gradient(penalty, theta),
        rtol=1e-9,
        atol=1e-12,
    )
    # Finite differences with a relative step of 1e-6: error O(h) ≈ 1e-6 of the norm.
    tolerance = 1e-9 if products == "exact" else 1e-5
    error = (seen["product"] - expected_product).norm() / expected_product.norm()
    assert error < tolerance
    assert product(penalty).norm() > 100 * tolerance * expected_product.norm()
    trial = theta + 0.1 * vector
    expected_trial = float(loss(trial)) + float(penalty(trial).detach())
    assert seen["trial"] == pytest.approx(expected_trial, rel=1e-10)


class TermlessGradientNorm(GradientNormPenalty):
    """A user's penalty that claims a term and forgets to return it."""

    name = "termless"

    def evaluate(self, objective, step_size=None):
        result = super().evaluate(objective, step_size)
        result.term = None
        return result


def test_active_penalty_without_its_term_fails_before_any_parameter_changes(tmp_path):
    module = SecondOrder(OPTIMIZERS["newton-cg"])
    start = flat(module)
    callback = PenaltyCallback(TermlessGradientNorm(0.3), loss_fn=half_squared_error)
    with pytest.raises(
        TypeError, match=r"needs PenaltyResult\.term to be a PenaltyTerm"
    ):
        fit(tmp_path, module, [callback], steps=1)
    assert torch.equal(flat(module), start)


@pytest.mark.parametrize("name", ["sgd", "newton-cg"])
def test_a_callback_reused_for_a_second_fit_penalizes_the_new_batch(tmp_path, name):
    torch.manual_seed(0)
    module = (
        Regressor(lr=0.05) if name == "sgd" else SecondOrder(OPTIMIZERS["newton-cg"])
    )
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=1)
    other = regression_data(seed=1)
    expected = GradientNormPenalty(0.3).evaluate(
        ProbeObjective(module, [other.tensors], loss_fn=half_squared_error)
    )
    run = trainer(tmp_path, [callback], 1)
    run.fit(module, loader(other))
    assert [r.step for r in callback.history] == [0, 0]
    assert callback.history[-1].value == pytest.approx(expected.value, rel=1e-12)


def test_gauss_newton_warns_of_the_step_the_penalty_gets_without_curvature(tmp_path):
    module = SecondOrder(lambda p: GaussNewton(p, lr=0.5, damping=1e-3))
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match=r"lr/damping = 500.*line search"):
        fit(tmp_path, module, [callback], steps=1)


def test_gauss_newton_in_a_plain_loop_names_the_way_to_attach_a_term():
    torch.manual_seed(0)
    model = Regressor().net
    inputs, targets = regression_data().tensors
    optimizer = GaussNewton(model.parameters(), damping=0.1).attach(model)
    objective = ProbeObjective(model, [(inputs, targets)], loss_fn=half_squared_error)
    term = GradientNormPenalty(0.3).evaluate(objective).term

    def closure():
        optimizer.zero_grad()
        loss = half_squared_error(model(inputs), targets) + term()
        closure_backward(loss)
        return loss

    with pytest.raises(RuntimeError, match=r"attach it with .*PenaltyCallback"):
        optimizer.step(closure)


def test_eval_mode_term_is_the_same_function_at_every_closure_call(tmp_path):
    """BatchNorm running statistics move in each training forward of the step."""
    runs = {}
    for products in ("exact", "finite_difference"):
        torch.manual_seed(0)
        module = SecondOrder(
            lambda p, products=products: NewtonCG(
                p, lr=1.0, hessian_products=products, fd_step=1e-6
            ),
            batch_norm=True,
        )
        callback = PenaltyCallback(
            GradientNormPenalty(0.3), loss_fn=half_squared_error, mode="eval"
        )
        fit(tmp_path, module, [callback], steps=3)
        runs[products] = flat(module)
    # Finite-difference products are off by O(h): 1e-6 relative steps.
    torch.testing.assert_close(
        runs["finite_difference"], runs["exact"], rtol=1e-4, atol=1e-6
    )


class WrongSizeGradient(Penalty):
    has_term = True

    def evaluate(self, objective, step_size=None):
        gradient = torch.zeros(objective.dim + 1, dtype=torch.float64)
        return PenaltyResult(1.0, gradient, active=True)


@pytest.mark.parametrize("name", ["sgd", "newton-cg"])
def test_a_gradient_of_the_wrong_size_is_refused_at_the_first_step(tmp_path, name):
    module = (
        Regressor(lr=0.05) if name == "sgd" else SecondOrder(OPTIMIZERS["newton-cg"])
    )
    start = flat(module)
    callback = PenaltyCallback(WrongSizeGradient(), loss_fn=half_squared_error)
    with pytest.raises(ValueError, match=r"gradient of shape \(75,\).*74 trainable"):
        fit(tmp_path, module, [callback], steps=1)
    assert torch.equal(flat(module), start)


@pytest.mark.parametrize("name", ["newton-cg", "cubic"])
def test_a_coefficient_read_from_a_newton_step_length_is_refused(tmp_path, name):
    module = SecondOrder(OPTIMIZERS[name])
    start = flat(module)
    callback = PenaltyCallback(GradientNormPenalty(), loss_fn=half_squared_error)
    with pytest.raises(MisconfigurationException, match=r"coefficient='lr'.*number"):
        fit(tmp_path, module, [callback], steps=1)
    assert torch.equal(flat(module), start)
