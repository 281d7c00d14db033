"""Bad coefficients and incompatible settings are refused early, with clear errors."""

import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_eos.curvature import ProbeObjective
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

NUMBER = r"must be a finite number in \[0, inf\)"
POSITIVE = r"must be a finite number in \(0, inf\)"
FRACTION = r"must be a finite number in \(0, 1\]"
INTEGER = "must be an integer of at least"
SEED = r"must be an integer in \[0, 4294967295\]"
OR_LR = r"\. 'lr' is accepted too"
CONSTRUCTION = [
    (lambda: GradientNormPenalty(-0.1), f"`coefficient` {NUMBER}, got -0.1{OR_LR}"),
    (lambda: GradientNormPenalty(math.nan), f"`coefficient` .*, got nan{OR_LR}"),
    (lambda: GradientNormPenalty(math.inf), f"`coefficient` .*, got inf{OR_LR}"),
    (lambda: GradientNormPenalty(True), f"`coefficient` .*, got True{OR_LR}"),
    (lambda: GradientNormPenalty("eta"), f"`coefficient` .*, got 'eta'{OR_LR}"),
    (lambda: MinibatchGradientNormPenalty(0), f"`batch_size` {INTEGER} 1, got 0"),
    (
        lambda: MinibatchGradientNormPenalty(8, shuffle="yes"),
        "`shuffle` must be True or False, got 'yes'",
    ),
    (
        lambda: MinibatchGradientNormPenalty(8, shuffle=None),
        "`shuffle` must be True or False, got None",
    ),
    (lambda: MinibatchGradientNormPenalty(8, seed=-1), f"`seed` {SEED}, got -1"),
    (lambda: SharpnessPenalty(1.0, seed="abc"), f"`seed` {SEED}, got 'abc'"),
    (lambda: CentralFlowPenalty(0.2, seed=None), f"`seed` {SEED}, got None"),
    (lambda: SharpnessPenalty("lr"), f"`coefficient` {NUMBER}, got 'lr'"),
    (lambda: SharpnessPenalty(-1.0), f"`coefficient` {NUMBER}, got -1.0"),
    (lambda: SharpnessPenalty(1.0, tol=0), f"`tol` {FRACTION}, got 0"),
    (lambda: SharpnessPenalty(1.0, max_iter=0), f"`max_iter` {INTEGER} 1, got 0"),
    (
        lambda: SharpnessPenalty(1.0, extra_vectors=-1),
        f"`extra_vectors` {INTEGER} 0, got -1",
    ),
    (lambda: TracePenalty(1.0, num_samples=0), f"`num_samples` {INTEGER} 1, got 0"),
    (
        lambda: TracePenalty(1.0, distribution="uniform"),
        r"`distribution` must be one of \('rademacher', 'gaussian'\), got 'uniform'",
    ),
    (lambda: TracePenalty(1.0, seed=-2), f"`seed` {SEED}, got -2"),
    (lambda: CentralFlowPenalty(0.0), f"`target_lr` {POSITIVE}, got 0.0"),
    (lambda: CentralFlowPenalty(-0.2), f"`target_lr` {POSITIVE}, got -0.2"),
    (lambda: CentralFlowPenalty(0.2, rate=0), f"`rate` {FRACTION}, got 0"),
    (lambda: CentralFlowPenalty(0.2, rate=1.5), f"`rate` {FRACTION}, got 1.5"),
    (
        lambda: PenaltyCallback("igr"),
        "`penalty` must be a lightning_eos.penalties.Penalty, got str",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), data="all"),
        r"`data` must be one of \('batch', 'probe'\), got 'all'",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), log_every_n_steps=0),
        f"`log_every_n_steps` {INTEGER} 1, got 0",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), chunk_size=0),
        f"`chunk_size` {INTEGER} 1, got 0",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), mode="test"),
        "`mode` must be 'train' or 'eval', got 'test'",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), seed=-1),
        f"`seed` {SEED}, got -1",
    ),
    (
        lambda: PenaltyCallback(GradientNormPenalty(), dtype=[1]),
        r"`dtype` must be one of \(None, 'float32', 'float64'\), got \[1\]",
    ),
]


