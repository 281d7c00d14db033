"""FlowMonitor: the flows beside a real Lightning run."""

import dataclasses
import glob
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_eos.callbacks import FlowMonitor
from lightning_eos.curvature import ProbeObjective
from lightning_eos.flows import GradientFlow

from .modules import Regressor, half_squared_error, loader, regression_data, trainer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_construction_leaves_the_random_stream_alone():
    state = torch.get_rng_state()
    monitor()
    assert torch.equal(torch.get_rng_state(), state)


class MemoryLogger(Logger):
    """Keeps what it is given."""

    def __init__(self):
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(tmp_path, module, callbacks, steps, **kwargs):
    run = trainer(tmp_path, callbacks, steps, **kwargs)
    run.fit(module, loader(regression_data()))
    return run


def monitor(**kwargs):
    return FlowMonitor(loss_fn=half_squared_error, **kwargs)


def test_flows_match_a_standalone_integration_and_are_logged(tmp_path):
    torch.manual_seed(0)
    module = Regressor(lr=0.1)
    theta0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    callback = monitor(sharpness_every_n_steps=5)
    logger = MemoryLogger()
    fit(tmp_path, module, [callback], 12, logger=logger)

    assert [r.step for r in callback.history] == list(range(13))
    # The same integration by hand, from the run's initial parameters.
    reference = Regressor(lr=0.1)
    objective = ProbeObjective(
        reference, [regression_data().tensors], loss_fn=half_squared_error
    )
    flow = GradientFlow(objective, theta0, lr=0.1)
    for _ in range(12):
        flow.advance()
    torch.testing.assert_close(callback.flows["gradient"].theta, flow.theta)
    # Far below the threshold the central flow is gradient flow, bit for bit.
    assert torch.equal(callback.flows["central"].theta, flow.theta)
    last = callback.history[-1]
    assert last.flows["central"].loss_average == last.flows["central"].loss
    assert 0 < last.distances["gradient"] < 0.1  # GD follows gradient flow here
    assert [r.gd_sharpness is not None for r in callback.history[:6]] == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]

    logged = dict(logger.metrics)
    assert sorted(logged) == list(range(13))
    expected = {
        "gd/loss",
        "gd/loss_average",
        "gd/gradient_norm_sq_average",
        "gradient_flow/loss",
        "gradient_flow/distance",
        "gradient_flow/gradients",
        "central_flow/loss_average",
        "central_flow/critical",
        "central_flow/third_order",
        "flows/threshold",
    }
    assert expected <= set(logged[12])
    assert logged[12]["flows/threshold"] == pytest.approx(20.0)
    assert logged[10]["gd/sharpness"] == callback.history[10].gd_sharpness
    assert logged[12]["gd/loss_average"] == pytest.approx(
        sum(r.gd_loss for r in callback.history) / 13
    )


def test_central_flow_holds_the_sharpness_at_two_over_eta(tmp_path):
    # lr = 1: gradient flow's sharpness crosses 2/η = 2 near step 32.
    torch.manual_seed(0)
    callback = monitor(sharpness_every_n_steps=None)
    fit(tmp_path, Regressor(lr=1.0), [callback], 60)

    central = [r.flows["central"] for r in callback.history]
    gradient = [r.flows["gradient"] for r in callback.history]
    reached = next(i for i, r in enumerate(central) if r.critical > 0)
    assert 25 < reached < 40
    assert all(r.sharpness == pytest.approx(2.0, rel=1e-3) for r in central[reached:])
    assert all(r.variances[0] > 0 for r in central[reached + 1 :])
    assert gradient[-1].sharpness > 2.5
    assert central[-1].loss_average > central[-1].loss
    # Per step: 3 substep gradients + the refresh (loss, gradient), 1 T[u, u].
    assert central[-1].third_order == 1 and central[-1].gradients == 4


class ScheduledRegressor(Regressor):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 + k / 20)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step"},
        }


