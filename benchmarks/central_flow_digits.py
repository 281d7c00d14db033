"""The central flow beside gradient descent on the digits MLP: claims, cost, figure.

The main job's setup (examples/digits_eos.yaml): the 64-200-200-10 tanh MLP, half
squared error, full-batch gradient descent at η = 0.2 on the 1,797 digits, seed 0.
FlowMonitor integrates gradient flow and the central flow from the same
initialization. The script prints each claim with PASS/FAIL and its numbers, the
cost per step against the number of critical directions, one unit of central-flow
time in gradient evaluations, and a table of how well each flow predicts gradient
descent; it writes the figure and a JSON summary.

    python benchmarks/central_flow_digits.py                    # to t = 710
    python benchmarks/central_flow_digits.py --dtype float64    # the reference
    python benchmarks/central_flow_digits.py --steps 120        # a quick look

Wall-clock numbers are only meaningful on a quiet machine; on a shared one, run
with --threads 1 (two threads competing with other processes can be ten times
slower than one).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_eos.callbacks import FlowMonitor
from lightning_eos.callbacks._flow_figure import centered_average, comparison_figure
from lightning_eos.curvature import ProbeObjective
from lightning_eos.data import DigitsDataModule
from lightning_eos.flows._base import loss_and_gradient
from lightning_eos.models import MLP

ROOT = Path(__file__).resolve().parents[1]


class DigitsGD(MLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class Progress(pl.Callback):
    """Prints a line every 50 steps (the benchmark runs for minutes)."""

    def __init__(self, monitor):
        self.monitor, self.started = monitor, time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step % 50 == 0 and self.monitor.history:
            record = self.monitor.history[-1]
            central = record.flows["central"]
            print(
                f"step {record.step:4d}  {time.perf_counter() - self.started:6.0f} s  "
                f"GD loss {record.gd_loss:.4f}  central λ₁ {central.sharpness:.3f} "
                f"critical {central.critical}",
                flush=True,
            )


class SaveCentralFlow(pl.Callback):
    """Saves the central flow's state at chosen steps (for central_flow_refresh.py)."""

    def __init__(self, monitor, steps, directory):
        self.monitor, self.steps, self.directory = monitor, set(steps), directory

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step in self.steps:
            self.directory.mkdir(parents=True, exist_ok=True)
            state = self.monitor.flows["central"].state_dict()
            torch.save(state, self.directory / f"central_{trainer.global_step}.pt")


