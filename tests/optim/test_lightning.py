"""The closure optimizers under Lightning's automatic optimization."""

import copy
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.func import functional_call

from lightning_eos.callbacks import OptimizerStatsLogger
from lightning_eos.optim import SAM, CubicNewton, GroupedNewton, HessianFree, NewtonCG
from tests.optim.modules import (
    GraphRecorder,
    Recorder,
    half_squared_error,
    loader,
    trainer,
)

SAM_SGD = partial(
    SAM,
    base_optimizer=torch.optim.SGD,
    rho=0.05,
    lr=0.1,
    base_kwargs={"momentum": 0.9, "weight_decay": 1e-2},
)


def gradient_at(net, params, batch):
    names = [n for n, _ in net.named_parameters()]
    tensors = [p.detach().clone().requires_grad_() for p in params]
    loss = half_squared_error(
        functional_call(net, dict(zip(names, tensors, strict=True)), (batch[0],)),
        batch[1],
    )
    return list(torch.autograd.grad(loss, tensors))


def manual_sam(net, batch, steps, rho=0.05, lr=0.1, beta=0.9, decay=1e-2, clip=None):
    theta = [p.detach().clone() for p in net.parameters()]
    buffers = None
    for _ in range(steps):
        g = gradient_at(net, theta, batch)
        norm = torch.cat([x.reshape(-1) for x in g]).norm()
        gp = gradient_at(
            net, [t + rho * x / norm for t, x in zip(theta, g, strict=True)], batch
        )
        if clip is not None:  # torch.nn.utils.clip_grad_norm_, as Lightning clips
            total = torch.cat([x.reshape(-1) for x in gp]).norm()
            gp = [x * min(1.0, clip / (float(total) + 1e-6)) for x in gp]
        d = [x + decay * t for x, t in zip(gp, theta, strict=True)]
        buffers = (
            d
            if buffers is None
            else [beta * m + x for m, x in zip(buffers, d, strict=True)]
        )
        theta = [t - lr * m for t, m in zip(theta, buffers, strict=True)]
    return theta


@pytest.mark.parametrize("clip", [None, 0.05], ids=["no-clipping", "clipping"])
def test_sam_runs_two_training_steps_and_equals_a_manual_sam_step(tmp_path, clip):
    module = Recorder(SAM_SGD)
    start = copy.deepcopy(module.net)
    data = loader()
    trainer(tmp_path, 2, gradient_clip_val=clip).fit(module, data)

    assert module.calls == 4  # two passes per step
    expected = manual_sam(start, next(iter(data)), steps=2, clip=clip)
    for p, q in zip(module.net.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-12, atol=1e-14)


def batchnorm_after_one_clean_pass(module, batch):
    reference = copy.deepcopy(module.net).train()
    with torch.no_grad():
        reference(batch[0])
    return reference[1]


BN_OPTIMIZERS = {
    "sam": SAM_SGD,
    "newton-cg": partial(NewtonCG, damping=0.5),
    "cubic": CubicNewton,
}


@pytest.mark.parametrize("make_optimizer", BN_OPTIMIZERS.values(), ids=BN_OPTIMIZERS)
def test_batchnorm_statistics_move_once_per_step_from_the_clean_pass(
    tmp_path, make_optimizer
):
    module = GraphRecorder(make_optimizer, batch_norm=True)
    data = loader()
    expected = batchnorm_after_one_clean_pass(module, next(iter(data)))
    trainer(tmp_path, 1).fit(module, data)

    assert module.calls > 1
    bn = module.net[1]
    assert torch.equal(bn.running_mean, expected.running_mean)
    assert torch.equal(bn.running_var, expected.running_var)
    assert int(bn.num_batches_tracked) == 1


def test_dropout_mask_is_the_same_in_both_passes_and_rng_moves_once(tmp_path):
    sam = Recorder(SAM_SGD, dropout=0.5)
    pl.seed_everything(3, verbose=False)
    trainer(tmp_path, 3).fit(sam, loader())
    sgd = Recorder(lambda p: torch.optim.SGD(p, lr=0.1), dropout=0.5)
    pl.seed_everything(3, verbose=False)
    trainer(tmp_path, 3).fit(sgd, loader())

    assert (
        sam.draws[0::2] == sam.draws[1::2]
    )  # each pass replays the step's random state
    assert sam.draws[0::2] == sgd.draws  # the stream moves as with one pass per step


def test_accumulation_is_refused_before_the_first_step(tmp_path):
    module = Recorder(SAM_SGD)
    with pytest.raises(MisconfigurationException, match="accumulate_grad_batches=2"):
        trainer(
            tmp_path, 2, accumulate_grad_batches=2, callbacks=[OptimizerStatsLogger()]
        ).fit(module, loader())
    assert module.calls == 0


def test_accumulation_is_refused_at_the_step_without_the_callback(tmp_path):
    module = Recorder(SAM_SGD)
    with pytest.raises(MisconfigurationException, match="gradient accumulation"):
        trainer(tmp_path, 2, accumulate_grad_batches=2).fit(module, loader(64))


