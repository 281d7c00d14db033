"""Train the digits MLP with each optimizer of examples/optim/ and tabulate the runs.

Every run combines examples/optim/digits.yaml with one optimizer file, exactly as

    lightning-eos fit --config examples/optim/digits.yaml \
        --config examples/optim/sam.yaml

would, then measures on the final parameters: the training loss on the whole
training split, the test accuracy, the sharpness λ₁ (Lanczos, relative residual
1e-3) and the stability threshold of the optimizer's last step. Results go to
examples/optim/results.json (one entry per run, merged with earlier runs), the
Markdown table to stdout, and a figure to docs/figures/optim_digits.png.

    python examples/optim_table.py                 # every optimizer (about 25 min)
    python examples/optim_table.py sam cubic       # some of them
    python examples/optim_table.py --table-only    # redraw from results.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lightning_eos import callbacks, data, models, optim  # noqa: F401
from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.curvature import HessianOperator, ProbeObjective, lanczos
from lightning_eos.curvature.thresholds import stability_threshold

ROOT = Path(__file__).resolve().parent
CONFIGS = ROOT / "optim"
RESULTS = CONFIGS / "results.json"
FIGURE = ROOT.parent / "docs" / "figures" / "optim_digits.png"
ORDER = [
    "sgd",
    "adam",
    "sam",
    "asam",
    "gsam",
    "newton_cg",
    "hessian_free",
    "cubic",
    "gauss_newton",
    "grouped_newton",
]


class Trace(pl.Callback):
    """The loss at the start of every step, with the wall-clock time since fit began."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        stats = getattr(optimizer, "last_stats", None)
        loss = stats["loss"] if stats else float(outputs["loss"])
        elapsed = time.perf_counter() - self._start
        self.rows.append((trainer.global_step, elapsed, float(loss)))


def run(name: str) -> dict[str, Any]:
    args = [
        "--config",
        str(CONFIGS / "digits.yaml"),
        "--config",
        str(CONFIGS / f"{name}.yaml"),
    ]
    args += ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    cli = LightningCLI(
        model_class=LightningModule,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        save_config_callback=None,
    )
    trace = Trace()
    cli.trainer.callbacks.append(trace)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    optimizer = cli.trainer.optimizers[0]
    threshold = stability_threshold(optimizer)
    counters = dict(getattr(optimizer, "counters", {}))
    steps = cli.trainer.global_step
    if not counters:  # torch.optim: one gradient per step
        counters = {
            "steps": steps,
            "gradients": steps,
            "losses": 0,
            "hvps": 0,
            "third_order": 0,
        }

    model = cli.model
    train = next(iter(cli.datamodule.train_dataloader()))
    objective = ProbeObjective(
        model, [train], batch_loss=lambda m, b: m.curvature_loss(b)
    )
    operator = HessianOperator(objective)
    sharpness = lanczos(operator, 1, tol=1e-3, max_iter=200)
    tested = cli.trainer.test(model, cli.datamodule, verbose=False)[0]
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, SharpnessMonitor))
    return {
        "steps": steps,
        "wall_s": wall,
        "train_loss": objective.loss(),
        "test_accuracy": tested["test/accuracy"],
        "sharpness": float(sharpness.eigenvalues[0]),
        "sharpness_converged": sharpness.converged,
        "threshold": threshold.value,
        "threshold_rule": threshold.rule or threshold.reason,
        "counters": counters,
        "trace": trace.rows,
        "sharpness_history": [
            (r.step, r.eigenvalues[0], r.threshold) for r in monitor.history
        ],
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| optimizer | steps | train loss | test acc. | λ₁ | threshold | λ₁/thr. "
        "| wall (s) | gradients | loss-only | HVPs | 3rd-order |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [n for n in ORDER if n in results]:
        r = results[name]
        c = r["counters"]
        thr = r["threshold"]
        thr_text = f"{thr:.2f}" if thr is not None else "—"
        ratio = f"{r['sharpness'] / thr:.2f}" if thr else "—"
        lines.append(
            f"| {name} | {r['steps']} | {r['train_loss']:.2e} "
            f"| {r['test_accuracy']:.3f} "
            f"| {r['sharpness']:.2f} | {thr_text} | {ratio} | {r['wall_s']:.0f} "
            f"| {c['gradients']} | {c['losses']} | {c['hvps']} | {c['third_order']} |"
        )
    return "\n".join(lines)


def figure(results: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.get_cmap("tab10").colors
    for index, name in enumerate(n for n in ORDER if n in results):
        color = colors[index % len(colors)]
        trace = results[name]["trace"]
        times = [t for _, t, _ in trace]
        left.semilogy(times, [v for _, _, v in trace], label=name, color=color)
        history = results[name]["sharpness_history"]
        steps = [s for s, _, _ in history]
        right.plot(steps, [v for _, v, _ in history], label=name, color=color)
        if name == "sam":  # SAM's own threshold moves with ‖∇L‖
            right.plot(
                steps,
                [t for _, _, t in history],
                color=color,
                linestyle=":",
                label="SAM-edge (sam)",
            )
    left.set_xlabel("wall-clock time (s)")
    left.set_ylabel("training loss at the step's start")
    left.set_title("Loss against time (quiet 2-core CPU)")
    left.legend(fontsize=7, ncol=2)
    right.axhline(
        10.0, color="black", linestyle="--", linewidth=1, label="2/η = 10 (sgd)"
    )
    right.set_xscale("symlog", linthresh=10)
    right.set_xlim(left=0)
    right.set_xlabel("optimizer step (linear to 10, then logarithmic)")
    right.set_ylabel("sharpness λ₁ (SharpnessMonitor)")
    right.set_title("Sharpness against steps")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)


def main(argv: list[str]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    names = [a for a in argv if not a.startswith("--")] or ORDER
    if "--table-only" not in argv:
        torch.set_num_threads(2)
        for name in names:
            results[name] = run(name)
            RESULTS.write_text(json.dumps(results))
    print(table(results))
    figure(results)


if __name__ == "__main__":
    main(sys.argv[1:])
