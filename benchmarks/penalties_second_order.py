"""Cost of a penalty in the objective of a second-order optimizer (digits MLP).

With a second-order optimizer, ``PenaltyCallback`` evaluates the penalty once per
step and adds its term to every closure call of the step: the term's value to every
loss, its gradient to every gradient, and, when the optimizer differentiates the
gradient again, its graph to every Hessian-vector product. This script runs short
Lightning fits of the main job's network (64-200-200-10 tanh, full batch of the
1,437 training digits) with ``NewtonCG`` and ``HessianFree`` (Gauss-Newton
curvature), without and with each penalty, interleaved round by round, and reports
per optimizer step:

* the wall time, in units of one full-batch gradient measured in the same process;
* the closure calls and curvature-vector products the optimizer made;
* the time per curvature-vector product relative to the same optimizer without a
  penalty (the step's time divided by its products, a coarse figure: line-search
  trials and the penalty's own evaluation are counted in).

Rows marked "curvature left out" use ``PenaltyCallback(term_curvature=False)``.

    python benchmarks/penalties_second_order.py [--steps 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP
from lightning_eos.optim import HessianFree, NewtonCG
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    PenaltyCallback,
    SharpnessPenalty,
    TracePenalty,
)

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "NewtonCG (λ = 1)": lambda p: NewtonCG(p, damping=1.0, cg_tol=1e-2),
    "HessianFree (GN, λ = 1)": lambda p: HessianFree(
        p, curvature="gauss_newton", damping=1.0
    ),
}
#: name: (penalty factory, whether its curvature enters the optimizer's products)
PENALTIES: dict[str, tuple[Callable[[], Any] | None, bool]] = {
    "none": (None, True),
    "gradient norm (c = 0.1)": (lambda: GradientNormPenalty(0.1), True),
    "gradient norm, curvature left out": (lambda: GradientNormPenalty(0.1), False),
    "sharpness (μ = 1e-3)": (lambda: SharpnessPenalty(1e-3, extra_vectors=0), True),
    "sharpness, curvature left out": (
        lambda: SharpnessPenalty(1e-3, extra_vectors=0),
        False,
    ),
    "trace (μ = 1e-5)": (lambda: TracePenalty(1e-5), True),
    "central flow (η★ = 0.2)": (
        lambda: CentralFlowPenalty(0.2, extra_vectors=0),
        True,
    ),
}


class StepTimer(pl.Callback):
    """Wall time of each optimizer step (one full batch per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


def run(
    data: DigitsDataModule,
    make_optimizer: Any,
    penalty: tuple[Callable[[], Any] | None, bool],
    steps: int,
) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = MLP()
    model.configure_optimizers = lambda: make_optimizer(model.parameters())
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    make_penalty, term_curvature = penalty
    if make_penalty is not None:
        callbacks.append(PenaltyCallback(make_penalty(), term_curvature=term_curvature))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    counters = trainer.optimizers[0].counters
    timed = timer.times[1:]  # the first step includes cold starts
    return {
        "step_s": statistics.median(timed),
        "closure_calls": (counters["gradients"] + counters["losses"]) / steps,
        "products": counters["hvps"] / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = DigitsDataModule(test_fraction=0.2)
    data.setup("fit")
    batch = data.train_dataset.tensors
    reference = MLP()

    def gradient() -> float:
        start = time.perf_counter()
        reference.zero_grad()
        reference.curvature_loss(batch).backward()
        return time.perf_counter() - start

    units: list[float] = []
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for optimizer_name, make_optimizer in OPTIMIZERS.items():
            for penalty_name, penalty in PENALTIES.items():
                units.extend(gradient() for _ in range(5))
                row = run(data, make_optimizer, penalty, args.steps)
                results.setdefault((optimizer_name, penalty_name), []).append(row)

    unit = statistics.median(units)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"one gradient (full batch of {len(batch[0])}): {1e3 * unit:.1f} ms\n")
    print(
        "| optimizer | penalty | step (gradients) | closure calls | products "
        "| time per product vs. no penalty |"
    )
    print("|---|---|---:|---:|---:|---:|")
    table = []
    for optimizer_name in OPTIMIZERS:
        plain = _merged(results[(optimizer_name, "none")])
        plain_per_product = plain["step_s"] / max(plain["products"], 1)
        for penalty_name in PENALTIES:
            row = _merged(results[(optimizer_name, penalty_name)])
            per_product = row["step_s"] / max(row["products"], 1) / plain_per_product
            print(
                f"| {optimizer_name} | {penalty_name} | {row['step_s'] / unit:.1f} "
                f"| {row['closure_calls']:.1f} | {row['products']:.1f} "
                f"| {per_product:.2f} |"
            )
            table.append(
                {
                    "optimizer": optimizer_name,
                    "penalty": penalty_name,
                    "step_gradients": row["step_s"] / unit,
                    "closure_calls": row["closure_calls"],
                    "products": row["products"],
                    "time_per_product_vs_plain": per_product,
                }
            )
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            json.dumps(
                {
                    "gradient_ms": 1e3 * unit,
                    "threads": torch.get_num_threads(),
                    "rows": table,
                },
                indent=1,
            )
        )


def _merged(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


if __name__ == "__main__":
    main()