def test_scheduled_accumulation_is_refused_before_the_first_step(tmp_path):
    module = Recorder(SAM_SGD)
    schedule = GradientAccumulationScheduler({1: 2})
    with pytest.raises(MisconfigurationException, match=r"\{1: 2, 0: 1\}"):
        trainer(tmp_path, 4, callbacks=[schedule]).fit(module, loader(64))
    assert module.calls == 0


def test_a_grad_scaler_is_refused(tmp_path):
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module = Recorder(SAM_SGD)
    with pytest.raises(RuntimeError, match="16-mixed"):
        trainer(tmp_path, 1, plugins=[plugin]).fit(module, loader())


def test_gradient_clipping_is_refused_for_second_order_optimizers(tmp_path):
    module = GraphRecorder(NewtonCG)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        trainer(tmp_path, 1, gradient_clip_val=1.0).fit(module, loader())


class StandIn:
    """A Trainer's attributes that the checks read."""

    def __init__(self, strategy=None, world_size=1):
        self.accumulate_grad_batches = 1
        self.callbacks = []
        self.gradient_clip_val = None
        self.strategy = strategy
        self.world_size = world_size
        self.lightning_module = None


def test_strategies_that_cannot_be_served_are_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(MisconfigurationException, match="shards"):
        SAM(params, lr=0.1).check_trainer(StandIn(FSDPStrategy()))
    with pytest.raises(MisconfigurationException, match="2 processes"):
        NewtonCG(params).check_trainer(StandIn(world_size=2))
    SAM(params, lr=0.1).check_trainer(StandIn(world_size=2))  # DDP serves SAM


def test_missing_backward_override_is_explained(tmp_path):
    module = Recorder(NewtonCG)
    with pytest.raises(
        RuntimeError, match=r"backward = lightning_eos\.optim\.backward_with_graph"
    ):
        trainer(tmp_path, 1).fit(module, loader())


def test_finite_differences_need_no_override(tmp_path):
    module = Recorder(
        partial(NewtonCG, damping=0.5, hessian_products="finite_difference")
    )
    trainer(tmp_path, 2).fit(module, loader())
    counters = module.trainer.optimizers[0].counters
    # Without the override a line-search call cannot skip its backward pass: every
    # call counts as a gradient evaluation.
    assert module.calls == counters["gradients"] > counters["steps"] == 2
    assert counters["hvps"] > 0 and counters["losses"] == 0


RESUMABLE = {
    "sam-momentum-scheduler": (
        SAM_SGD,
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8),
    ),
    "newton-cg": (partial(NewtonCG, damping=0.5), None),
    "hessian-free": (partial(HessianFree, max_cg_iter=5), None),
    "cubic": (partial(CubicNewton, max_subproblem_iter=5), None),
    "grouped-newton": (GroupedNewton, None),
}


@pytest.mark.parametrize(
    ("make_optimizer", "scheduler"), RESUMABLE.values(), ids=RESUMABLE
)
def test_checkpoint_resumes_to_identical_parameters(
    tmp_path, make_optimizer, scheduler
):
    straight = GraphRecorder(make_optimizer, scheduler=scheduler)
    trainer(tmp_path / "straight", 4).fit(straight, loader())

    first = GraphRecorder(make_optimizer, scheduler=scheduler)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path / "first", 2, enable_checkpointing=True, callbacks=[checkpoint]
    ).fit(first, loader())
    resumed = GraphRecorder(make_optimizer, scheduler=scheduler)
    same_place = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(
        tmp_path / "resumed", 4, enable_checkpointing=True, callbacks=[same_place]
    ).fit(resumed, loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


class MemoryLogger(pl.loggers.Logger):
    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))


STATS = {
    "sam": (SAM_SGD, ["epsilon_norm", "perturbed_loss", "loss"]),
    "newton-cg": (
        partial(NewtonCG, damping=0.5),
        ["cg_iterations", "negative_curvature_steps", "damping", "step_length"],
    ),
    "cubic": (CubicNewton, ["sigma", "model_decrease", "ratio"]),
}


@pytest.mark.filterwarnings("ignore:The number of training batches")
@pytest.mark.parametrize(("make_optimizer", "keys"), STATS.values(), ids=STATS)
def test_stats_are_written_to_the_loggers_every_step(tmp_path, make_optimizer, keys):
    logger = MemoryLogger()
    module = GraphRecorder(make_optimizer)
    trainer(
        tmp_path,
        2,
        logger=logger,
        callbacks=[OptimizerStatsLogger()],
        log_every_n_steps=50,
    ).fit(module, loader())
    written = [
        (step, m)
        for step, m in logger.metrics
        if any(k.startswith("optim/") for k in m)
    ]
    assert [step for step, _ in written] == [1, 2]
    for key in [*keys, "count_gradients", "count_hvps"]:
        assert f"optim/{key}" in written[-1][1]
