"""The main job, shortened: progressive sharpening, then the edge of stability."""

import glob
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_eos.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "digits_eos.yaml"


@pytest.mark.slow
def test_digits_gd_sharpens_then_hovers_at_two_over_eta(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_steps",
            "700",
            "--trainer.enable_checkpointing",
            "false",
        ]
    )
    (path,) = glob.glob(
        f"{tmp_path}/lightning_logs/**/events.out.tfevents.*", recursive=True
    )
    events = EventAccumulator(path, size_guidance={"scalars": 0})
    events.Reload()
    sharpness = events.Scalars("sharpness/lambda_1")
    ratio = events.Scalars("sharpness/ratio")
    threshold = events.Scalars("sharpness/threshold")
    loss = events.Scalars("train/loss")

    assert [e.step for e in sharpness] == list(range(0, 701, 10))
    assert [e.value for e in threshold] == [pytest.approx(10.0)] * len(threshold)
    # Progressive sharpening: the first measurement is below half the threshold.
    assert sharpness[0].value < 5.0
    # The edge of stability over the second half of the run (steps 350 to 700).
    late = [e.value for e in ratio if e.step >= 350]
    assert 0.95 <= sum(late) / len(late) <= 1.10
    assert loss[-1].value < loss[0].value
