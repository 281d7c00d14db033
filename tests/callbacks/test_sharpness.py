import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_eos.callbacks import SharpnessMonitor

from .modules import (
    Regressor,
    RegressorWithCurvatureLoss,
    half_squared_error,
    loader,
    regression_data,
    trainer,
)


def dense_top_eigenvalues(module, dataset, k):
    names = [n for n, p in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    inputs, targets = dataset.tensors

    def loss(theta):
        params = {
            n: t.reshape(s)
            for n, t, s in zip(names, torch.split(theta, sizes), shapes, strict=True)
        }
        return half_squared_error(functional_call(module, params, (inputs,)), targets)

    theta = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    H = torch.autograd.functional.hessian(loss, theta)
    return torch.linalg.eigvalsh(H).flip(0)[:k]


def fit(tmp_path, module, callbacks, steps, dataset=None, **kwargs):
    dataset = dataset if dataset is not None else regression_data()
    batch_size = kwargs.pop("batch_size", None)
    shuffle = kwargs.pop("shuffle", False)
    run = trainer(tmp_path, callbacks, steps, **kwargs)
    run.fit(module, loader(dataset, batch_size, shuffle))
    return run


def test_measures_on_schedule_and_matches_dense_hessian(tmp_path):
    torch.manual_seed(0)
    module = Regressor(lr=0.05)
    monitor = SharpnessMonitor(
        k=3, every_n_steps=5, loss_fn=half_squared_error, tol=1e-10
    )
    fit(tmp_path, module, [monitor], steps=20)

    assert [r.step for r in monitor.history] == [0, 5, 10, 15, 20]
    assert all(r.converged for r in monitor.history)
    final = monitor.history[-1]
    expected = dense_top_eigenvalues(module, regression_data(), 3)
    torch.testing.assert_close(
        torch.tensor(final.eigenvalues, dtype=torch.float64),
        expected,
        rtol=1e-8,
        atol=0,
    )
    assert final.threshold == pytest.approx(2 / 0.05)


def test_curvature_loss_method_is_used_without_loss_fn(tmp_path):
    torch.manual_seed(0)
    with_method = RegressorWithCurvatureLoss(lr=0.05)
    monitor = SharpnessMonitor(k=1, every_n_steps=5, tol=1e-10)
    fit(tmp_path, with_method, [monitor], steps=5)
    expected = dense_top_eigenvalues(with_method, regression_data(), 1)
    assert monitor.history[-1].eigenvalues[0] == pytest.approx(
        expected.item(), rel=1e-8
    )


def test_probe_subset_and_chunks(tmp_path):
    torch.manual_seed(0)
    monitor = SharpnessMonitor(
        every_n_steps=5, probe_size=40, chunk_size=16, loss_fn=half_squared_error
    )
    fit(tmp_path, Regressor(), [monitor], steps=1, batch_size=8, shuffle=True)
    assert monitor.probe.size == 40
    assert [len(chunk[0]) for chunk in monitor.probe.chunks] == [16, 16, 8]
    assert len(set(monitor.probe.indices.tolist())) == 40

    whole = SharpnessMonitor(
        every_n_steps=5, probe_size=1000, loss_fn=half_squared_error
    )
    fit(tmp_path, Regressor(), [whole], steps=1)
    assert whole.probe.size == 64


def test_iterable_dataset_gives_first_examples(tmp_path):
    data = regression_data()

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(*data.tensors, strict=True)

    torch.manual_seed(0)
    monitor = SharpnessMonitor(
        every_n_steps=5, probe_size=20, chunk_size=8, loss_fn=half_squared_error
    )
    run = trainer(tmp_path, [monitor], 1)
    run.fit(Regressor(), DataLoader(Stream(), batch_size=16))
    assert monitor.probe.size == 20 and monitor.probe.indices is None
    torch.testing.assert_close(monitor.probe.chunks[0][0], data.tensors[0][:8])


class Snapshot(Callback):
    """What a measurement must not change, recorded before and after it."""

    def __init__(self):
        self.equal = []

    @staticmethod
    def state(trainer, module):
        optimizer = trainer.optimizers[0]
        return {
            "params": [p.detach().clone() for p in module.parameters()],
            "grads": [
                None if p.grad is None else p.grad.clone() for p in module.parameters()
            ],
            "buffers": [b.clone() for b in module.buffers()],
            "optimizer": [
                {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                for s in optimizer.state.values()
            ],
            "rng": torch.get_rng_state(),
            "flags": [m.training for m in module.modules()],
        }


def equal_states(a, b):
    def same(x, y):
        if torch.is_tensor(x):
            return torch.equal(x, y)
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, list):
            return len(x) == len(y) and all(
                same(u, v) for u, v in zip(x, y, strict=True)
            )
        return x == y

    return {key: same(a[key], b[key]) for key in a}


@pytest.mark.filterwarnings("ignore:SharpnessMonitor probes the module in train mode")
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_measurement_changes_nothing(tmp_path, mode):
    torch.manual_seed(0)
    module = Regressor(momentum=0.9, batch_norm=True, dropout=0.2)
    monitor = SharpnessMonitor(
        every_n_steps=1000, mode=mode, loss_fn=half_squared_error
    )
    run = fit(tmp_path, module, [monitor], steps=3, batch_size=16)
    module.net[0].eval()  # a mix of train and eval flags
    for p in module.parameters():
        p.grad = torch.randn_like(p)

    before = Snapshot.state(run, module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitor._measure(run, module)
    after = Snapshot.state(run, module)

    assert len(monitor.history) == 2
    assert all(equal_states(before, after).values()), equal_states(before, after)


def train_losses(tmp_path, callbacks, **module_kwargs):
    pl.seed_everything(7, verbose=False)
    module = Regressor(**module_kwargs)
    run = fit(tmp_path, module, callbacks, steps=24, batch_size=16, shuffle=True)
    return module.losses, [p.detach().clone() for p in module.parameters()], run


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_training_is_bit_identical_with_and_without_monitor(tmp_path, mode):
    options = {"momentum": 0.9, "batch_norm": True, "dropout": 0.3}
    losses, params, _ = train_losses(tmp_path, [], **options)
    monitor = SharpnessMonitor(
        k=2,
        every_n_steps=3,
        probe_size=30,
        chunk_size=16,
        mode=mode,
        loss_fn=half_squared_error,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitored, monitored_params, _ = train_losses(tmp_path, [monitor], **options)
    assert len(monitor.history) == 9
    assert losses == monitored
    assert all(torch.equal(a, b) for a, b in zip(params, monitored_params, strict=True))


def test_dropout_warns_once_in_train_mode(tmp_path):
    torch.manual_seed(0)
    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="fixes one dropout mask per chunk") as record:
        fit(tmp_path, Regressor(dropout=0.5), [monitor], steps=4)
    assert sum("dropout mask" in str(w.message) for w in record) == 1


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 2 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 3.8 / 0.1),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 3.8 / 0.28),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 3 / 0.05),
        (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.01), 20 - 0.01),
    ],
    ids=["gd", "heavy-ball", "nesterov", "ema", "weight-decay"],
)
def test_logged_threshold_follows_the_optimizer(tmp_path, optimizer, expected):
    class Module(Regressor):
        def configure_optimizers(self):
            return optimizer(self.parameters())

    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=half_squared_error)
    fit(tmp_path, Module(lr=0.01), [monitor], steps=2)
    assert monitor.history[-1].threshold == pytest.approx(expected, rel=1e-12)


