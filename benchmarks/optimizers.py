"""Cost per step and loss per wall-clock second of the optimizers, on the digits MLP.

Two measurements in one run, on the full training split (1,437 digits, the
64-200-200-10 tanh MLP, half squared error, float32, 2 threads):

1. Cost per step: the time of a step of each optimizer divided by the time of one
   gradient evaluation (forward and backward pass) measured just before it, the
   smallest ratio over ``--steps`` steps (the least disturbed by other jobs),
   with the closure calls and products each step spent on average.
2. Loss against time: each optimizer trains for ``--budget`` seconds from the
   same initialization; the loss reached at a quarter, half and all of the budget
   is printed, and its ratio to SGD's and Adam's at the full budget.

Timings on a shared machine are noisy: compare the ratios of one run.

    python benchmarks/optimizers.py --budget 20
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP
from lightning_eos.optim import (
    GSAM,
    SAM,
    CubicNewton,
    GaussNewton,
    GroupedNewton,
    HessianFree,
    NewtonCG,
    closure_backward,
)

OPTIMIZERS: dict[str, Callable] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "sam": lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.2),
    "asam": lambda p: SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.2),
    "gsam": lambda p: GSAM(p, torch.optim.SGD, rho=0.05, alpha=0.1, lr=0.2),
    "newton_cg": lambda p: NewtonCG(p, damping=1.0, cg_tol=1e-2),
    "hessian_free": lambda p: HessianFree(p, curvature="gauss_newton"),
    "hessian_free_fd": lambda p: HessianFree(p, hessian_products="finite_difference"),
    "cubic": lambda p: CubicNewton(p),
    "gauss_newton": lambda p: GaussNewton(p, damping=0.1, max_cg_iter=20),
    "grouped_newton": lambda p: GroupedNewton(p),
}


def setup() -> tuple[MLP, tuple[torch.Tensor, torch.Tensor]]:
    datamodule = DigitsDataModule(test_fraction=0.2)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(0)
    return MLP(), batch


def make_closure(model: MLP, optimizer: torch.optim.Optimizer, batch) -> Callable:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = model.curvature_loss(batch)
        closure_backward(loss)
        return loss

    return closure


def gradient_seconds(model: MLP, batch, repeats: int = 15) -> float:
    """The fastest of ``repeats`` gradient evaluations (robust to a busy machine)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.zero_grad()
        model.curvature_loss(batch).backward()
        times.append(time.perf_counter() - start)
    return min(times)


def cost_per_step(steps: int) -> None:
    """Fastest step over fastest gradient, with the evaluations of one step."""
    print(
        f"{'optimizer':<16} {'step/grad':>9} {'grads':>6} {'losses':>6} "
        f"{'hvps':>6} {'3rd':>5}"
    )
    for name, factory in OPTIMIZERS.items():
        model, batch = setup()
        optimizer = factory(model.parameters())
        if hasattr(optimizer, "attach"):
            optimizer.attach(model)
        closure = make_closure(model, optimizer, batch)
        optimizer.step(closure)  # warm-up
        before = dict(getattr(optimizer, "counters", {}))
        times = []
        for _ in range(steps):
            reference = gradient_seconds(model, batch, repeats=5)
            start = time.perf_counter()
            optimizer.step(closure)
            times.append((time.perf_counter() - start) / reference)
        after = getattr(optimizer, "counters", None)
        if after is None:
            counts = [1.0, 0.0, 0.0, 0.0]
        else:
            counts = [
                (after[k] - before[k]) / steps
                for k in ("gradients", "losses", "hvps", "third_order")
            ]
        print(
            f"{name:<16} {min(times):9.1f} {counts[0]:6.1f} {counts[1]:6.1f} "
            f"{counts[2]:6.1f} {counts[3]:5.1f}"
        )
    print(f"(fastest gradient evaluation, last measurement: {reference * 1e3:.1f} ms)")


def loss_over_time(budget: float) -> None:
    marks = (budget / 4, budget / 2, budget)
    reached: dict[str, list[float]] = {}
    for name, factory in OPTIMIZERS.items():
        model, batch = setup()
        optimizer = factory(model.parameters())
        if hasattr(optimizer, "attach"):
            optimizer.attach(model)
        closure = make_closure(model, optimizer, batch)
        values, steps = [], 0
        start = time.perf_counter()
        for mark in marks:
            while time.perf_counter() - start < mark:
                optimizer.step(closure)
                steps += 1
            with torch.no_grad():
                values.append(float(model.curvature_loss(batch)))
        reached[name] = values
        print(
            f"{name:<16} steps {steps:5d}  loss at "
            + "  ".join(
                f"{m:5.1f}s: {v:.3e}" for m, v in zip(marks, values, strict=True)
            )
        )
    print("\nloss at the full budget, relative to SGD and to Adam (below 1 is better):")
    for name, values in reached.items():
        print(
            f"{name:<16} ×SGD {values[-1] / reached['sgd'][-1]:8.3f}   "
            f"×Adam {values[-1] / reached['adam'][-1]:8.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--steps", type=int, default=5, help="steps timed per optimizer"
    )
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cost_per_step(args.steps)
    print()
    loss_over_time(args.budget)


if __name__ == "__main__":
    main()
