import sys

import pytest
import yaml

from lightning_eos.cli import main
from lightning_eos.models import MLP

QUIET_TRAINER = [
    "--trainer.logger",
    "false",
    "--trainer.enable_checkpointing",
    "false",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(autouse=True)
def bare_command_line(monkeypatch):
    """Keep pytest's own arguments out of sys.argv, where LightningCLI looks too."""
    monkeypatch.setattr(sys, "argv", ["lightning-eos"])


@pytest.fixture
def recorded_steps(monkeypatch):
    """The training loss and the learning rate of every step of ``MLP`` models."""
    steps = []
    training_step = MLP.training_step

    def recording_training_step(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        learning_rate = self.trainer.optimizers[0].param_groups[0]["lr"]
        steps.append((loss.item(), learning_rate))
        return loss

    monkeypatch.setattr(MLP, "training_step", recording_training_step)
    return steps


def test_fit_from_arguments(tmp_path, recorded_steps):
    main(
        [
            "fit",
            "--seed_everything",
            "0",
            "--model",
            "lightning_eos.models.MLP",
            "--data",
            "lightning_eos.data.DigitsDataModule",
            "--optimizer",
            "torch.optim.SGD",
            "--optimizer.lr",
            "0.1",
            "--trainer.max_steps",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path),
            *QUIET_TRAINER,
        ]
    )
    losses = [loss for loss, _ in recorded_steps]

    assert len(losses) == 3
    assert losses[2] < losses[1] < losses[0]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "lightning_eos.models.MLP"
    assert saved["optimizer"]["init_args"]["lr"] == 0.1


def test_fit_from_config_file(tmp_path, recorded_steps):
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightning_eos.models.MLP",
            "init_args": {"hidden_dims": [32], "loss": "cross_entropy"},
        },
        "data": {
            "class_path": "lightning_eos.data.DigitsDataModule",
            "init_args": {"targets": "labels"},
        },
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.4}},
        "lr_scheduler": {
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 1, "gamma": 0.5},
        },
        "trainer": {
            "max_steps": 3,
            "default_root_dir": str(tmp_path),
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
        },
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))

    main(["fit", "--config", str(path)])
    losses = [loss for loss, _ in recorded_steps]

    assert losses[2] < losses[1] < losses[0]
    # One full batch per epoch, so StepLR halves the step size after every step.
    assert [learning_rate for _, learning_rate in recorded_steps] == [0.4, 0.2, 0.1]


def test_package_callbacks_resolve(tmp_path, recorded_steps):
    main(
        [
            "fit",
            "--model",
            "MLP",
            "--model.hidden_dims",
            "[8]",
            "--data",
            "DigitsDataModule",
            "--optimizer",
            "SGD",
            "--optimizer.lr",
            "0.1",
            "--trainer.callbacks",
            "lightning_eos.callbacks.SharpnessMonitor",
            "--trainer.callbacks.every_n_steps",
            "1",
            "--trainer.callbacks.probe_size",
            "64",
            "--trainer.max_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path),
            *QUIET_TRAINER,
        ]
    )

    assert len(recorded_steps) == 1
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (callback,) = saved["trainer"]["callbacks"]
    assert callback["class_path"] == "lightning_eos.callbacks.SharpnessMonitor"
    assert saved["model"]["init_args"]["hidden_dims"] == [8]


HELP_CASES = {
    "fit": (["fit", "--help"], ["--optimizer", "--lr_scheduler", "--model", "--data"]),
    "known-classes": (
        ["fit", "--help"],
        ["lightning_eos.models.MLP", "lightning_eos.data.DigitsDataModule"],
    ),
    "model": (
        ["fit", "--model.help", "MLP"],
        ["--model.hidden_dims", "--model.activation", "{tanh,relu,elu,gelu}"],
    ),
    "data": (
        ["fit", "--data.help", "DigitsDataModule"],
        ["--data.batch_size", "--data.test_fraction", "{one_hot,labels}"],
    ),
}


@pytest.mark.parametrize(("args", "expected"), HELP_CASES.values(), ids=HELP_CASES)
def test_help(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)

    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for text in expected:
        assert text in output