def gradient_seconds(module, dtype, device, repeats=20):
    """Seconds of one full-batch gradient of the flows' loss (same dtype, threads)."""
    data = DigitsDataModule()
    data.setup("fit")
    module = module.to(device)
    objective = ProbeObjective(
        module,
        [tuple(t.to(device) for t in data.train_dataset.tensors)],
        batch_loss=lambda m, b: m.curvature_loss(b),
        dtype=dtype,
    )
    theta = objective.point()
    loss_and_gradient(objective, theta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        loss_and_gradient(objective, theta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def claims(history, threshold=10.0):
    steps = [r.step for r in history]
    index = {s: i for i, s in enumerate(steps)}
    gd = centered_average([r.gd_loss for r in history], 10)
    central = [r.flows["central"] for r in history]
    gradient = [r.flows["gradient"] for r in history]
    results = []

    def claim(text, passed, numbers):
        results.append({"claim": text, "pass": bool(passed), "numbers": numbers})

    reached = next((i for i, r in enumerate(central) if r.critical > 0), None)
    entered = next((i for i, r in enumerate(central) if r.candidates > 0), len(steps))
    same = all(
        history[i].distances.get("central") == history[i].distances.get("gradient")
        and central[i].loss == gradient[i].loss
        for i in range(entered)
    )
    claim(
        "central flow = gradient flow (Σ = 0) until an eigenvalue nears 2/η",
        same and all(r.critical == 0 for r in central[:entered]),
        {"first_candidate_at": steps[entered] if entered < len(steps) else None},
    )
    if reached is not None:
        held = [r.sharpness for r in central[reached:]]
        claim(
            "central flow λ₁ stays in [9.95, 10.05] once it reaches 2/η",
            min(held) >= 9.95 and max(held) <= 10.05,
            {"reached_at": steps[reached], "min": min(held), "max": max(held)},
        )
    else:
        claim("central flow λ₁ stays in [9.95, 10.05]", False, {"reached_at": None})

    def relative(t):
        i = index[t]
        return abs(central[i].loss_average - gd[i]) / gd[i]

    last = steps[-1]
    for t in (600, 700):
        if t + 10 <= last:
            claim(
                f"predicted mean loss within 15 % of GD's ±10-step mean at t = {t}",
                relative(t) <= 0.15,
                {
                    "predicted": central[index[t]].loss_average,
                    "gd_mean": gd[index[t]],
                    "relative_error": relative(t),
                },
            )
    window = [t for t in steps if 550 <= t <= min(700, last - 10)]
    if window:
        errors = [relative(t) for t in window]
        claim(
            "predicted mean loss within 8 % on average over t ∈ [550, 700]",
            statistics.mean(errors) <= 0.08,
            {"mean_relative_error": statistics.mean(errors), "max": max(errors)},
        )
    window = [t for t in steps if 500 <= t <= 700]
    if window:
        cf = [history[index[t]].distances["central"] for t in window]
        gf = [history[index[t]].distances["gradient"] for t in window]
        claim(
            "‖θ_GD − θ_CF‖ ≤ 0.15 ‖θ_GD − θ₀‖ for t ∈ [500, 700]",
            max(cf) <= 0.15,
            {"max_relative_distance": max(cf)},
        )
        claim(
            "‖θ_GD − θ_CF‖ < ‖θ_GD − θ_GF‖ for t ∈ [500, 700]",
            all(c < g for c, g in zip(cf, gf, strict=True)),
            {"worst_ratio_cf_over_gf": max(c / g for c, g in zip(cf, gf, strict=True))},
        )
    if 700 <= last:
        value = gradient[index[700]].sharpness
        claim(
            "gradient flow's λ₁ exceeds 2/η by more than half at t = 700",
            value > 1.5 * threshold,
            {"gradient_flow_sharpness": value},
        )
    return results


def prediction_table(history, start, stop):
    """Mean relative error of each flow's loss prediction, and mean distance."""
    gd = centered_average([r.gd_loss for r in history], 10)
    rows = []
    for name, predicted in (
        ("gradient flow", lambda r: r.flows["gradient"].loss),
        ("central flow", lambda r: r.flows["central"].loss_average),
    ):
        key = "gradient" if name == "gradient flow" else "central"
        chosen = [
            (r, g) for r, g in zip(history, gd, strict=True) if start <= r.step <= stop
        ]
        errors = [abs(predicted(r) - g) / g for r, g in chosen]
        distances = [r.distances[key] for r, _ in chosen]
        sharpness = [r.flows[key].sharpness for r, _ in chosen]
        rows.append(
            {
                "flow": name,
                "loss_relative_error_mean": statistics.mean(errors),
                "loss_relative_error_max": max(errors),
                "relative_distance_mean": statistics.mean(distances),
                "relative_distance_max": max(distances),
                "sharpness_mean": statistics.mean(sharpness),
            }
        )
    return rows


def cost_table(history, grad_seconds):
    by_count: dict[int, list] = {}
    for record in history[1:]:
        flow = record.flows["central"]
        by_count.setdefault(flow.critical, []).append(flow)
    rows = []
    for count in sorted(by_count):
        flows = by_count[count]
        seconds = statistics.mean(f.seconds for f in flows)
        rows.append(
            {
                "critical": count,
                "steps": len(flows),
                "seconds_per_step": seconds,
                "gradient_equivalents": seconds / grad_seconds,
                "hvps": statistics.mean(f.products for f in flows),
                "third_order": statistics.mean(f.third_order for f in flows),
                "candidates": statistics.mean(f.candidates for f in flows),
                "gradients": statistics.mean(f.gradients for f in flows),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=710)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--substeps", type=int, default=4)
    parser.add_argument("--refresh-every", type=int, default=None)
    parser.add_argument("--sharpness-every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--save-states", type=int, nargs="*", default=[])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs/figures/flows.png")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks/results/central_flow_digits.json",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    pl.seed_everything(0, verbose=False)
    module = DigitsGD(hidden_dims=[200, 200], activation="tanh", loss="mse")
    monitor = FlowMonitor(
        flows=("gradient", "central"),
        substeps=args.substeps,
        refresh_every=args.refresh_every,
        sharpness_every_n_steps=args.sharpness_every,
        dtype=args.dtype,
    )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        max_epochs=-1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[
            monitor,
            Progress(monitor),
            SaveCentralFlow(monitor, args.save_states, args.json.parent / "states"),
        ],
    )
    started = time.perf_counter()
    trainer.fit(module, DigitsDataModule())
    wall = time.perf_counter() - started
    device = torch.device("cuda" if args.accelerator in ("gpu", "cuda") else "cpu")
    grad_seconds = gradient_seconds(module, dtype, device)

    history = monitor.history
    gf_seconds = sum(r.flows["gradient"].seconds for r in history)
    cf_seconds = sum(r.flows["central"].seconds for r in history)
    print(f"fit to t = {args.steps} ({args.dtype}): {wall:.0f} s wall clock")
    print(
        f"  gradient flow {gf_seconds:.0f} s, central flow {cf_seconds:.0f} s (its "
        f"own part; below the threshold it shares gradient flow's), one gradient "
        f"{grad_seconds * 1e3:.1f} ms"
    )
    results = claims(history)
    for result in results:
        status = "PASS" if result["pass"] else "FAIL"
        numbers = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result["numbers"].items()
        )
        print(f"{status}  {result['claim']}  ({numbers})")

    costs = cost_table(history, grad_seconds)
    print("\ncentral flow cost per step by number of critical directions")
    print(
        "critical  candidates  steps  s/step  gradient-equiv  HVPs  T[u,v]  gradients"
    )
    for row in costs:
        print(
            f"{row['critical']:8d}  {row['candidates']:10.1f}  {row['steps']:5d}  "
            f"{row['seconds_per_step']:6.3f}  "
            f"{row['gradient_equivalents']:14.1f}  {row['hvps']:4.1f}  "
            f"{row['third_order']:6.1f}  {row['gradients']:9.1f}"
        )
    eos = [r for r in history if r.flows["central"].critical > 0]
    if eos:
        unit = statistics.mean(r.flows["central"].seconds for r in eos) / grad_seconds
        print(f"one unit of central-flow time at the edge: {unit:.0f} gradients")

    tables = {}
    for start, stop in ((550, 700), (300, args.steps - 10)):
        if stop <= history[-1].step - 10 and start < stop:
            tables[f"{start}-{stop}"] = prediction_table(history, start, stop)
            print(
                f"\nhow well each flow predicts gradient descent, t ∈ [{start}, {stop}]"
            )
            print("flow            loss error mean/max   distance mean/max   λ₁ mean")
            for row in tables[f"{start}-{stop}"]:
                print(
                    f"{row['flow']:14s}  {row['loss_relative_error_mean']:7.1%} / "
                    f"{row['loss_relative_error_max']:6.1%}   "
                    f"{row['relative_distance_mean']:6.3f} / "
                    f"{row['relative_distance_max']:6.3f}   "
                    f"{row['sharpness_mean']:6.2f}"
                )

    figure = comparison_figure(
        history,
        title=f"Digits MLP, gradient descent at η = 0.2 ({args.dtype} flows)",
    )
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=80)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "steps": args.steps,
        "dtype": args.dtype,
        "substeps": args.substeps,
        "refresh_every": args.refresh_every,
        "threads": torch.get_num_threads(),
        "wall_seconds": wall,
        "gradient_seconds": grad_seconds,
        "claims": results,
        "costs": costs,
        "tables": tables,
        "series": {
            "step": [r.step for r in history],
            "gd_loss": [r.gd_loss for r in history],
            "central_loss_average": [r.flows["central"].loss_average for r in history],
            "central_sharpness": [r.flows["central"].sharpness for r in history],
            "central_critical": [r.flows["central"].critical for r in history],
            "gradient_sharpness": [r.flows["gradient"].sharpness for r in history],
            "distance_central": [r.distances.get("central", math.nan) for r in history],
            "distance_gradient": [
                r.distances.get("gradient", math.nan) for r in history
            ],
        },
    }
    args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
