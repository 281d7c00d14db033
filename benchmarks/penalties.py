"""Cost of each penalty per optimizer step, in gradient evaluations (digits MLP).

Everything is timed in one process, interleaved round by round, and reported as
ratios to the plain step (one forward and backward pass on the full batch), so that
a busy machine slows numerator and denominator alike. Two reference costs:

* one gradient: ``loss.backward()`` on the full batch, the plain step's work;
* one Hessian-vector product from scratch: a gradient with graph and one
  double-backward pass (``HessianOperator(objective).matvec(v)``).

Each penalty is timed as ``penalty.evaluate(objective, lr)``, which is what
``PenaltyCallback`` runs before each step, after the parameters moved by one
gradient-descent step (so that warm starts see realistic changes), together with the
products it spent. The claim checked: the gradient-norm penalty (implicit gradient
regularization) costs at most one Hessian-vector product more than the plain step.

    python benchmarks/penalties.py [--rounds 15] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_eos.curvature import HessianOperator, ProbeObjective
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    MinibatchGradientNormPenalty,
    SharpnessPenalty,
    TracePenalty,
)

LR = 0.02


def penalties() -> dict[str, Callable[[], object]]:
    return {
        "gradient norm (IGR)": lambda: GradientNormPenalty(0.18),
        "minibatch gradient norm, 8 × 180": lambda: MinibatchGradientNormPenalty(
            180, coefficient=0.02
        ),
        "sharpness (tol 1e-3)": lambda: SharpnessPenalty(
            1e-3, tol=1e-3, extra_vectors=0
        ),
        "sharpness (tol 1e-3, 1 extra vector)": lambda: SharpnessPenalty(
            1e-3, tol=1e-3, extra_vectors=1
        ),
        "trace (1 vector)": lambda: TracePenalty(1e-5, num_samples=1),
        "central flow (tol 1e-3)": lambda: CentralFlowPenalty(
            0.2, tol=1e-3, extra_vectors=0
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(test_fraction=0.2)
    data.setup("fit")
    batch = data.train_dataset.tensors
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)

    def objective() -> ProbeObjective:
        return ProbeObjective(
            model, [batch], batch_loss=lambda module, b: module.curvature_loss(b)
        )

    def gradient() -> None:
        optimizer.zero_grad()
        model.curvature_loss(batch).backward()

    direction = torch.randn(objective().dim, generator=torch.Generator().manual_seed(0))

    def fresh_product() -> None:
        HessianOperator(objective()).matvec(direction)

    built = {name: make() for name, make in penalties().items()}
    for penalty in built.values():  # cold starts of the eigensolvers, not timed
        penalty.evaluate(objective(), LR)

    times: dict[str, list[float]] = {"gradient": [], "hessian-vector product": []}
    products: dict[str, list[int]] = {name: [] for name in built}
    times.update({name: [] for name in built})
    for _ in range(args.rounds):
        gradient()
        optimizer.step()  # move, so that warm starts see a real step
        times["gradient"].append(_timed(gradient))
        times["hessian-vector product"].append(_timed(fresh_product))
        for name, penalty in built.items():
            start = time.perf_counter()
            result = penalty.evaluate(objective(), LR)
            times[name].append(time.perf_counter() - start)
            products[name].append(result.num_products)

    unit = statistics.median(times["gradient"])
    hvp = statistics.median(times["hessian-vector product"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one gradient (full batch of {len(batch[0])}): {1e3 * unit:.1f} ms")
    print(f"one Hessian-vector product from scratch: {hvp / unit:.2f} gradients\n")
    print(
        "| penalty | extra cost per step (gradients) | step cost (gradients) "
        "| HVPs per step (median) |"
    )
    print("|---|---|---|---|")
    rows = {}
    for name in built:
        extra = statistics.median(times[name]) / unit
        rows[name] = {
            "extra_gradients": extra,
            "products": statistics.median(products[name]),
        }
        print(
            f"| {name} | {extra:.2f} | {1 + extra:.2f} "
            f"| {statistics.median(products[name]):g} |"
        )
    igr = rows["gradient norm (IGR)"]["extra_gradients"] * unit / hvp
    print(
        f"\nIGR extra cost / one Hessian-vector product from scratch: {igr:.2f} "
        f"({'within' if igr <= 1.1 else 'ABOVE'} the budget of one product, 10 % "
        "timing tolerance)"
    )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(
                {
                    "gradient_ms": 1e3 * unit,
                    "hvp_gradients": hvp / unit,
                    "penalties": rows,
                    "igr_over_hvp": igr,
                    "threads": torch.get_num_threads(),
                },
                indent=1,
            )
        )


def _timed(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