@pytest.mark.parametrize(
    ("build", "message"),
    CONSTRUCTION,
    ids=[f"{i}-{m.split('`')[1]}" for i, (_, m) in enumerate(CONSTRUCTION)],
)
def test_bad_arguments_are_refused_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "penalty",
    [
        GradientNormPenalty("lr"),
        MinibatchGradientNormPenalty(4),
        CentralFlowPenalty(0.2),
    ],
    ids=["gradient-norm", "minibatch", "central-flow"],
)
def test_penalties_that_need_the_learning_rate_say_so(penalty):
    model = nn.Linear(2, 1).double()
    batch = (
        torch.ones(3, 2, dtype=torch.float64),
        torch.ones(3, 1, dtype=torch.float64),
    )
    objective = ProbeObjective(model, [batch], loss_fn=half_squared_error)
    assert penalty.needs_step_size
    with pytest.raises(ValueError, match="learning rate"):
        penalty.evaluate(objective)


def fit(tmp_path, module, callback, steps=1):
    run = trainer(tmp_path, [callback], steps)
    run.fit(module, loader(regression_data()))
    return run


class LineSearch(Regressor):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), line_search_fn="strong_wolfe")


class TwoOptimizers(Regressor):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for optimizer in self.optimizers():
            optimizer.zero_grad()
            loss = half_squared_error(self(batch[0]), batch[1])
            self.manual_backward(loss)
            optimizer.step()

    def configure_optimizers(self):
        first, second = self.net[0].parameters(), self.net[-1].parameters()
        return [torch.optim.SGD(first, lr=0.1), torch.optim.SGD(second, lr=0.1)]


class TwoLearningRates(Regressor):
    def configure_optimizers(self):
        groups = [
            {"params": self.net[0].parameters(), "lr": 0.1},
            {"params": self.net[-1].parameters(), "lr": 0.2},
        ]
        return torch.optim.SGD(groups)


class LayerNormRegressor(Regressor):
    def __init__(self):
        super().__init__()
        self.net.insert(1, nn.LayerNorm(8, dtype=torch.float64))


class NoLoss(Regressor):
    pass


SETTINGS = {
    "line-search": (
        LineSearch,
        GradientNormPenalty(0.1),
        {},
        r"LBFGS\(line_search_fn='strong_wolfe'\): the closure returns the module's "
        "loss L without the penalty",
    ),
    "two-optimizers": (
        TwoOptimizers,
        GradientNormPenalty(0.1),
        {},
        "adds the penalty gradient for one optimizer; the run has 2",
    ),
    "two-learning-rates": (
        TwoLearningRates,
        GradientNormPenalty("lr"),
        {},
        r"param groups of SGD have different ones: \[0.1, 0.2\]",
    ),
    "no-loss": (
        NoLoss,
        GradientNormPenalty(0.1),
        {"loss_fn": None},
        "pass `loss_fn=`",
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_incompatible_settings_are_refused_before_the_first_step(tmp_path, name):
    module_class, penalty, options, message = SETTINGS[name]
    options = {"loss_fn": half_squared_error, **options}
    callback = PenaltyCallback(penalty, **options)
    module = module_class()
    start = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MisconfigurationException, match=message):
        fit(tmp_path, module, callback)
    assert callback.num_evaluations == 0
    after = list(module.parameters())
    assert all(torch.equal(a, b) for a, b in zip(start, after, strict=True))


def test_batchnorm_with_running_statistics_is_accepted_in_eval_mode(tmp_path):
    callback = PenaltyCallback(
        SharpnessPenalty(0.1), loss_fn=half_squared_error, mode="eval"
    )
    fit(tmp_path, Regressor(batch_norm=True), callback)
    assert callback.history[0].added


@pytest.mark.parametrize(
    ("module_class", "penalty"),
    [
        (lambda: Regressor(batch_norm=True), SharpnessPenalty(0.1)),
        (LayerNormRegressor, TracePenalty(0.1)),
    ],
    ids=["batchnorm-train", "layernorm"],
)
def test_normalization_layers_are_evaluated_in_plain_operations(
    tmp_path, module_class, penalty
):
    callback = PenaltyCallback(penalty, loss_fn=half_squared_error)
    fit(tmp_path, module_class(), callback)
    assert callback.history[0].added
