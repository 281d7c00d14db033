"""PenaltyCallback in Lightning runs: what it adds, and what it leaves alone."""

import copy
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch.nn.utils import parameters_to_vector

from lightning_eos.curvature import ProbeObjective
from lightning_eos.optim import (
    GSAM,
    SAM,
)
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    MinibatchGradientNormPenalty,
    PenaltyCallback,
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

PENALTIES = {
    "gradient-norm": lambda: GradientNormPenalty(0.05),
    "gradient-norm-lr": lambda: GradientNormPenalty("lr"),
    "minibatch": lambda: MinibatchGradientNormPenalty(16, coefficient=0.05),
    "sharpness": lambda: SharpnessPenalty(0.01, tol=1e-10),
    "trace": lambda: TracePenalty(0.01, num_samples=2, seed=3),
    # Threshold 2/1.5 ≈ 1.33, below the regressor's initial sharpness 1.63: active.
    "central-flow": lambda: CentralFlowPenalty(target_lr=1.5, rate=0.5, tol=1e-10),
}
ZERO = {
    "gradient-norm": lambda: GradientNormPenalty(0.0),
    "minibatch": lambda: MinibatchGradientNormPenalty(16, coefficient=0.0),
    "sharpness": lambda: SharpnessPenalty(0.0),
    "trace": lambda: TracePenalty(0.0),
    # Threshold 2/1e-6, never reached: σ² = 0 at every step.
    "central-flow": lambda: CentralFlowPenalty(target_lr=1e-6),
}


def fit(tmp_path, module, callbacks, steps, batch_size=None, **kwargs):
    run = trainer(tmp_path, callbacks, steps, **kwargs)
    run.fit(module, loader(regression_data(), batch_size))
    return run


def flat(module):
    return parameters_to_vector(module.parameters()).detach().clone()


def full_objective(module, batch=None):
    data = regression_data()
    batch = batch if batch is not None else data.tensors
    return ProbeObjective(module, [batch], loss_fn=half_squared_error)


def plain_gradient(module, batch):
    module.zero_grad()
    half_squared_error(module(batch[0]), batch[1]).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    module.zero_grad()
    return gradient


@pytest.mark.parametrize("name", list(PENALTIES))
def test_step_is_the_plain_step_plus_the_penalty_gradient(tmp_path, name):
    torch.manual_seed(0)
    module = Regressor(lr=0.05)
    start = copy.deepcopy(module)
    callback = PenaltyCallback(PENALTIES[name](), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=1)

    batch = regression_data().tensors
    expected = PENALTIES[name]().evaluate(full_objective(start), step_size=0.05)
    assert expected.active and expected.gradient.norm() > 0
    step = plain_gradient(start, batch) + expected.gradient
    torch.testing.assert_close(
        flat(module), flat(start) - 0.05 * step, rtol=1e-12, atol=1e-14
    )
    (record,) = callback.history
    assert record.step == 0 and record.added
    assert record.value == pytest.approx(expected.value, rel=1e-10)
    assert record.gradient_norm == pytest.approx(expected.gradient_norm, rel=1e-10)


@pytest.mark.parametrize("data", ["batch", "probe"])
def test_minibatch_training_penalizes_the_batch_or_the_probe_set(tmp_path, data):
    torch.manual_seed(0)
    module = Regressor(lr=0.05)
    start = copy.deepcopy(module)
    callback = PenaltyCallback(
        GradientNormPenalty(0.5), data=data, probe_size=64, loss_fn=half_squared_error
    )
    fit(tmp_path, module, [callback], steps=1, batch_size=16)

    minibatch = tuple(t[:16] for t in regression_data().tensors)
    penalized = minibatch if data == "batch" else None
    expected = GradientNormPenalty(0.5).evaluate(full_objective(start, penalized))
    step = plain_gradient(start, minibatch) + expected.gradient
    torch.testing.assert_close(
        flat(module), flat(start) - 0.05 * step, rtol=1e-12, atol=1e-14
    )


