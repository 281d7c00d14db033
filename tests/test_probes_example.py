"""The probes example, shortened: every probe runs from the YAML and logs."""

import glob
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_eos.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_probes.yaml"


def test_probes_example_runs_and_logs_every_probe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-eos"])
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--model.hidden_dims",
            "[16]",
            "--trainer.max_steps",
            "10",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    (path,) = glob.glob(
        f"{tmp_path}/lightning_logs/**/events.out.tfevents.*", recursive=True
    )
    events = EventAccumulator(path, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    for tag in (
        "sharpness/lambda_1",
        "third_order/grad_sharpness_norm",
        "selfstab/alpha",
        "block/network.0.weight/third",
        "trace/estimate",
        "spectrum/lambda_max",
        "minibatch/batch_sharpness",
    ):
        assert tag in scalars, tag
    assert [e.step for e in events.Scalars("third_order/T111")] == [0, 10]
    assert [e.step for e in events.Scalars("block/network.0.weight/third")] == [10]
    assert [h.step for h in events.Histograms("spectrum/density")] == [0]
