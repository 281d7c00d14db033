"""Can a penalty make small-step gradient descent do what large-step GD does?

On scikit-learn's digits (80 % train, 20 % held out), the fully connected tanh
network of Cohen et al. (64-200-200-10, loss ½‖f(x) − y‖² averaged over examples)
is trained by full-batch gradient descent from one initialization:

* ``gd-large``: η = 0.2, which runs at the edge of stability (λ₁ ≈ 2/η = 10);
* ``gd-small``: η = 0.02, without penalty;
* η = 0.02 with an explicit penalty attached by ``PenaltyCallback``:
  ``igr`` (GradientNormPenalty with c = 0.2 − 0.02, so that explicit and
  implicit terms add up to the large step's (0.2/4)‖∇L‖²), ``sharpness:MU``
  (SharpnessPenalty, μ = MU), ``trace:MU`` (TracePenalty, one Rademacher vector
  per step), ``central-flow`` (CentralFlowPenalty with η_target = 0.2).

Runs are compared at equal time t = η · steps (default t = 200: 1,000 large steps,
10,000 small ones). Each run writes ``OUT/NAME.json`` (sharpness every Δt = 2, train
loss every Δt = 1, final train and test metrics, wall time) and ``OUT/NAME.pt``
(parameters every Δt = 10); ``report`` turns them into the table and the figure:

    python examples/penalties_digits.py run gd-large gd-small igr central-flow
    python examples/penalties_digits.py run sharpness:0.01 trace:0.001
    python examples/penalties_digits.py report --figure docs/figures/penalties.png

``--time 100 --out DIR`` runs a shorter horizon (used to tune the coefficients).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.data import DigitsDataModule
from lightning_eos.models import MLP
from lightning_eos.penalties import (
    CentralFlowPenalty,
    GradientNormPenalty,
    PenaltyCallback,
    SharpnessPenalty,
    TracePenalty,
)

LARGE, SMALL = 0.2, 0.02
DEFAULT_OUT = Path("lightning_logs/penalties_digits")


class GradientDescentMLP(MLP):
    """The reference MLP with full-batch SGD at a fixed learning rate."""

    def __init__(self, lr: float) -> None:
        super().__init__(hidden_dims=(200, 200), activation="tanh", loss="mse")
        self.lr = lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Recorder(Callback):
    """Train loss every ``loss_every`` steps, parameters every ``snapshot_every``."""

    def __init__(self, loss_every: int, snapshot_every: int) -> None:
        self.loss_every, self.snapshot_every = loss_every, snapshot_every
        self.losses: list[tuple[int, float]] = []
        self.snapshots: dict[int, torch.Tensor] = {}
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.snapshot_every == 0:
            self.snapshots[trainer.global_step] = _flat(pl_module)
            elapsed = time.perf_counter() - self.start
            print(f"  step {trainer.global_step}, {elapsed:.0f} s", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1  # the loss at the parameters of that step
        if step % self.loss_every == 0:
            self.losses.append((step, float(outputs["loss"])))


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def make_penalty(name: str) -> tuple[float, Any]:
    """The learning rate and the penalty of a run name."""
    kind, _, argument = name.partition(":")
    if kind == "gd-large":
        return LARGE, None
    if kind == "gd-small":
        return SMALL, None
    if kind == "igr":
        return SMALL, GradientNormPenalty(coefficient=LARGE - SMALL)
    if kind == "sharpness":
        return SMALL, SharpnessPenalty(float(argument), tol=1e-3, extra_vectors=0)
    if kind == "trace":
        return SMALL, TracePenalty(float(argument), num_samples=1)
    if kind == "central-flow":
        return SMALL, CentralFlowPenalty(target_lr=LARGE, tol=1e-3, extra_vectors=0)
    raise ValueError(f"unknown run {name!r}")


def run(name: str, horizon: float, out: Path) -> None:
    lr, penalty = make_penalty(name)
    steps = round(horizon / lr)
    per_unit = round(1 / lr)  # steps per unit of time
    pl.seed_everything(0, verbose=False)
    module = GradientDescentMLP(lr)
    data = DigitsDataModule(test_fraction=0.2)
    monitor = SharpnessMonitor(k=1, every_n_steps=2 * per_unit, tol=1e-3)
    recorder = Recorder(loss_every=per_unit, snapshot_every=10 * per_unit)
    callbacks: list[Callback] = [monitor, recorder]
    if penalty is not None:
        callbacks.append(PenaltyCallback(penalty, log_every_n_steps=per_unit))
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, data)
    seconds = time.perf_counter() - start
    recorder.snapshots[steps] = _flat(module)

    inputs, targets = data.train_dataset.tensors
    with torch.no_grad():
        train_loss = float(module.curvature_loss((inputs, targets)))
    tested = trainer.test(module, data, verbose=False)[0]
    history = penalty_history(callbacks[-1], per_unit) if penalty is not None else []
    summary = {
        "name": name,
        "lr": lr,
        "steps": steps,
        "horizon": horizon,
        "penalty": repr(penalty),
        "seconds": seconds,
        "sharpness": [(r.step * lr, r.eigenvalues[0]) for r in monitor.history],
        "train_loss_history": [(s * lr, v) for s, v in recorder.losses],
        "train_loss": train_loss,
        "test_loss": tested["test/loss"],
        "test_accuracy": tested["test/accuracy"],
        "penalty_history": history,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    times = {round(step * lr): v for step, v in recorder.snapshots.items()}
    torch.save(times, out / f"{name}.pt")
    print(f"{name}: {seconds:.0f} s, train {train_loss:.4f}, test {tested}")


def penalty_history(callback: PenaltyCallback, every: int) -> list[dict[str, float]]:
    return [
        {
            "step": r.step,
            "value": r.value,
            "gradient_norm": r.gradient_norm,
            **r.metrics,
        }
        for r in callback.history
        if r.step % every == 0
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run", help="train the named runs")
    runner.add_argument("names", nargs="+")
    runner.add_argument("--time", type=float, default=200.0, help="η · steps")
    runner.add_argument("--out", type=Path, default=DEFAULT_OUT)
    runner.add_argument("--threads", type=int, default=None)
    reporter = commands.add_parser("report", help="table and figure of finished runs")
    reporter.add_argument("--out", type=Path, default=DEFAULT_OUT)
    reporter.add_argument("--figure", type=Path, default=None)
    reporter.add_argument("--table", type=Path, default=None)
    args = parser.parse_args()

    if args.command == "run":
        if args.threads:
            torch.set_num_threads(args.threads)
        for name in args.names:
            run(name, args.time, args.out)
    else:
        from penalties_digits_report import report

        report(args.out, args.figure, args.table)


if __name__ == "__main__":
    main()
