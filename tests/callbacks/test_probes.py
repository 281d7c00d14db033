"""What every probe callback promises: undisturbed training, resumption, precision."""

import glob
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.func import functional_call
from torch.utils.data import DataLoader, IterableDataset

from lightning_eos.callbacks import (
    FlowMonitor,
    HessianTraceMonitor,
    MinibatchSharpnessMonitor,
    PreconditionedSharpnessMonitor,
    SharpnessMonitor,
    SpectralDensityMonitor,
    StepProgressBar,
    ThirdOrderMonitor,
)
from lightning_eos.penalties import GradientNormPenalty, PenaltyCallback

from .modules import Regressor, half_squared_error, loader, regression_data, trainer
from .test_sharpness import Snapshot, equal_states


def all_probes(every=3, tol=1e-3, **options):
    common = {"every_n_steps": every, "loss_fn": half_squared_error, **options}
    return [
        SharpnessMonitor(k=2, tol=tol, **common),
        ThirdOrderMonitor(k=2, tensor=True, threshold=0.5, tol=tol, **common),
        HessianTraceMonitor(num_products=9, **common),
        SpectralDensityMonitor(num_probes=2, num_steps=10, **common),
        MinibatchSharpnessMonitor(
            num_batches=2, batch_size=16, max_iter=30, tol=tol, **common
        ),
        PreconditionedSharpnessMonitor(tol=tol, **common),
    ]