def test_gradient_accumulation_penalizes_the_accumulated_batch_once(tmp_path):
    torch.manual_seed(0)
    whole, accumulated = Regressor(lr=0.05), None
    accumulated = copy.deepcopy(whole)
    callbacks = [
        PenaltyCallback(GradientNormPenalty(0.5), loss_fn=half_squared_error)
        for _ in range(2)
    ]
    fit(tmp_path, whole, [callbacks[0]], steps=3)
    fit(
        tmp_path,
        accumulated,
        [callbacks[1]],
        steps=3,
        batch_size=32,
        accumulate_grad_batches=2,
    )
    torch.testing.assert_close(flat(accumulated), flat(whole), rtol=1e-12, atol=0)
    assert callbacks[1].num_evaluations == 3
    assert [r.step for r in callbacks[1].history] == [0, 1, 2]
    for one, two in zip(callbacks[0].history, callbacks[1].history, strict=True):
        assert two.value == pytest.approx(one.value, rel=1e-12)


@pytest.mark.parametrize(
    ("name", "model"),
    [(name, "dropout") for name in ZERO]
    # Penalties with third derivatives refuse BatchNorm in train mode.
    + [(name, "batchnorm") for name in ("gradient-norm", "minibatch")],
)
def test_zero_coefficient_gives_a_bit_identical_run(tmp_path, name, model):
    options = {"dropout": 0.3} if model == "dropout" else {"batch_norm": True}
    runs = []
    for callbacks in ([], [PenaltyCallback(ZERO[name](), loss_fn=half_squared_error)]):
        torch.manual_seed(0)
        module = Regressor(lr=0.05, momentum=0.9, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = fit(tmp_path, module, callbacks, steps=4)
        state = run.optimizers[0].state_dict()["state"]
        runs.append((module, state, torch.get_rng_state()))
    (plain, plain_state, plain_rng), (penalized, state, rng) = runs
    assert plain.losses == penalized.losses
    assert torch.equal(flat(plain), flat(penalized))
    for key, tensor in plain.state_dict().items():  # BatchNorm statistics included
        assert torch.equal(tensor, penalized.state_dict()[key])
    for index, buffers in plain_state.items():
        assert torch.equal(buffers["momentum_buffer"], state[index]["momentum_buffer"])
    assert torch.equal(plain_rng, rng)


class LBFGSRegressor(Regressor):
    def __init__(self, line_search_fn=None):
        super().__init__()
        self.line_search_fn = line_search_fn

    def configure_optimizers(self):
        return torch.optim.LBFGS(
            self.parameters(),
            lr=0.5,
            max_iter=4,
            tolerance_grad=0,
            tolerance_change=0,
            line_search_fn=self.line_search_fn,
        )


def step_by_hand(reference, steps):
    """Step ``reference``'s optimizer on L + (0.3/4)‖∇L‖² written by hand."""
    inputs, targets = regression_data().tensors
    optimizer = reference.configure_optimizers()

    def closure():
        optimizer.zero_grad()
        loss = half_squared_error(reference(inputs), targets)
        gradients = torch.autograd.grad(loss, reference.parameters(), create_graph=True)
        penalty = 0.3 / 4 * sum(g.square().sum() for g in gradients)
        (loss + penalty).backward()
        return loss

    for _ in range(steps):
        optimizer.step(closure)


def test_closure_optimizer_receives_the_penalty_at_every_evaluation(tmp_path):
    """LBFGS through Lightning + penalty equals LBFGS on L + P written by hand."""
    torch.manual_seed(0)
    module = LBFGSRegressor()
    reference = copy.deepcopy(module)
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=2)

    step_by_hand(reference, steps=2)
    torch.testing.assert_close(flat(module), flat(reference), rtol=1e-9, atol=1e-12)
    assert len(callback.history) == 2
    assert callback.num_evaluations == 2 * 4  # one per closure call


class SAMRegressor(Regressor):
    def __init__(self, optimizer_class):
        super().__init__()
        self.optimizer_class = optimizer_class

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), torch.optim.SGD, rho=0.1, lr=0.2)


