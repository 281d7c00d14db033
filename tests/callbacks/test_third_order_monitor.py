import math
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.func import functional_call

import lightning_eos.callbacks._shared as shared
import lightning_eos.callbacks.sharpness as sharpness
from lightning_eos.callbacks import SharpnessMonitor, ThirdOrderMonitor

from .modules import Regressor, half_squared_error, loader, regression_data, trainer


class Parameters(Callback):
    """Records the flat parameters before every step."""

    def __init__(self):
        self.before = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step] = torch.cat(
            [p.detach().reshape(-1) for p in pl_module.parameters()]
        ).clone()


def dense_quantities(module, dataset):
    """Loss gradient, Hessian, and θ ↦ L(θ), independently of the package."""
    names = [n for n, _ in module.named_parameters()]
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
    return loss, theta


def test_logged_quantities_match_a_dense_computation(tmp_path):
    torch.manual_seed(0)
    module = Regressor(lr=0.1)
    recorder = Parameters()
    monitor = ThirdOrderMonitor(
        k=2,
        tensor=True,
        every_n_steps=4,
        tol=1e-10,
        max_iter=80,
        threshold=0.5,  # below the initial sharpness: θ* is the first point
        loss_fn=half_squared_error,
    )
    run = trainer(tmp_path, [recorder, monitor], 8)
    run.fit(module, loader(regression_data()))

    assert [r.step for r in monitor.history] == [0, 4, 8]
    assert monitor.reference_step == 0
    record = monitor.history[-1]
    loss, theta = dense_quantities(module, regression_data())
    point = theta.clone().requires_grad_()
    hessian = torch.autograd.functional.hessian(
        loss, point, create_graph=True, vectorize=True
    )
    values, vectors = torch.linalg.eigh(hessian.detach())
    u1, u2 = vectors[:, -1], vectors[:, -2]
    (gradient_s,) = torch.autograd.grad(u1 @ hessian @ u1, point, retain_graph=True)
    (gradient_l,) = torch.autograd.grad(loss(point), point)
    perpendicular = gradient_s - u1 * (u1 @ gradient_s)

    assert record.sharpness == pytest.approx(float(values[-1]), rel=1e-9)
    assert record.grad_sharpness_norm == pytest.approx(
        float(gradient_s.norm()), rel=1e-7
    )
    cosine = gradient_s @ gradient_l / (gradient_s.norm() * gradient_l.norm())
    assert record.cosine == pytest.approx(float(cosine), rel=1e-7)
    assert abs(record.t111) == pytest.approx(abs(float(u1 @ gradient_s)), rel=1e-7)
    assert record.alpha == pytest.approx(-float(gradient_l @ perpendicular), rel=1e-6)
    assert record.beta == pytest.approx(float(perpendicular @ perpendicular), rel=1e-6)
    if record.alpha > 0:
        assert record.delta == pytest.approx(math.sqrt(2 * record.alpha / record.beta))
    # θ*, u₁* and ∇S⊥* are those of the first measurement (λ₁ ≥ threshold there).
    reference, direction, normal = monitor.reference
    torch.testing.assert_close(reference, recorder.before[0], rtol=0, atol=0)
    start = reference.clone().requires_grad_()
    curvature = torch.autograd.functional.hessian(loss, start, create_graph=True)
    u_start = torch.linalg.eigh(curvature.detach())[1][:, -1]
    (gradient_start,) = torch.autograd.grad(u_start @ curvature @ u_start, start)
    normal_start = gradient_start - u_start * (u_start @ gradient_start)
    torch.testing.assert_close(normal, normal_start, rtol=1e-6, atol=1e-8)
    assert abs(float(direction @ u_start)) == pytest.approx(1.0, rel=1e-9)
    offset = theta - reference
    assert record.x == pytest.approx(float(direction @ offset), rel=1e-12)
    assert record.y == pytest.approx(float(normal @ offset), rel=1e-12)
    (t122,) = torch.autograd.grad(u2 @ hessian @ u2, point)
    assert abs(float(record.tensor[1, 1, 0])) == pytest.approx(
        abs(float(t122 @ u1)), rel=1e-6
    )
    # Blocks along the last update d = θ₈ − θ₇: their gradients add up to ∇L·d.
    update = theta - recorder.before[7]
    assert float(record.blocks.gradient.sum()) == pytest.approx(
        float(gradient_l @ update), rel=1e-8
    )
    assert record.blocks.names == [
        "net.0.weight",
        "net.0.bias",
        "net.2.weight",
        "net.2.bias",
    ]
    assert monitor.history[0].blocks is None  # no update before the first step


def count_eigensolves(monkeypatch):
    calls = []
    original = sharpness.lanczos

    def counted(*args, **kwargs):
        calls.append(kwargs.get("max_iter"))
        return original(*args, **kwargs)

    monkeypatch.setattr(sharpness, "lanczos", counted)
    monkeypatch.setattr(shared, "lanczos", counted)
    return calls


