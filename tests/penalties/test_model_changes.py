"""Penalties on a constant curvature, and on a trainable set that changes."""

import math

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

from lightning_eos.callbacks import FlowMonitor, SharpnessMonitor, ThirdOrderMonitor
from lightning_eos.curvature import ProbeObjective
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    PenaltyCallback,
    SharpnessPenalty,
    TracePenalty,
)
from tests.callbacks.modules import Regressor, half_squared_error, regression_data
from tests.penalties.test_callback import fit, flat
from tests.penalties.test_second_order import OPTIMIZERS, SecondOrder


class LinearRegression(SecondOrder):
    """Outputs linear in the parameters: the squared error has a constant Hessian.

    PyTorch's ``mse_loss`` differentiates to a gradient with no graph left, unlike
    the same loss written with ``**``.
    """

    def __init__(self, make_optimizer):
        super().__init__(make_optimizer)
        torch.manual_seed(0)
        self.net = nn.Linear(6, 2).double()

    def training_step(self, batch, batch_idx):
        return mse_loss(self(batch[0]), batch[1])


def dense_top_eigenvalue(module):
    inputs, _ = regression_data().tensors
    x = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=inputs.dtype)], dim=1)
    # mean of (Wx + b − y)² over examples and the 2 outputs: the Hessian is
    # I₂ ⊗ E[x xᵀ] (x with a 1 appended).
    return float(torch.linalg.eigvalsh(x.T @ x / len(x))[-1])


SGD = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1)}


@pytest.mark.parametrize(
    "make_penalty",
    [lambda: SharpnessPenalty(0.01, tol=1e-10), lambda: TracePenalty(0.01, seed=1)],
    ids=["sharpness", "trace"],
)
@pytest.mark.parametrize("name", ["sgd", "newton-cg", "cubic", "hessian-free"])
def test_constant_curvature_term_has_its_value_and_no_gradient(
    tmp_path, name, make_penalty
):
    make_optimizer = {**SGD, **OPTIMIZERS}[name]
    penalized, plain = (
        LinearRegression(make_optimizer),
        LinearRegression(make_optimizer),
    )
    callback = PenaltyCallback(make_penalty(), loss_fn=mse_loss)

    fit(tmp_path, penalized, [callback], steps=3)
    fit(tmp_path, plain, [], steps=3)

    assert len(callback.history) == 3
    for record in callback.history:
        assert record.added and record.gradient_norm == 0.0
        if "lambda_1" in record.metrics:
            assert record.value == pytest.approx(
                0.01 * dense_top_eigenvalue(penalized), rel=1e-8
            )
    # A constant added to the objective changes no step.
    torch.testing.assert_close(flat(penalized), flat(plain), rtol=1e-12, atol=1e-14)


def test_term_of_a_constant_penalty_is_a_zero_gradient_function():
    module = LinearRegression(OPTIMIZERS["newton-cg"])
    objective = ProbeObjective(module, [regression_data().tensors], loss_fn=mse_loss)
    term = SharpnessPenalty(0.01, tol=1e-10).evaluate(objective).term
    params = list(module.parameters())

    value = term(params)
    gradients = torch.autograd.grad(value, params)

    assert float(value.detach()) == pytest.approx(
        0.01 * dense_top_eigenvalue(module), rel=1e-8
    )
    assert all(torch.count_nonzero(g) == 0 for g in gradients)


def test_term_refuses_tensors_it_cannot_take_with_a_clear_error():
    module = LinearRegression(OPTIMIZERS["newton-cg"])
    objective = ProbeObjective(
        module, [regression_data().tensors], loss_fn=half_squared_error
    )
    term = GradientNormPenalty(0.1).evaluate(objective).term
    params = list(module.parameters())
    detached = [p.detach() for p in params]

    with pytest.raises(ValueError, match=r"2 of the 2 tensors.*term\.value"):
        term(detached)
    with pytest.raises(ValueError, match=r"1 of the 2 tensors.*require grad"):
        term([params[0], detached[1]])
    with pytest.raises(
        ValueError, match=r"'net\.bias' of shape \(2,\), got shape \(3,\)"
    ):
        term([params[0], torch.zeros(3, dtype=torch.float64)])
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        term.value(detached)
    with torch.no_grad():
        value = term.value(detached)
    assert value == pytest.approx(float(term().detach()), rel=1e-12)