@pytest.mark.parametrize("optimizer_class", [SAM, GSAM], ids=["sam", "gsam"])
def test_sam_family_receives_the_penalty_at_both_points(tmp_path, optimizer_class):
    """SAM through Lightning + penalty equals SAM on L + P written by hand."""
    torch.manual_seed(0)
    module = SAMRegressor(optimizer_class)
    reference = copy.deepcopy(module)
    callback = PenaltyCallback(GradientNormPenalty(0.3), loss_fn=half_squared_error)
    fit(tmp_path, module, [callback], steps=3)

    step_by_hand(reference, steps=3)
    torch.testing.assert_close(flat(module), flat(reference), rtol=1e-9, atol=1e-12)
    assert callback.num_evaluations == 2 * 3  # the clean and the perturbed point


def test_resume_continues_as_uninterrupted(tmp_path):
    def penalties():
        return [
            PenaltyCallback(TracePenalty(0.01, seed=1), loss_fn=half_squared_error),
            PenaltyCallback(SharpnessPenalty(0.01), loss_fn=half_squared_error),
        ]

    torch.manual_seed(0)
    straight = Regressor(lr=0.05)
    interrupted = copy.deepcopy(straight)
    straight_callbacks = penalties()
    fit(tmp_path, straight, straight_callbacks, steps=6)

    first = fit(tmp_path, interrupted, penalties(), steps=3)
    path = tmp_path / "half.ckpt"
    first.save_checkpoint(path)
    resumed, resumed_callbacks = Regressor(lr=0.05), penalties()
    run = trainer(tmp_path, resumed_callbacks, 6)
    run.fit(resumed, loader(regression_data()), ckpt_path=path)

    assert torch.equal(flat(resumed), flat(straight))
    for one, two in zip(straight_callbacks, resumed_callbacks, strict=True):
        assert [r.step for r in two.history] == [3, 4, 5]
        assert [r.value for r in two.history] == [r.value for r in one.history[3:]]


def test_learning_rate_is_read_when_the_step_is_taken(tmp_path):
    class Scheduled(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.08)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    torch.manual_seed(0)
    callback = PenaltyCallback(GradientNormPenalty("lr"), loss_fn=half_squared_error)
    fit(tmp_path, Scheduled(), [callback], steps=3)
    coefficients = [r.metrics["coefficient"] for r in callback.history]
    assert coefficients == pytest.approx([0.08, 0.04, 0.02])


def test_every_evaluation_is_logged(tmp_path):
    torch.manual_seed(0)
    callback = PenaltyCallback(
        CentralFlowPenalty(0.2), loss_fn=half_squared_error, log_every_n_steps=2
    )
    logger = CSVLogger(tmp_path, name="csv")
    fit(tmp_path, Regressor(lr=0.05), [callback], steps=5, logger=logger)
    logger.save()
    text = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    header, *rows = text.strip().splitlines()
    for key in ("value", "gradient_norm", "hvps", "lambda_1", "sigma2", "threshold"):
        assert f"penalty/central_flow/{key}" in header
    steps = [int(row.split(",")[header.split(",").index("step")]) for row in rows]
    assert sorted(set(steps)) == [0, 2, 4]
    assert len(callback.history) == 5


class PoisonAtStep(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


@pytest.mark.parametrize(
    "make",
    [lambda: GradientNormPenalty(0.1), lambda: SharpnessPenalty(0.01)],
    ids=["gradient-norm", "sharpness"],
)
def test_non_finite_penalty_is_logged_not_added_and_warned_once(tmp_path, make):
    torch.manual_seed(0)
    callback = PenaltyCallback(make(), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="not finite") as record:
        fit(tmp_path, Regressor(lr=0.05), [PoisonAtStep(2), callback], steps=5)
    assert sum("not finite" in str(w.message) for w in record) == 1
    # A NaN Hessian is no reason to raise the eigensolver's max_iter.
    assert not any("max_iter" in str(w.message) for w in record)
    assert [r.added for r in callback.history] == [True, True, False, False, False]
    assert all(r.value != r.value for r in callback.history[2:])  # NaN


def test_momentum_warns_that_the_projection_is_approximate(tmp_path):
    callback = PenaltyCallback(CentralFlowPenalty(0.2), loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="projection rule assumes"):
        fit(tmp_path, Regressor(lr=0.05, momentum=0.9), [callback], steps=1)
