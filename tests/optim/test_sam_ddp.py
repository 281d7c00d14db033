from pathlib import Path

import pytest
import torch

from tests.ddp import run_script
from tests.optim.ddp_sam import main

SCRIPT = Path(__file__).with_name("ddp_sam.py")


def run(tmp_path, devices):
    output = tmp_path / f"params-{devices}.pt"
    run_script(SCRIPT, str(output), str(devices), cwd=tmp_path, timeout=240)
    return torch.load(output)


@pytest.mark.ddp
def test_sam_on_two_processes_matches_one(tmp_path):
    main(str(tmp_path / "params-1.pt"), 1)  # in this process: one start-up saved
    single = torch.load(tmp_path / "params-1.pt")
    double = run(tmp_path, 2)

    assert single["calls"] == double["calls"] == 6
    for one, two in zip(single["params"], double["params"], strict=True):
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)
