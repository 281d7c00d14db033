import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.penalties.ddp_run import main

SCRIPT = Path(__file__).with_name("ddp_run.py")


@pytest.mark.ddp
def test_two_processes_add_the_penalties_of_one(tmp_path):
    output = tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(SCRIPT), str(output), "2"],
        check=True,
        timeout=240,
        env=env,
        cwd=tmp_path,
        capture_output=True,
    )
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