def test_threshold_pairs_with_the_learning_rate_that_made_the_step(tmp_path):
    class Scheduled(Regressor):
        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: 1 / (1 + s)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"},
            }

    monitor = SharpnessMonitor(every_n_steps=1, loss_fn=half_squared_error)
    fit(tmp_path, Scheduled(), [monitor], steps=4, batch_size=16)
    # Step s (1-based) was taken with lr = 0.1 / s; the measurement after it is
    # logged at global_step = s and must use that learning rate.
    thresholds = {r.step: r.threshold for r in monitor.history}
    assert thresholds[0] == pytest.approx(2 / 0.1)
    for step in (1, 2, 3, 4):
        assert thresholds[step] == pytest.approx(2 / (0.1 / step))


def test_adam_logs_no_threshold_and_says_why_once(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=1, loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="preconditioned Hessian") as record:
        fit(tmp_path, Regressor(optimizer="adam", lr=1e-3), [monitor], steps=3)
    assert sum("no stability threshold" in str(w.message) for w in record) == 1
    assert all(r.threshold is None for r in monitor.history)
    assert len(monitor.history) == 4


def test_gradient_accumulation_measures_at_optimizer_steps(tmp_path):
    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=half_squared_error)
    fit(
        tmp_path,
        Regressor(),
        [monitor],
        steps=6,
        batch_size=16,
        accumulate_grad_batches=2,
    )
    assert [r.step for r in monitor.history] == [0, 2, 4, 6]