class UnfrozenLater(Regressor):
    """The last layer is frozen for the first epoch and trained from the second on."""

    def on_train_epoch_start(self):
        for parameter in self.net[-1].parameters():
            parameter.requires_grad_(self.current_epoch >= 1)


def dense_sharpness(module):
    inputs, targets = regression_data().tensors
    objective = ProbeObjective(module, [(inputs, targets)], loss_fn=half_squared_error)
    point = objective.point()

    def loss(theta):
        return sum(objective.chunk_losses(theta))

    return float(
        torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, point))[-1]
    )


@pytest.mark.parametrize(
    "make_penalty",
    [
        lambda: SharpnessPenalty(1e-3, tol=1e-10),
        lambda: CentralFlowPenalty(target_lr=0.01, tol=1e-10),
    ],
    ids=["sharpness", "central-flow"],
)
@pytest.mark.parametrize("name", ["sgd", "newton-cg"])
def test_unfreezing_a_layer_restarts_the_eigensolvers_cold(
    tmp_path, name, make_penalty
):
    module = UnfrozenLater()
    if name != "sgd":
        module.backward = SecondOrder.backward.__get__(module)
        module.configure_optimizers = lambda: OPTIMIZERS[name](module.parameters())
    monitor = SharpnessMonitor(every_n_steps=1, tol=1e-10, loss_fn=half_squared_error)
    penalty = PenaltyCallback(make_penalty(), loss_fn=half_squared_error)

    # One step per epoch (full batch): steps 0 and 1 see different trainable sets.
    fit(tmp_path, module, [monitor, penalty], steps=3)

    assert [record.step for record in penalty.history] == [0, 1, 2]
    assert all(math.isfinite(record.value) for record in penalty.history)
    # The monitor measures after each step: its last λ₁ is that of the final
    # parameters, all 8·6 + 8 + 8·2 + 2 of them.
    result = monitor.last_result
    assert result.eigenvectors.shape[-1] == 74
    assert float(result.eigenvalues[0]) == pytest.approx(
        dense_sharpness(module), rel=1e-8
    )


class FrozenBatchNorm(Regressor):
    """Fine-tuning with BatchNorm frozen: it normalizes with its running statistics."""

    def __init__(self):
        super().__init__(batch_norm=True)

    def on_train_epoch_start(self):
        self.net[1].eval()


def test_train_mode_warns_of_layers_the_module_trains_in_eval_mode(tmp_path):
    callback = PenaltyCallback(GradientNormPenalty(0.1), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match=r"mode='train'.*net\.1 in eval mode"):
        fit(tmp_path, FrozenBatchNorm(), [callback], steps=1)


@pytest.mark.parametrize("name", ["hessian-free", "newton-cg", "cubic"])
def test_second_order_optimizers_follow_a_change_of_the_trainable_set(tmp_path, name):
    module = UnfrozenLater()
    module.backward = SecondOrder.backward.__get__(module)
    module.configure_optimizers = lambda: OPTIMIZERS[name](module.parameters())
    before = flat(module)

    fit(tmp_path, module, [], steps=3)

    # The last layer moved only in the steps after it was unfrozen.
    moved = flat(module) - before
    assert torch.isfinite(moved).all() and moved[-18:].abs().max() > 0


def test_third_order_monitor_follows_a_change_of_the_trainable_set(tmp_path):
    module = UnfrozenLater()
    monitor = ThirdOrderMonitor(
        every_n_steps=1, threshold=0.1, loss_fn=half_squared_error
    )

    fit(tmp_path, module, [monitor], steps=3)

    assert [record.step for record in monitor.history] == [0, 1, 2, 3]
    assert all(math.isfinite(record.sharpness) for record in monitor.history)
    # The reference frame of (x, y) is in the space of the whole network now.
    assert monitor.reference is not None and monitor.reference.shape[-1] == 74


