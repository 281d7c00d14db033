import json
from pathlib import Path

import pytest

from tests.ddp import run_script

from .ddp_flows_run import main

SCRIPT = Path(__file__).with_name("ddp_flows_run.py")


def run(tmp_path, devices):
    output = tmp_path / f"flows-{devices}.json"
    run_script(SCRIPT, str(output), str(devices), cwd=tmp_path, timeout=300)
    return json.loads(output.read_text())


@pytest.mark.ddp
def test_flows_on_two_processes_match_one(tmp_path):
    main(str(tmp_path / "flows-1.json"), 1)  # in this process: one start less
    single = json.loads((tmp_path / "flows-1.json").read_text())
    double = run(tmp_path, 2)

    assert single["chunks"] == [64]
    assert double["chunks"] == [32]  # rank zero holds half of the probe set
    assert len(double["history"]) == 37
    assert double["history"][-1]["central"]["critical"] > 0  # past the threshold
    for one, two in zip(single["history"], double["history"], strict=True):
        for name in ("gradient", "central"):
            assert two[name]["critical"] == one[name]["critical"]
            for key in ("loss", "sharpness", "loss_average"):
                assert two[name][key] == pytest.approx(one[name][key], rel=1e-6)
