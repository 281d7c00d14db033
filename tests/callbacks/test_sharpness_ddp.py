import json
from pathlib import Path

import pytest

from tests.ddp import run_script

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run(tmp_path, devices):
    output = tmp_path / f"history-{devices}.json"
    run_script(SCRIPT, str(output), str(devices), cwd=tmp_path, timeout=240)
    return json.loads(output.read_text())


@pytest.mark.ddp
def test_ddp_on_two_processes_matches_one(tmp_path):
    single = run(tmp_path, 1)
    double = run(tmp_path, 2)

    assert single["chunks"] == [16, 16, 1]
    assert double["chunks"] == [16, 1]  # rank zero's shard: 17 of the 33 examples
    assert [r["step"] for r in double["history"]] == [0, 3, 6, 9]
    for one, two in zip(single["history"], double["history"], strict=True):
        assert two["eigenvalues"] == pytest.approx(one["eigenvalues"], rel=1e-6)