class FrozenActivation(Regressor):
    """An activation left in eval mode: its output does not depend on the mode."""

    def on_train_epoch_start(self):
        self.net[1].eval()


def test_train_mode_does_not_warn_of_layers_that_ignore_the_mode(tmp_path, recwarn):
    callback = PenaltyCallback(GradientNormPenalty(0.1), loss_fn=half_squared_error)
    fit(tmp_path, FrozenActivation(), [callback], steps=1)
    assert isinstance(FrozenActivation().net[1], nn.Tanh)
    assert not any("eval mode" in str(w.message) for w in recwarn)


class Cubic(SecondOrder):
    """Outputs z + ε z³ of a linear z: the sharpness has a gradient of order ε."""

    def __init__(self, epsilon):
        super().__init__(lambda p: torch.optim.SGD(p, lr=0.01))
        torch.manual_seed(1)
        self.net = nn.Linear(6, 2).double()
        self.epsilon = epsilon

    def forward(self, inputs):
        z = self.net(inputs)
        return z + self.epsilon * z**3


@pytest.mark.parametrize(
    ("epsilon", "warning"),
    [(0.0, "its gradient is zero"), (1e-6, "beyond the first-order rule")],
    ids=["flat", "nearly-flat"],
)
def test_central_flow_penalty_warns_when_it_cannot_hold_the_sharpness(
    tmp_path, epsilon, warning
):
    # λ₁ ≈ 1.1 here, far above 2/target_lr = 0.2.
    penalty = CentralFlowPenalty(target_lr=10.0, tol=1e-10)
    callback = PenaltyCallback(penalty, loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match=warning):
        fit(tmp_path, Cubic(epsilon), [callback], steps=1)
    record = callback.history[0]
    assert record.metrics["ratio"] > 5
    if epsilon == 0:
        assert record.metrics["sigma2"] == 0 and not record.added
    else:
        assert record.metrics["gradient_ratio"] > 10


class SwappedFrozen(Regressor):
    """Two hidden layers of 42 parameters: the first frozen in epoch 0, then the
    second instead, so that the count of trainable parameters stays the same."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2)
        ).double()

    def on_train_epoch_start(self):
        frozen = self.net[0] if self.current_epoch == 0 else self.net[2]
        for parameter in self.net.parameters():
            parameter.requires_grad_(True)
        for parameter in frozen.parameters():
            parameter.requires_grad_(False)


def test_third_order_frame_is_taken_anew_when_other_parameters_of_the_same_count_train(
    tmp_path,
):
    module = SwappedFrozen()
    monitor = ThirdOrderMonitor(
        every_n_steps=1, threshold=1e-3, loss_fn=half_squared_error
    )

    fit(tmp_path, module, [monitor], steps=3)

    # The swap takes effect for the step-2 measurement, which takes a new frame:
    # its own displacement is zero, and the next one's is not.
    assert monitor.reference_step == 2
    at = {record.step: record for record in monitor.history}
    assert (at[2].x, at[2].y) == (0.0, 0.0) and at[3].x != 0


def test_flow_monitor_warns_when_the_trainable_parameters_change(tmp_path):
    module = UnfrozenLater()
    monitor = FlowMonitor(flows=("gradient",), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="trainable parameters changed at step"):
        fit(tmp_path, module, [monitor], steps=3)


class RandomizedActivation(Regressor):
    """RReLU left in eval mode: its output does depend on the mode."""

    def __init__(self):
        super().__init__()
        self.net[1] = nn.RReLU()

    def on_train_epoch_start(self):
        self.net[1].eval()


@pytest.mark.parametrize("make", [FrozenBatchNorm, RandomizedActivation])
def test_flow_monitor_warns_of_layers_the_module_trains_in_eval_mode(tmp_path, make):
    monitor = FlowMonitor(flows=("gradient",), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match=r"FlowMonitor\(mode='train'\).*net\.1"):
        fit(tmp_path, make(), [monitor], steps=1)