def test_a_per_step_schedule_sets_each_step_of_the_flows(tmp_path):
    torch.manual_seed(0)
    callback = monitor(sharpness_every_n_steps=None)
    fit(tmp_path, ScheduledRegressor(lr=0.5), [callback], 30)
    # The learning rate of the step that led to step t is 0.5 (1 + (t − 1)/20).
    assert [r.lr for r in callback.history[1:]] == pytest.approx(
        [0.5 * (1 + (t - 1) / 20) for t in range(1, 31)]
    )
    assert all(r.threshold == pytest.approx(2 / r.lr) for r in callback.history[1:])
    central = callback.flows["central"]
    assert central.lr == pytest.approx(0.5 * (1 + 29 / 20))
    assert callback.history[-1].flows["central"].critical > 0  # 2/η came down
    assert callback.history[-1].flows["central"].sharpness == pytest.approx(
        2 / central.lr, rel=0.01
    )


def gd_run(tmp_path, callbacks):
    pl.seed_everything(3, verbose=False)
    module = Regressor(lr=1.0)
    fit(tmp_path, module, callbacks, 40)
    return module.losses, [p.detach().clone() for p in module.parameters()]


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    losses, params = gd_run(tmp_path, [])
    callback = monitor()
    monitored_losses, monitored_params = gd_run(tmp_path, [callback])
    assert callback.history[-1].flows["central"].critical > 0  # it did work
    assert losses == monitored_losses
    assert all(torch.equal(a, b) for a, b in zip(params, monitored_params, strict=True))


def checkpointed_run(tmp_path, steps, ckpt_path=None):
    torch.manual_seed(0)
    module = Regressor(lr=1.0)
    callback = monitor(sharpness_every_n_steps=None)
    checkpoint = ModelCheckpoint(
        tmp_path / "ckpt", every_n_train_steps=30, save_top_k=-1
    )
    run = trainer(tmp_path, [callback, checkpoint], steps, enable_checkpointing=True)
    run.fit(module, loader(regression_data()), ckpt_path=ckpt_path)
    return callback


def test_resume_continues_the_flows_exactly(tmp_path):
    whole = checkpointed_run(tmp_path / "a", 45)
    (checkpoint,) = glob.glob(f"{tmp_path}/a/ckpt/*step=30.ckpt")
    resumed = checkpointed_run(tmp_path / "b", 45, ckpt_path=checkpoint)

    assert [r.step for r in resumed.history] == list(range(46))
    for name in ("gradient", "central"):
        assert torch.equal(resumed.flows[name].theta, whole.flows[name].theta)
    assert resumed.history[-1].flows["central"].critical > 0
    for step in (31, 40, 45):  # every number but the wall-clock time
        for name in ("gradient", "central"):
            again = dataclasses.replace(resumed.history[step].flows[name], seconds=0)
            first = dataclasses.replace(whole.history[step].flows[name], seconds=0)
            assert again == first


def test_added_to_a_started_run_it_starts_there_and_says_so(tmp_path):
    torch.manual_seed(0)
    module = Regressor(lr=0.1)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3)
    first = trainer(tmp_path, [checkpoint], 3, enable_checkpointing=True)
    first.fit(module, loader(regression_data()))
    (path,) = glob.glob(f"{tmp_path}/ckpt/*.ckpt")
    callback = monitor(flows=("gradient",))
    run = trainer(tmp_path, [callback], 6)
    with pytest.warns(UserWarning, match="starts at step 3"):
        run.fit(Regressor(lr=0.1), loader(regression_data()), ckpt_path=path)
    assert [r.step for r in callback.history] == [3, 4, 5, 6]
    assert callback.flows["gradient"].time == 6.0


def test_figure_is_written_to_tensorboard(tmp_path):
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    callback = monitor(flows=("central",), figure_every_n_steps=3)
    fit(tmp_path, Regressor(lr=0.1), [callback], 6, logger=logger)
    (path,) = glob.glob(f"{tmp_path}/run/**/events.out.tfevents.*", recursive=True)
    events = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    images = events.Images("flows/comparison")
    assert [image.step for image in images] == [3, 6, 6]
    assert "central_flow/loss_average" in events.Tags()["scalars"]
    assert "gradient_flow/loss" not in events.Tags()["scalars"]


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (Regressor(optimizer="adam"), "not Adam"),
        (Regressor(momentum=0.9), "momentum=0.9"),
        (Regressor(dropout=0.1), "dropout in train mode"),
    ],
    ids=["adam", "momentum", "dropout"],
)
def test_unmodelled_runs_are_refused_before_training(tmp_path, module, match):
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(MisconfigurationException, match=match):
        fit(tmp_path, module, [monitor()], 3)
    assert all(
        torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True)
    )