def train(tmp_path, callbacks, steps=9, dtype=torch.float64, **module_options):
    pl.seed_everything(3, verbose=False)
    module = Regressor(optimizer="adam", lr=0.05, dtype=dtype, **module_options)
    run = trainer(tmp_path, callbacks, steps)
    data = regression_data(dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout in train mode, no threshold for Adam
        run.fit(module, loader(data, batch_size=16, shuffle=True))
    return module, run


def test_training_is_bit_identical_with_and_without_every_probe(tmp_path):
    options = {"batch_norm": True, "dropout": 0.2}
    plain, _ = train(tmp_path / "a", [], **options)
    probes = all_probes()
    probed, _ = train(tmp_path / "b", probes, **options)

    assert probed.losses == plain.losses
    for a, b in zip(plain.parameters(), probed.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(plain.buffers(), probed.buffers(), strict=True):
        assert torch.equal(a, b)
    assert all(len(probe.history) >= 3 for probe in probes)


def values(probe):
    """The logged numbers of a probe, per step."""
    rows = {}
    for record in probe.history:
        if hasattr(record, "eigenvalues"):
            numbers = list(record.eigenvalues)
        elif hasattr(record, "t111"):
            numbers = [record.grad_sharpness_norm, record.alpha, record.x, record.y]
            numbers += record.blocks.gradient.tolist() if record.blocks else []
        elif hasattr(record, "trace"):
            numbers = [record.trace, record.stderr]
        elif hasattr(record, "density"):
            numbers = record.density.nodes.reshape(-1).tolist()
        else:
            numbers = [record.full_sharpness, *record.batch_sharpness]
        rows[record.step] = numbers
    return rows


def test_every_probe_resumes_as_if_uninterrupted(tmp_path):
    def run(directory, ckpt_path=None):
        pl.seed_everything(3, verbose=False)
        probes = all_probes()
        checkpoint = ModelCheckpoint(directory, every_n_train_steps=6, save_top_k=-1)
        fit = trainer(directory, [*probes, checkpoint], 12, enable_checkpointing=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit.fit(
                Regressor(optimizer="adam", lr=0.05),
                loader(regression_data()),  # full batch: resumes exactly
                ckpt_path=ckpt_path,
            )
        return probes

    whole = run(tmp_path / "whole")
    (checkpoint,) = glob.glob(f"{tmp_path}/whole/*step=6.ckpt")
    resumed = run(tmp_path / "resumed", ckpt_path=checkpoint)

    for a, b in zip(whole, resumed, strict=True):
        expected, got = values(a), values(b)
        assert sorted(got) == [9, 12], type(a).__name__
        for step in got:
            assert got[step] == pytest.approx(expected[step], rel=1e-6, nan_ok=True), (
                type(a).__name__
            )
    assert torch.equal(resumed[1].reference, whole[1].reference)


def test_float64_probes_of_a_float32_model(tmp_path):
    probes = all_probes(every=2, tol=1e-10, dtype="float64")
    module, run = train(tmp_path, probes, steps=2, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in module.parameters())

    # Values against float64 references at the float32 parameters; a float32
    # computation would be off by about 1e-6.
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    inputs, targets = (t.double() for t in regression_data(dtype=torch.float32).tensors)

    def loss(theta):
        params = {
            n: t.reshape(s)
            for n, t, s in zip(names, torch.split(theta, sizes), shapes, strict=True)
        }
        return half_squared_error(functional_call(module, params, (inputs,)), targets)

    theta = torch.cat([p.detach().double().reshape(-1) for p in module.parameters()])
    with torch.autocast("cpu", enabled=False):
        module.double()
        hessian = torch.autograd.functional.hessian(loss, theta)
        module.float()
    values, vectors = torch.linalg.eigh(hessian)
    top = float(values[-1])
    assert probes[0].history[-1].eigenvalues[0] == pytest.approx(top, rel=1e-9)
    point = theta.clone().requires_grad_()
    with torch.autocast("cpu", enabled=False):
        module.double()
        curvature = torch.autograd.functional.hessian(loss, point, create_graph=True)
        (gradient_s,) = torch.autograd.grad(
            vectors[:, -1] @ curvature @ vectors[:, -1], point
        )
        module.float()
    assert probes[1].history[-1].grad_sharpness_norm == pytest.approx(
        float(gradient_s.norm()), rel=1e-8
    )
    state = run.optimizers[0].state
    root = torch.cat(
        [
            (state[p]["exp_avg_sq"].double() / (1 - 0.999 ** float(state[p]["step"])))
            .sqrt()
            .reshape(-1)
            for p in module.parameters()
        ]
    )
    preconditioner = (root + 1e-8) / 0.05
    scale = preconditioner.rsqrt()
    expected = torch.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :])[-1]
    assert probes[5].history[-1].eigenvalues[0] == pytest.approx(
        float(expected), rel=1e-8
    )
    assert probes[1].history[-1].sharpness == pytest.approx(top, rel=1e-9)
    assert probes[4].history[-1].full_sharpness == pytest.approx(top, rel=1e-9)
    for probe in probes[2:4]:
        assert probe.objective(run, module).dtype == torch.float64


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(*regression_data().tensors, strict=True)


@pytest.mark.parametrize(
    ("probe", "module", "data", "message"),
    [
        (
            lambda: PreconditionedSharpnessMonitor(loss_fn=half_squared_error),
            lambda: Regressor(optimizer="sgd"),
            lambda: loader(regression_data()),
            r"one Adam, AdamW or RMSprop optimizer; the run's optimizers are \['SGD'\]",
        ),
        (
            lambda: MinibatchSharpnessMonitor(loss_fn=half_squared_error),
            lambda: Regressor(),
            lambda: DataLoader(Stream(), batch_size=8),
            "draws minibatches by index, but the training dataset is iterable",
        ),
    ],
    ids=["preconditioned-with-sgd", "minibatch-iterable"],
)
def test_runs_a_probe_cannot_measure_are_refused(
    tmp_path, probe, module, data, message
):
    with pytest.raises(MisconfigurationException, match=message):
        trainer(tmp_path, [probe()], 1).fit(module(), data())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HessianTraceMonitor(method="exact"), "`method` must be 'hutchinson'"),
        (
            lambda: HessianTraceMonitor(num_products=2),
            "`num_products` must be an integer of at least 3, got 2",
        ),
        (lambda: SpectralDensityMonitor(bins=0), "`bins` must be an integer"),
        (lambda: MinibatchSharpnessMonitor(batch_size=0), "`batch_size` must be"),
        (lambda: MinibatchSharpnessMonitor(num_batches=0), "`num_batches` must be"),
        (lambda: PreconditionedSharpnessMonitor(k=0), "`k` must be an integer"),
        (
            lambda: SpectralDensityMonitor(figure="abc"),
            "`figure` must be True or False, got 'abc'",
        ),
        (
            lambda: SpectralDensityMonitor(figure=None),
            "`figure` must be True or False, got None",
        ),
        (
            lambda: StepProgressBar(refresh_rate="abc"),
            "`refresh_rate` must be an integer of at least 0, got 'abc'",
        ),
        (
            lambda: StepProgressBar(refresh_rate=-1),
            "`refresh_rate` must be an integer of at least 0, got -1",
        ),
        (
            lambda: StepProgressBar(refresh_rate=1.5),
            "`refresh_rate` must be an integer of at least 0, got 1.5",
        ),
        (
            lambda: StepProgressBar(leave=[1]),
            r"`leave` must be True or False, got \[1\]",
        ),
        (
            lambda: StepProgressBar(leave=None),
            "`leave` must be True or False, got None",
        ),
    ],
    ids=[
        "trace-method",
        "trace-products",
        "bins",
        "batch-size",
        "batches",
        "k",
        "density-figure-str",
        "density-figure-none",
        "bar-refresh-rate-str",
        "bar-refresh-rate-negative",
        "bar-refresh-rate-float",
        "bar-leave-list",
        "bar-leave-none",
    ],
)
def test_bad_arguments_are_refused_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_hidden_progress_bar_is_accepted():
    assert StepProgressBar(refresh_rate=0, leave=False).is_disabled


