import copy

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from lightning_eos.data import DigitsDataModule
from lightning_eos.losses import half_squared_error
from lightning_eos.models import MLP, SmallCNN

# name: (class, keyword arguments, whether it takes images)
MODELS = {
    "mlp-mse": (MLP, {"hidden_dims": (16, 16)}, False),
    "mlp-cross-entropy": (MLP, {"hidden_dims": (16,), "loss": "cross_entropy"}, False),
    "cnn-mse": (SmallCNN, {"channels": (4, 6)}, True),
    "cnn-batch-norm": (SmallCNN, {"channels": (4,), "batch_norm": True}, True),
}


class CurvatureLoss(nn.Module):
    """Calls ``curvature_loss`` the way a probe does, through ``functional_call``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.curvature_loss(batch)


def with_sgd(model_class):
    class WithSGD(model_class):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return WithSGD


def make_batch(images: bool, num_examples: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (num_examples, 1, 8, 8) if images else (num_examples, 64)
    inputs = torch.randn(shape, generator=generator)
    labels = torch.arange(num_examples) % 10
    return inputs, F.one_hot(labels, 10).float()


@pytest.fixture(params=list(MODELS.values()), ids=list(MODELS))
def model_case(request):
    model_class, kwargs, images = request.param
    torch.manual_seed(0)
    return model_class, kwargs, images


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {name: value.clone() for name, value in model.state_dict().items()},
        "grads": [parameter.grad for parameter in model.parameters()],
        "training": [module.training for module in model.modules()],
        "metric_updates": [
            metric.update_count
            for metric in (
                model.train_accuracy,
                model.val_accuracy,
                model.test_accuracy,
            )
        ],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(value, after["state"][name]), name
    assert all(grad is None for grad in after["grads"])
    assert before["training"] == after["training"]
    assert before["metric_updates"] == after["metric_updates"]


SHAPE_CASES = {
    "mlp-flat": (MLP, {}, (5, 64), (5, 10)),
    "mlp-images": (MLP, {}, (5, 1, 8, 8), (5, 10)),
    "mlp-three-classes": (MLP, {"output_dim": 3}, (2, 64), (2, 3)),
    "mlp-linear": (MLP, {"hidden_dims": ()}, (4, 64), (4, 10)),
    "cnn": (SmallCNN, {}, (5, 1, 8, 8), (5, 10)),
    "cnn-rgb": (SmallCNN, {"in_channels": 3, "output_dim": 4}, (2, 3, 5, 7), (2, 4)),
}


@pytest.mark.parametrize(
    ("model_class", "kwargs", "input_shape", "output_shape"),
    SHAPE_CASES.values(),
    ids=SHAPE_CASES,
)
def test_output_shapes(model_class, kwargs, input_shape, output_shape):
    assert model_class(**kwargs)(torch.randn(input_shape)).shape == output_shape


def test_default_mlp_is_fc_tanh():
    model = MLP()
    linear = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert [(layer.in_features, layer.out_features) for layer in linear] == [
        (64, 200),
        (200, 200),
        (200, 10),
    ]
    assert sum(isinstance(module, nn.Tanh) for module in model.modules()) == 2
    assert model.hparams.hidden_dims == (200, 200)
    assert model.hparams.loss == "mse"


def test_cnn_rejects_flat_inputs():
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\); got shape \(3, 64\)"):
        SmallCNN()(torch.randn(3, 64))


@pytest.mark.parametrize("model_class", [MLP, SmallCNN])
def test_mse_one_hot_encodes_labels(model_class):
    model = model_class()
    inputs, targets = make_batch(images=True)
    labels = targets.argmax(dim=1)
    expected = half_squared_error(model(inputs), targets)

    torch.testing.assert_close(model.curvature_loss((inputs, labels)), expected)
    torch.testing.assert_close(model.curvature_loss((inputs, targets)), expected)


def test_cross_entropy_accepts_labels_and_one_hot():
    model = MLP(loss="cross_entropy")
    inputs, targets = make_batch(images=False)
    labels = targets.argmax(dim=1)
    expected = F.cross_entropy(model(inputs), labels)

    torch.testing.assert_close(model.curvature_loss((inputs, labels)), expected)
    torch.testing.assert_close(model.curvature_loss((inputs, targets)), expected)


def test_curvature_loss_is_the_logged_loss(model_case, tmp_path):
    model_class, kwargs, images = model_case
    model = with_sgd(model_class)(**kwargs)
    datamodule = DigitsDataModule(test_fraction=0.2, flatten=not images)
    datamodule.setup("fit")
    train_batch = datamodule.train_dataset.tensors
    val_batch = datamodule.test_dataset.tensors
    initial = copy.deepcopy(model)
    expected_loss = initial.curvature_loss(train_batch)
    predictions = initial(train_batch[0]).argmax(dim=1)
    expected_accuracy = (predictions == train_batch[1].argmax(dim=1)).float().mean()

    trainer = Trainer(
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.callback_metrics

    torch.testing.assert_close(metrics["train/loss"], expected_loss.detach())
    torch.testing.assert_close(metrics["train/accuracy"], expected_accuracy)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(metrics["val/loss"], model.curvature_loss(val_batch))
    assert {"val/accuracy"} <= metrics.keys()


def test_test_step_logs_loss_and_accuracy(tmp_path):
    model = MLP(hidden_dims=(8,))
    datamodule = DigitsDataModule(test_fraction=0.2, targets="labels")
    trainer = Trainer(
        logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    (results,) = trainer.test(model, datamodule=datamodule, verbose=False)

    inputs, labels = datamodule.test_dataset.tensors
    with torch.no_grad():
        outputs = model(inputs)
    accuracy = (outputs.argmax(dim=1) == labels).float().mean().item()
    assert results["test/loss"] == pytest.approx(
        model.criterion(outputs, labels).item()
    )
    assert results["test/accuracy"] == pytest.approx(accuracy)


def test_curvature_loss_under_functional_call(model_case):
    model_class, kwargs, images = model_case
    model = model_class(**kwargs)
    batch = make_batch(images)
    wrapper = CurvatureLoss(model)
    buffers = {name: value.clone() for name, value in wrapper.named_buffers()}
    params = {
        name: value.detach().clone() for name, value in wrapper.named_parameters()
    }
    shifted = {name: (value + 0.05).requires_grad_() for name, value in params.items()}
    reference = copy.deepcopy(model).curvature_loss(batch)
    before = snapshot(model)

    same = functional_call(wrapper, {**params, **buffers}, (batch,))
    moved = functional_call(wrapper, {**shifted, **buffers}, (batch,))
    gradients = torch.autograd.grad(moved, list(shifted.values()))

    torch.testing.assert_close(same, reference)
    assert not torch.isclose(moved, reference)
    assert all(gradient.abs().sum() > 0 for gradient in gradients)
    assert_unchanged(model, before)


# Train-mode BatchNorm updates its running statistics by design, so it is left out.
SIDE_EFFECT_CASES = {
    f"{name}-{mode}": (*MODELS[name], mode == "train")
    for name in MODELS
    for mode in ("train", "eval")
    if not (mode == "train" and MODELS[name][1].get("batch_norm"))
}


@pytest.mark.parametrize(
    ("model_class", "kwargs", "images", "training"),
    SIDE_EFFECT_CASES.values(),
    ids=SIDE_EFFECT_CASES,
)
def test_curvature_loss_has_no_side_effect(
    model_class, kwargs, images, training, monkeypatch
):
    model = model_class(**kwargs).train(training)
    monkeypatch.setattr(model, "log", pytest.fail)
    before = snapshot(model)

    loss = model.curvature_loss(make_batch(images))

    assert loss.ndim == 0 and loss.requires_grad
    assert_unchanged(model, before)


BAD_ARGUMENTS = {
    "mlp-input_dim": (MLP, {"input_dim": 0}, r"`input_dim` .*at least 1, got 0"),
    "mlp-hidden_dims-zero": (MLP, {"hidden_dims": (8, 0)}, r"hidden_dims .*\(8, 0\)"),
    "mlp-hidden_dims-str": (MLP, {"hidden_dims": "200"}, r"hidden_dims .*'200'"),
    "mlp-output_dim": (MLP, {"output_dim": 1}, r"`output_dim` .*at least 2.*got 1"),
    "mlp-activation": (MLP, {"activation": "sigmoid"}, r"activation .*'sigmoid'"),
    "mlp-linear-activation": (
        MLP,
        {"hidden_dims": (), "activation": "relu6"},
        r"activation must be one of .*got 'relu6'",
    ),
    "mlp-loss": (MLP, {"loss": "l2"}, r"loss must be one of .*got 'l2'"),
    "cnn-in_channels": (SmallCNN, {"in_channels": 0}, r"`in_channels` .*got 0"),
    "cnn-channels-empty": (SmallCNN, {"channels": ()}, r"channels must be a non-empty"),
    "cnn-loss": (SmallCNN, {"loss": "hinge"}, r"loss must be one of .*'hinge'"),
    "mlp-bias-str": (MLP, {"bias": "abc"}, r"`bias` must be True or False, got 'abc'"),
    "mlp-bias-none": (MLP, {"bias": None}, r"`bias` must be True or False, got None"),
    "cnn-batch_norm-int": (
        SmallCNN,
        {"batch_norm": 1},
        r"`batch_norm` must be True or False, got 1",
    ),
    "cnn-batch_norm-list": (
        SmallCNN,
        {"batch_norm": [1]},
        r"`batch_norm` must be True or False, got \[1\]",
    ),
}


@pytest.mark.parametrize(
    ("model_class", "kwargs", "match"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS
)
def test_bad_arguments_raise(model_class, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_class(**kwargs)
