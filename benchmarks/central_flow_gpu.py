"""The digits central-flow run on one GPU: the claims, the cost, and CPU agreement.

Sized for a few minutes of a GPU: first 20 units of time of both flows in float64
on the GPU and on the CPU (they must agree to round-off), then the run of
``central_flow_digits.py`` to t = 710 on the GPU in float32 with TF32 off (the
reference implementation of the paper turns it off too: TF32 matrix products carry
about three decimal digits, below what third-order vectors need).

    python benchmarks/central_flow_gpu.py

This script was written without access to a GPU and has not been run; its CPU
half is the same code as the tests and the CPU benchmark.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_eos.curvature import ProbeObjective
from lightning_eos.data import DigitsDataModule
from lightning_eos.flows import CentralFlow, GradientFlow
from lightning_eos.models import MLP

HERE = Path(__file__).resolve().parent


def agreement(steps: int = 20) -> None:
    data = DigitsDataModule()
    data.setup("fit")
    pl.seed_everything(0, verbose=False)
    module = MLP()
    ends = {}
    for device in ("cpu", "cuda"):
        module = module.to(device)
        batch = [tuple(t.to(device) for t in data.train_dataset.tensors)]
        objective = ProbeObjective(
            module,
            batch,
            batch_loss=lambda m, b: m.curvature_loss(b),
            dtype=torch.float64,
        )
        point = objective.point()
        flows = [
            GradientFlow(objective, point, 0.2),
            CentralFlow(objective, point, 0.2),
        ]
        started = time.perf_counter()
        for _ in range(steps):
            for flow in flows:
                flow.advance()
        seconds = time.perf_counter() - started
        ends[device] = [flow.theta.cpu() for flow in flows]
        print(f"{device}: {steps} units of both flows in {seconds:.1f} s (float64)")
    for name, a, b in zip(
        ("gradient", "central"), ends["cpu"], ends["cuda"], strict=True
    ):
        gap = float((a - b).norm() / a.norm())
        status = "PASS" if gap < 1e-9 else "FAIL"
        print(f"{status}  {name} flow: CPU and GPU agree, relative gap {gap:.1e}")


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("No GPU: run benchmarks/central_flow_digits.py instead.")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    agreement()
    # The full run, in a fresh process so that the settings above apply from start.
    code = (
        "import torch, runpy, sys; "
        "torch.backends.cuda.matmul.allow_tf32 = False; "
        "torch.backends.cudnn.allow_tf32 = False; "
        f"sys.argv = ['central_flow_digits.py', '--accelerator', 'gpu', "
        f"'--json', '{HERE / 'results/central_flow_gpu.json'}', "
        f"'--figure', '{HERE / 'results/central_flow_gpu.png'}']; "
        f"runpy.run_path('{HERE / 'central_flow_digits.py'}', run_name='__main__')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()
