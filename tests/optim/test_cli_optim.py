"""LightningCLI builds every optimizer from YAML and documents its arguments."""

import sys

import pytest
import yaml

from lightning_eos.cli import main
from lightning_eos.optim import SAM, ClosureOptimizer

QUIET = {
    "max_steps": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "limit_val_batches": 0,
}

CONFIGS = {
    "sam-class-and-kwargs": {
        "class_path": "lightning_eos.optim.SAM",
        "init_args": {
            "base_optimizer": "torch.optim.SGD",
            "lr": 0.1,
            "rho": 0.05,
            "base_kwargs": {"momentum": 0.9, "weight_decay": 5e-4},
        },
    },
    "sam-nested-class-path": {
        "class_path": "SAM",
        "init_args": {
            "rho": 0.1,
            "adaptive": True,
            "base_optimizer": {
                "class_path": "torch.optim.Adam",
                "init_args": {"lr": 0.01, "betas": [0.8, 0.99]},
            },
        },
    },
    "gsam": {
        "class_path": "lightning_eos.optim.GSAM",
        "init_args": {"lr": 0.1, "alpha": 0.2},
    },
    "newton-cg": {
        "class_path": "NewtonCG",
        "init_args": {"damping": 0.5, "max_cg_iter": 3},
    },
    "hessian-free": {
        "class_path": "HessianFree",
        "init_args": {"curvature": "gauss_newton", "max_cg_iter": 3},
    },
    "cubic": {
        "class_path": "CubicNewton",
        "init_args": {"sigma": 2.0, "max_subproblem_iter": 3},
    },
    "gauss-newton": {
        "class_path": "GaussNewton",
        "init_args": {"damping": 0.1, "max_cg_iter": 3},
    },
    "grouped-newton": {
        "class_path": "GroupedNewton",
        "init_args": {"regularization": 2.0},
    },
}


@pytest.fixture(autouse=True)
def bare_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-eos"])


@pytest.fixture
def built(monkeypatch):
    """The closure optimizers the CLI builds."""
    seen = []
    original = ClosureOptimizer.__init__

    def recording_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(ClosureOptimizer, "__init__", recording_init)
    return seen


@pytest.mark.parametrize("optimizer", CONFIGS.values(), ids=CONFIGS)
def test_fit_builds_the_optimizer_from_yaml(tmp_path, built, optimizer):
    config = {
        "seed_everything": 0,
        "model": {"class_path": "MLP", "init_args": {"hidden_dims": [8]}},
        "data": {"class_path": "DigitsDataModule", "init_args": {"batch_size": 64}},
        "optimizer": optimizer,
        "trainer": {**QUIET, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])

    (instance,) = built
    assert type(instance).__name__ == optimizer["class_path"].rsplit(".", 1)[-1]
    assert instance.counters["steps"] == 1
    for key, value in optimizer["init_args"].items():
        if key in instance.param_groups[0] and not isinstance(value, dict):
            assert instance.param_groups[0][key] == value


def test_nested_base_optimizer_keeps_its_own_arguments(tmp_path, built):
    config = {
        "model": {"class_path": "MLP", "init_args": {"hidden_dims": [8]}},
        "data": {"class_path": "DigitsDataModule", "init_args": {"batch_size": 64}},
        "optimizer": CONFIGS["sam-nested-class-path"],
        "trainer": {**QUIET, "default_root_dir": str(tmp_path)},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])

    (instance,) = built
    assert isinstance(instance, SAM)
    assert type(instance.base_optimizer).__name__ == "Adam"
    group = instance.base_optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["rho"]) == (
        0.01,
        (0.8, 0.99),
        0.1,
    )


def test_flags_build_sam_without_a_file(tmp_path, built):
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
            "SAM",
            "--optimizer.lr",
            "0.05",
            "--optimizer.rho",
            "0.2",
            "--optimizer.base_optimizer",
            "torch.optim.SGD",
            *[
                f"--trainer.{k}={str(v).lower() if isinstance(v, bool) else v}"
                for k, v in QUIET.items()
            ],
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    (instance,) = built
    assert (instance.param_groups[0]["lr"], instance.param_groups[0]["rho"]) == (
        0.05,
        0.2,
    )


HELP = {
    "fit": (
        ["fit", "--help"],
        ["lightning_eos.optim.SAM", "lightning_eos.optim.NewtonCG"],
    ),
    "sam": (
        ["fit", "--optimizer.help", "SAM"],
        [
            "--optimizer.rho",
            "--optimizer.base_optimizer",
            "--optimizer.base_kwargs",
            "{all,weights,none}",
        ],
    ),
    "newton-cg": (
        ["fit", "--optimizer.help", "NewtonCG"],
        ["--optimizer.damping", "--optimizer.cg_tol", "{exact,finite_difference}"],
    ),
    "cubic": (
        ["fit", "--optimizer.help", "CubicNewton"],
        ["--optimizer.sigma", "{krylov,gradient_descent}"],
    ),
    "grouped": (
        ["fit", "--optimizer.help", "GroupedNewton"],
        [
            "--optimizer.regularization",
            "{tensor,param_group,single}",
            "of the cubic",
        ],
    ),
}


@pytest.mark.parametrize(("args", "expected"), HELP.values(), ids=HELP)
def test_help_documents_the_arguments(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    for text in expected:
        assert text in output