class RMSPropRegressor(Regressor):
    def __init__(self, lr: float = 0.01, **kwargs):
        super().__init__(lr=lr)
        self.options = kwargs

    def configure_optimizers(self):
        options = {"alpha": 0.9, **self.options}
        return torch.optim.RMSprop(self.parameters(), lr=self.lr, **options)


def test_rmsprop_central_flow_holds_the_preconditioned_sharpness_at_two(tmp_path):
    torch.manual_seed(0)
    callback = monitor(sharpness_every_n_steps=12)
    fit(tmp_path, RMSPropRegressor(lr=0.01), [callback], 36)

    central = [r.flows["central"] for r in callback.history]
    stable = [r.flows["gradient"] for r in callback.history]
    # It enters at step 12 (λ₁(P⁻¹H) = 2.05: the stable flow's last unit of time
    # overshot) and settles at 2 within a few steps.
    assert central[11].critical == 0 and central[12].critical > 0
    assert all(r.sharpness == pytest.approx(2.0, rel=0.01) for r in central[17:])
    assert all(r.critical > 0 for r in central[12:])
    assert stable[-1].sharpness > 4.0  # the stable flow leaves the edge
    last = callback.history[-1]
    assert last.threshold == 2.0
    assert last.distances["central"] < 0.7 * last.distances["gradient"]
    # RMSProp's own preconditioned sharpness is at the edge too (it oscillates).
    assert all(1.5 < r.gd_sharpness < 4.0 for r in callback.history[12::12])
    assert callback.flows["central"].nu.shape == callback.flows["central"].theta.shape


@pytest.mark.parametrize(
    ("options", "match"),
    [({"centered": True}, "centered=True"), ({"momentum": 0.5}, "momentum=0.5")],
    ids=["centered", "momentum"],
)
def test_rmsprop_variants_are_refused(tmp_path, options, match):
    with pytest.raises(MisconfigurationException, match=match):
        fit(tmp_path, RMSPropRegressor(**options), [monitor()], 2)


def test_gradient_clipping_is_refused(tmp_path):
    with pytest.raises(MisconfigurationException, match="clips gradients"):
        fit(tmp_path, Regressor(), [monitor()], 3, gradient_clip_val=1.0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_is_accepted(tmp_path, mode):
    # In train mode the central flow differentiates BatchNorm in plain operations.
    torch.manual_seed(0)
    callback = monitor(mode=mode)
    fit(tmp_path, Regressor(batch_norm=True), [callback], 2)
    assert len(callback.history) == 3
    assert all(math.isfinite(r.flows["central"].loss) for r in callback.history)


def test_minibatches_warn_once(tmp_path):
    torch.manual_seed(0)
    callback = monitor(flows=("gradient",))
    run = trainer(tmp_path, [callback], 4)
    with pytest.warns(UserWarning, match="full-batch gradient descent") as record:
        run.fit(Regressor(), loader(regression_data(), batch_size=16))
    assert sum("full-batch" in str(w.message) for w in record) == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flows": ()}, "`flows` must be"),
        ({"flows": ("gradient", "stochastic")}, "`flows` must be"),
        ({"flows": ("central", "central")}, "`flows` must be"),
        ({"average_window": 0}, "`average_window`"),
        ({"substeps": 0}, "`substeps`"),
        ({"substep_bound": -1.0}, "`substep_bound`"),
        ({"margin": 1.0}, "`margin`"),
        ({"sharpness_every_n_steps": 0}, "`sharpness_every_n_steps`"),
        ({"probe_size": 0}, "`probe_size`"),
        ({"dtype": "float16"}, "`dtype`"),
        ({"max_substeps": 0}, "`max_substeps`"),
        ({"max_critical": 0}, "`max_critical`"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        monitor(**kwargs)


def test_no_matplotlib_warns_instead_of_failing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, Regressor(), [monitor(flows=("gradient",))], 2, logger=logger)
    assert any("matplotlib" in str(w.message) for w in caught)
