"""The flows example, shortened: it parses and runs through the command line."""

import sys
from pathlib import Path

import pytest
import torch

from lightning_eos.callbacks import FlowMonitor
from lightning_eos.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_flows.yaml"


@pytest.fixture(autouse=True)
def bare_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-eos"])


def test_flows_example_is_gradient_flow_below_the_threshold(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monitors = []
    setup = FlowMonitor.setup

    def recording_setup(self, trainer, pl_module, stage):
        monitors.append(self)
        return setup(self, trainer, pl_module, stage)

    monkeypatch.setattr(FlowMonitor, "setup", recording_setup)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--trainer.max_steps",
                "20",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_checkpointing",
                "false",
            ]
        )
    finally:
        torch.set_num_threads(threads)
    (monitor,) = monitors
    assert monitor.flow_names == ("gradient", "central")
    assert [r.step for r in monitor.history] == list(range(21))
    first = monitor.history[0]
    assert first.gd_sharpness == pytest.approx(3.98, abs=0.01)  # as in the main job
    assert first.flows["central"].loss == pytest.approx(first.gd_loss, rel=1e-6)
    # λ₁ ≈ 4 ≪ 2/η = 10: the central flow is gradient flow, bit for bit (Σ = 0).
    for record in monitor.history:
        central, gradient = record.flows["central"], record.flows["gradient"]
        assert central.critical == 0
        assert central.loss == gradient.loss
        assert record.distances.get("central") == record.distances.get("gradient")
    last = monitor.history[-1]
    assert last.flows["central"].loss < first.flows["central"].loss