def test_non_finite_loss_is_logged_and_warned_once(tmp_path):
    class Diverge(Callback):
        """Plays a run that blows up: a weight becomes NaN after step 4."""

        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                with torch.no_grad():
                    pl_module.net[0].weight[0, 0] = float("nan")

    torch.manual_seed(0)
    module = Regressor()
    monitor = SharpnessMonitor(every_n_steps=2, loss_fn=half_squared_error)
    with pytest.warns(UserWarning, match="not finite") as record:
        run = fit(tmp_path, module, [Diverge(), monitor], steps=10)
    assert run.global_step == 10
    assert sum("not finite" in str(w.message) for w in record) == 1
    values = [r.eigenvalues[0] for r in monitor.history]
    assert [math.isfinite(v) for v in values] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert math.isnan(module.losses[-1])


def test_unconverged_measurement_warns(tmp_path):
    torch.manual_seed(0)
    monitor = SharpnessMonitor(
        every_n_steps=1, tol=1e-12, max_iter=1, loss_fn=half_squared_error
    )
    with pytest.warns(UserWarning, match="Lanczos stopped after 1 steps"):
        fit(tmp_path, Regressor(width=32), [monitor], steps=1)
    assert not monitor.history[0].converged


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "`k` must be an integer of at least 1, got 0"),
        (
            {"every_n_steps": 0},
            "`every_n_steps` must be an integer of at least 1, got 0",
        ),
        ({"probe_size": 0}, "`probe_size` must be an integer of at least 1, got 0"),
        ({"chunk_size": -1}, "`chunk_size` must be an integer of at least 1, got -1"),
        ({"tol": 0}, r"`tol` must be a finite number in \(0, 1\), got 0"),
        ({"max_iter": 0}, "`max_iter` must be an integer of at least 1, got 0"),
        ({"extra_vectors": -1}, "`extra_vectors` must be an integer of at least 0"),
        ({"mode": "test"}, "`mode` must be 'train' or 'eval', got 'test'"),
        (
            {"dtype": "float16"},
            r"`dtype` must be one of \(None, 'float32', 'float64'\), got 'float16'",
        ),
        ({"dtype": [1]}, r"`dtype` must be one of .*, got \[1\]"),
        ({"dtype": torch.float64}, "`dtype` must be one of .*, got torch.float64"),
        ({"loss_fn": 3}, "`loss_fn` must be callable, got int"),
        ({"seed": 1.5}, r"`seed` must be an integer in \[0, 4294967295\], got 1.5"),
        ({"seed": -1}, r"`seed` must be an integer in \[0, 4294967295\], got -1"),
        (
            {"seed": math.nan},
            r"`seed` must be an integer in \[0, 4294967295\], got nan",
        ),
        ({"seed": "abc"}, r"`seed` must be an integer in \[0, 4294967295\], got 'abc'"),
        ({"seed": None}, r"`seed` must be an integer in \[0, 4294967295\], got None"),
        ({"seed": True}, r"`seed` must be an integer in \[0, 4294967295\], got True"),
        (
            {"seed": 2**32},
            r"`seed` must be an integer in \[0, 4294967295\], got 4294967296",
        ),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SharpnessMonitor(**kwargs)


def test_module_without_trainable_parameters(tmp_path):
    module = Regressor()
    module.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="has no trainable parameter"):
        fit(tmp_path, module, [SharpnessMonitor(loss_fn=half_squared_error)], steps=1)


def test_no_way_to_compute_the_loss(tmp_path):
    with pytest.raises(
        MisconfigurationException, match=r"pass `loss_fn=`.*curvature_loss"
    ):
        fit(tmp_path, Regressor(), [SharpnessMonitor()], steps=1)


def test_k_larger_than_parameter_count(tmp_path):
    with pytest.raises(
        ValueError, match="`k` = 500 exceeds the number of trainable parameters"
    ):
        fit(
            tmp_path,
            Regressor(),
            [SharpnessMonitor(k=500, loss_fn=half_squared_error)],
            steps=1,
        )


def test_probe_set_that_cannot_be_drawn(tmp_path):
    class Broken(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            raise OSError("disk unplugged")

    run = trainer(tmp_path, [SharpnessMonitor(loss_fn=half_squared_error)], 1)
    with pytest.raises(
        MisconfigurationException, match=r"could not draw its probe set.*disk unplugged"
    ):
        run.fit(Regressor(), DataLoader(Broken(), batch_size=4))


def test_sharding_strategy_is_refused():
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        strategy = FSDPStrategy()

    monitor = SharpnessMonitor(loss_fn=half_squared_error)
    with pytest.raises(
        MisconfigurationException, match="strategy FSDPStrategy shards them"
    ):
        monitor.setup(FakeTrainer(), Regressor(), "fit")