@pytest.mark.parametrize("order", ["sharpness-first", "third-order-first"])
def test_eigenpairs_are_computed_once_per_step_in_either_order(
    tmp_path, monkeypatch, order
):
    calls = count_eigensolves(monkeypatch)
    torch.manual_seed(0)
    monitor = SharpnessMonitor(k=2, every_n_steps=3, loss_fn=half_squared_error)
    third = ThirdOrderMonitor(
        every_n_steps=3, block_direction="none", loss_fn=half_squared_error
    )
    callbacks = [monitor, third] if order == "sharpness-first" else [third, monitor]
    run = trainer(tmp_path, callbacks, 6)
    run.fit(Regressor(), loader(regression_data()))

    assert third.source.monitor is monitor
    assert len(calls) == 3  # steps 0, 3 and 6: one solve each
    assert [r.step for r in monitor.history] == [0, 3, 6]
    assert [r.sharpness for r in third.history] == [
        r.eigenvalues[0] for r in monitor.history
    ]


def test_different_probe_settings_solve_their_own_and_say_why(tmp_path, monkeypatch):
    calls = count_eigensolves(monkeypatch)
    monitor = SharpnessMonitor(
        every_n_steps=3, probe_size=32, loss_fn=half_squared_error
    )
    third = ThirdOrderMonitor(
        every_n_steps=3, block_direction="none", loss_fn=half_squared_error
    )
    with pytest.warns(UserWarning, match="differs in probe_size"):
        trainer(tmp_path, [monitor, third], 3).fit(
            Regressor(), loader(regression_data())
        )
    assert third.source.monitor is None
    assert len(calls) == 4


def test_reference_point_waits_for_the_threshold(tmp_path):
    torch.manual_seed(0)
    high = ThirdOrderMonitor(every_n_steps=2, threshold=1e6, loss_fn=half_squared_error)
    run = trainer(tmp_path, [high], 4)
    run.fit(Regressor(), loader(regression_data()))
    assert high.reference is None
    assert all(math.isnan(r.x) and math.isnan(r.y) for r in high.history)
    assert all(not math.isnan(r.grad_sharpness_norm) for r in high.history)


THRESHOLD = r"must be a finite number in \(0, inf\)"
OR_NONE = r"\. None is accepted too\."


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "`k` must be an integer of at least 1, got 0"),
        ({"block_direction": "random"}, "`block_direction` must be 'update'"),
        ({"block_third_order": "cubic"}, "`block_third_order` must be"),
        ({"threshold": -1.0}, f"`threshold` {THRESHOLD}, got -1.0{OR_NONE}"),
        ({"threshold": 0}, f"`threshold` {THRESHOLD}, got 0{OR_NONE}"),
        ({"threshold": math.inf}, f"`threshold` {THRESHOLD}, got inf{OR_NONE}"),
        ({"threshold": math.nan}, f"`threshold` {THRESHOLD}, got nan{OR_NONE}"),
        ({"threshold": True}, f"`threshold` {THRESHOLD}, got True{OR_NONE}"),
        ({"threshold": "abc"}, f"`threshold` {THRESHOLD}, got 'abc'{OR_NONE}"),
        ({"tensor": "abc"}, "`tensor` must be True or False, got 'abc'"),
        ({"tensor": None}, "`tensor` must be True or False, got None"),
        ({"tensor": [1]}, r"`tensor` must be True or False, got \[1\]"),
        ({"eigenpairs": "borrow"}, "`eigenpairs` must be 'auto' or 'own'"),
        ({"tol": 2.0}, r"`tol` must be a finite number in \(0, 1\), got 2.0"),
    ],
    ids=[
        "k",
        "direction",
        "third",
        "threshold-negative",
        "threshold-zero",
        "threshold-inf",
        "threshold-nan",
        "threshold-bool",
        "threshold-str",
        "tensor-str",
        "tensor-none",
        "tensor-list",
        "eigenpairs",
        "tol",
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ThirdOrderMonitor(**kwargs)


def test_a_fixed_threshold_is_kept_as_a_float():
    assert ThirdOrderMonitor(threshold=4).fixed_threshold == 4.0
    assert ThirdOrderMonitor(threshold=None).fixed_threshold is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 500}, "`k` = 500 exceeds the number of trainable parameters"),
        (
            {"block_groups": [["net.0.weight"]]},
            r"`block_groups`.*\['net.0.bias', 'net.2.weight', 'net.2.bias'\] are in no",
        ),
    ],
    ids=["k", "groups"],
)
def test_bad_settings_for_the_module_are_refused_in_setup(tmp_path, kwargs, message):
    monitor = ThirdOrderMonitor(loss_fn=half_squared_error, **kwargs)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=message):
        warnings.simplefilter("ignore")
        trainer(tmp_path, [monitor], 1).fit(Regressor(), loader(regression_data()))