CALLBACKS = {
    "sharpness": SharpnessMonitor,
    "third-order": ThirdOrderMonitor,
    "trace": HessianTraceMonitor,
    "density": SpectralDensityMonitor,
    "minibatch": MinibatchSharpnessMonitor,
    "preconditioned": PreconditionedSharpnessMonitor,
    "flows": FlowMonitor,
    "penalty": lambda **options: PenaltyCallback(GradientNormPenalty(), **options),
}
SHARED_ARGUMENTS = {
    "seed-negative": (
        {"seed": -1},
        r"`seed` must be an integer in \[0, 4294967295\], got -1",
    ),
    "seed-nan": ({"seed": math.nan}, "`seed` must be an integer in .*, got nan"),
    "seed-str": ({"seed": "abc"}, "`seed` must be an integer in .*, got 'abc'"),
    "seed-none": ({"seed": None}, "`seed` must be an integer in .*, got None"),
    "seed-huge": ({"seed": 2**64}, "`seed` must be an integer in .*, got 1844"),
    "dtype-list": (
        {"dtype": [1]},
        r"`dtype` must be one of \(None, 'float32', 'float64'\), got \[1\]",
    ),
    "dtype-float16": ({"dtype": "float16"}, "`dtype` must be one of .*'float16'"),
}


@pytest.mark.parametrize(
    ("options", "message"), SHARED_ARGUMENTS.values(), ids=SHARED_ARGUMENTS
)
@pytest.mark.parametrize("make", CALLBACKS.values(), ids=CALLBACKS)
def test_every_callback_checks_its_seed_and_dtype(make, options, message):
    with pytest.raises(ValueError, match=message):
        make(**options)


def test_tensorboard_shows_the_probes(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="run")
    density = SpectralDensityMonitor(
        num_probes=2,
        num_steps=12,
        figure=True,
        every_n_steps=2,
        loss_fn=half_squared_error,
    )
    trace = HessianTraceMonitor(
        every_n_steps=2, num_products=12, loss_fn=half_squared_error
    )
    third = ThirdOrderMonitor(
        every_n_steps=2, threshold=0.5, loss_fn=half_squared_error
    )
    torch.manual_seed(0)
    run = trainer(tmp_path, [density, trace, third], 4, logger=logger)
    run.fit(Regressor(), loader(regression_data()))

    (path,) = glob.glob(f"{tmp_path}/run/**/events.out.tfevents.*", recursive=True)
    events = EventAccumulator(
        path, size_guidance={"scalars": 0, "histograms": 0, "images": 0}
    )
    events.Reload()
    histograms = events.Histograms("spectrum/density")
    assert [h.step for h in histograms] == [0, 2, 4]
    assert histograms[0].histogram_value.num == pytest.approx(74, rel=1e-9)
    assert [i.step for i in events.Images("spectrum/figure")] == [0, 2, 4]
    scalars = set(events.Tags()["scalars"])
    assert {"trace/estimate", "trace/stderr", "selfstab/x", "selfstab/y"} <= scalars
    assert {"block/net.0.weight/third", "spectrum/negative_mass"} <= scalars
    estimates = [e.value for e in events.Scalars("trace/estimate")]
    assert estimates == pytest.approx([r.trace for r in trace.history], rel=1e-6)


