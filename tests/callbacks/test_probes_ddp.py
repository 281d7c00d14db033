import json
from pathlib import Path

import pytest

from tests.ddp import run_script

from .ddp_probes import main

SCRIPT = Path(__file__).with_name("ddp_probes.py")


def run(tmp_path, devices):
    output = tmp_path / f"probes-{devices}.json"
    run_script(SCRIPT, str(output), str(devices), cwd=tmp_path, timeout=300)
    return json.loads(output.read_text())


@pytest.mark.ddp
def test_probes_on_two_processes_match_one(tmp_path):
    main(str(tmp_path / "probes-1.json"), 1)  # in this process: no start-up cost
    single = json.loads((tmp_path / "probes-1.json").read_text())
    double = run(tmp_path, 2)

    for name, rows in single.items():
        assert len(double[name]) == len(rows) >= 2, name
        for one, two in zip(rows, double[name], strict=True):
            assert two == pytest.approx(one, rel=1e-6, abs=1e-9, nan_ok=True), name
