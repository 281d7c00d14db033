"""How often must the central flow refresh its eigenvectors and third-order vectors?

Starting from central-flow states saved by ``central_flow_digits.py --save-states``
(the digits MLP at η = 0.2, at the edge of stability), the central flow is
integrated for ``--steps`` units of time with ``refresh_every`` = 1 (every Euler
substep, as the reference implementation of the paper does), 2, 4 (once per step,
the default) and 8 substeps. Each run is compared with the every-substep run: the
distance between the end points relative to the distance travelled, the relative
difference of the predicted time-averaged loss and of tr Σ, the largest |λ₁ − 2/η|,
and the cost per unit of time.

    python benchmarks/central_flow_digits.py --save-states 320 450 560
    python benchmarks/central_flow_refresh.py --states benchmarks/results/states
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from lightning_eos.curvature import ProbeObjective
from lightning_eos.data import DigitsDataModule
from lightning_eos.flows import CentralFlow
from lightning_eos.models import MLP

ROOT = Path(__file__).resolve().parents[1]


def integrate(objective, state, refresh_every, steps):
    flow = CentralFlow(objective, state["theta"], lr=0.2, refresh_every=refresh_every)
    flow.load_state_dict(state)
    start = flow.theta.clone()
    records, seconds = [], []
    for _ in range(steps):
        began = time.perf_counter()
        flow.advance()
        record = flow.observe()
        seconds.append(time.perf_counter() - began)
        records.append(record)
    return flow, start, records, statistics.mean(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--states", type=Path, default=ROOT / "benchmarks/results/states"
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = DigitsDataModule()
    data.setup("fit")
    objective = ProbeObjective(
        MLP(),
        [data.train_dataset.tensors],
        batch_loss=lambda module, batch: module.curvature_loss(batch),
        dtype=getattr(torch, args.dtype),
    )
    print("t0    refresh  rel. distance  loss-pred diff  tr Σ diff  max|λ₁−10|  s/step")
    for path in sorted(args.states.glob("central_*.pt")):
        state = torch.load(path, weights_only=False)
        reference = None
        for refresh_every in (1, 2, 4, 8):
            flow, start, records, seconds = integrate(
                objective, state, refresh_every, args.steps
            )
            if reference is None:
                reference = (flow, start, records)
            ref_flow, ref_start, ref_records = reference
            travelled = float((ref_flow.theta - ref_start).norm())
            distance = float((flow.theta - ref_flow.theta).norm()) / travelled
            loss_diff = max(
                abs(r.loss_average - q.loss_average) / q.loss_average
                for r, q in zip(records, ref_records, strict=True)
            )
            trace_diff = max(
                abs(sum(r.variances) - sum(q.variances)) / max(sum(q.variances), 1e-12)
                for r, q in zip(records, ref_records, strict=True)
            )
            worst = max(abs(r.sharpness - 10.0) for r in records)
            print(
                f"{int(state['time']):4d}  {refresh_every:7d}  {distance:13.2e}  "
                f"{loss_diff:14.2e}  {trace_diff:9.2e}  {worst:10.2e}  {seconds:6.2f}"
            )


if __name__ == "__main__":
    main()
