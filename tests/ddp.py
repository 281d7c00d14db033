"""Run a two-process DDP script in a fresh interpreter, as the DDP tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_script(script: Path, *args: str, cwd: Path, timeout: int = 300) -> None:
    """Run ``script`` with ``args``; on failure, fail with the script's stderr.

    A process group that dies by a signal while starting (gloo's rendezvous on a
    busy machine) is started once more; a script that fails in any other way, or
    twice, fails the test with the end of what it wrote to stderr.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(script), *args]
    for attempt in (1, 2):
        result = subprocess.run(
            command, timeout=timeout, env=env, cwd=cwd, capture_output=True, text=True
        )
        if result.returncode == 0:
            return
        if result.returncode > 0 or attempt == 2:
            break
    raise AssertionError(
        f"{script.name} {' '.join(args)} exited with {result.returncode}:\n"
        f"{result.stderr[-3000:]}"
    )
