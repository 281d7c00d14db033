import json
from pathlib import Path

import pytest
import torch

from tests.ddp import run_script
from tests.penalties.ddp_run import main

SCRIPT = Path(__file__).with_name("ddp_run.py")


@pytest.mark.ddp
def test_two_processes_add_the_penalties_of_one(tmp_path):
    output = tmp_path / "ddp.json"
    run_script(SCRIPT, str(output), "2", cwd=tmp_path, timeout=240)
    double = json.loads(output.read_text())
    single = main(None, 1)

    assert single["added"] == [[True] * 3] * 3
    assert double["added"] == single["added"]
    for one, two in zip(single["values"], double["values"], strict=True):
        assert two == pytest.approx(one, rel=1e-10)
    torch.testing.assert_close(
        torch.tensor(double["parameters"]),
        torch.tensor(single["parameters"]),
        rtol=1e-10,
        atol=1e-13,
    )
