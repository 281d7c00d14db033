import sys
from pathlib import Path

import pytest

from lightning_eos.cli import main
from lightning_eos.penalties import CentralFlowPenalty, PenaltyCallback

CONFIG = Path(__file__).parents[2] / "examples" / "digits_central_flow.yaml"


def test_example_configuration_builds_and_runs_the_penalty(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-eos"])
    built = []
    setup = PenaltyCallback.setup

    def recording_setup(self, trainer, pl_module, stage):
        built.append(self)
        setup(self, trainer, pl_module, stage)

    monkeypatch.setattr(PenaltyCallback, "setup", recording_setup)
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--model.hidden_dims",
            "[8]",
            "--trainer.max_steps",
            "2",
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    (callback,) = built
    assert isinstance(callback.penalty, CentralFlowPenalty)
    assert callback.penalty.target_lr == pytest.approx(0.2)
    assert [r.step for r in callback.history] == [0, 1]