def test_minibatch_quantities_match_dense_minibatch_hessians(tmp_path):
    torch.manual_seed(0)
    monitor = MinibatchSharpnessMonitor(
        num_batches=3, every_n_steps=2, tol=1e-10, loss_fn=half_squared_error
    )
    module = Regressor(lr=0.1)
    run = trainer(tmp_path, [monitor], 2)
    run.fit(module, loader(regression_data(), batch_size=16, shuffle=True))

    record = monitor.history[-1]
    assert record.threshold == pytest.approx(2 / 0.1)
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    inputs, targets = regression_data().tensors
    for indices, top, along in zip(
        record.indices, record.minibatch_sharpness, record.batch_sharpness, strict=True
    ):
        assert len(indices) == 16

        def loss(t, x=inputs[indices], y=targets[indices]):
            params = {
                n: p.reshape(s)
                for n, p, s in zip(names, torch.split(t, sizes), shapes, strict=True)
            }
            return half_squared_error(functional_call(module, params, (x,)), y)

        hessian = torch.autograd.functional.hessian(loss, theta)
        gradient = torch.autograd.functional.jacobian(loss, theta)
        assert top == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-8)
        expected = gradient @ hessian @ gradient / (gradient @ gradient)
        assert along == pytest.approx(float(expected), rel=1e-9)
    assert len({tuple(i.tolist()) for i in record.indices}) == 3
    assert not math.isnan(record.full_sharpness)


class Diverge(Callback):
    """Plays a run that blows up: a weight becomes NaN after step 4."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 4:
            with torch.no_grad():
                pl_module.net[0].weight[0, 0] = float("nan")


def test_a_diverged_run_is_logged_as_nan_and_warned_about_once(tmp_path):
    probes = all_probes(every=2)
    pl.seed_everything(3, verbose=False)
    run = trainer(tmp_path, [Diverge(), *probes], 8)
    with pytest.warns(UserWarning) as record:
        run.fit(Regressor(optimizer="adam", lr=0.05), loader(regression_data()))

    assert run.global_step == 8
    messages = [str(w.message) for w in record if "not finite" in str(w.message)]
    for probe in probes:
        name = type(probe).__name__
        assert sum(m.startswith(name) for m in messages) == 1, name
    assert math.isnan(probes[1].history[-1].grad_sharpness_norm)
    assert math.isnan(probes[2].history[-1].trace)
    assert not probes[3].history[-1].density.finite


def test_sharpness_monitor_points_adam_users_to_the_preconditioned_sharpness(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=1, loss_fn=half_squared_error)
    run = trainer(tmp_path, [monitor], 1)
    with pytest.warns(UserWarning, match="add PreconditionedSharpnessMonitor"):
        run.fit(Regressor(optimizer="adam"), loader(regression_data()))


def test_preconditioned_k_above_the_parameter_count(tmp_path):
    monitor = PreconditionedSharpnessMonitor(k=75, loss_fn=half_squared_error)
    with pytest.raises(ValueError, match="`k` = 75 exceeds the number of trainable"):
        train(tmp_path, [monitor], steps=1)


def test_a_measurement_changes_nothing(tmp_path):
    probes = all_probes(every=100)
    module, run = train(tmp_path, probes, steps=3, batch_norm=True, dropout=0.2)
    module.net[0].eval()  # a mix of train and eval flags
    for p in module.parameters():
        p.grad = torch.randn_like(p)

    for probe in probes:
        before = Snapshot.state(run, module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe._measure(run, module)
        after = Snapshot.state(run, module)
        assert all(equal_states(before, after).values()), type(probe).__name__
        assert len(probe.history) >= 1, type(probe).__name__
