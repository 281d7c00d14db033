"""Plot the sharpness, ‖∇S‖ and the self-stabilization cycle from TensorBoard events.

Reads the event files written by ``examples/digits_probes.yaml`` (a
SharpnessMonitor and a ThirdOrderMonitor) and draws three panels: λ₁ against the
stability threshold 2/η, the norm of the gradient of the sharpness ∇S = T[u₁, u₁],
and the trajectory of (x, y) = (u₁*·(θ − θ*), ∇S⊥*·(θ − θ*)) after θ* is fixed,
with u₁* and ∇S⊥* taken at θ* (Damian, Nichani, Lee 2023)::

    python examples/plot_probes.py lightning_logs/version_0 probes.png

Needs matplotlib (``pip install 'lightning-eos[examples]'``).
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)


def read(directory: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every scalar series of the run in ``directory``, as (steps, values)."""
    paths = sorted(glob.glob(f"{directory}/**/events.out.tfevents.*", recursive=True))
    if not paths:
        raise SystemExit(f"no TensorBoard event file under {directory}")
    series: dict[str, dict[int, float]] = {}
    for path in paths:
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            points = series.setdefault(tag, {})
            points.update({event.step: event.value for event in events.Scalars(tag)})
    return {
        tag: (sorted(points), [points[s] for s in sorted(points)])
        for tag, points in series.items()
    }


def plot(series: dict, output: str, window: int) -> None:
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(13, 3.8))

    steps, sharpness = series["sharpness/lambda_1"]
    left.plot(steps, sharpness, color="C0", label="sharpness λ₁")
    if "sharpness/threshold" in series:
        threshold_steps, threshold = series["sharpness/threshold"]
        left.plot(threshold_steps, threshold, "k--", lw=1, label="2/η")
    left.set_xlabel("step")
    left.set_ylabel("λ₁ of the training-loss Hessian")
    left.set_title("Sharpness and the stability threshold")
    left.legend(loc="lower right")

    steps, norm = series["third_order/grad_sharpness_norm"]
    middle.plot(steps, norm, color="C1")
    middle.set_xlabel("step")
    middle.set_ylabel("‖∇S‖ = ‖T[u₁, u₁]‖")
    middle.set_title("Gradient of the sharpness")

    x_steps, x = series["selfstab/x"]
    y_by_step = dict(zip(*series["selfstab/y"], strict=True))
    start = x_steps[0]
    kept = [(s, v) for s, v in zip(x_steps, x, strict=True) if s <= start + window]
    pairs = [(v, y_by_step[s]) for s, v in kept if s in y_by_step]
    if pairs:
        xs, ys = zip(*pairs, strict=True)
        right.plot(xs, ys, color="0.75", lw=0.8, zorder=1)
        points = right.scatter(
            xs, ys, c=[s for s, _ in kept][: len(xs)], cmap="viridis", s=12, zorder=2
        )
        figure.colorbar(points, ax=right, label="step")
    right.axhline(0, color="k", lw=0.5)
    right.axvline(0, color="k", lw=0.5)
    right.set_xlabel("x = u₁*·(θ − θ*)")
    right.set_ylabel("y = ∇S⊥*·(θ − θ*)")
    right.set_title(f"Self-stabilization, steps {start}–{start + window}")
    for side in (middle, left):
        side.axvline(start, color="C3", lw=0.8, ls=":")
    left.annotate(
        f" θ* (step {start})", (start, min(sharpness)), color="C3", fontsize=8
    )

    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="directory holding the run's event files")
    parser.add_argument("output", help="the PNG file to write")
    parser.add_argument(
        "--window", type=int, default=400, help="steps after θ* in the (x, y) panel"
    )
    args = parser.parse_args()
    series = read(args.run)
    needed = ("sharpness/lambda_1", "third_order/grad_sharpness_norm", "selfstab/x")
    missing = [tag for tag in needed if tag not in series]
    if missing:
        raise SystemExit(
            f"{args.run} has no {', '.join(missing)}: the self-stabilization "
            "coordinates are logged once λ₁ has reached the threshold, so the run "
            "must go past the edge of stability (about 300 steps for the main job)."
        )
    plot(series, args.output, args.window)


if __name__ == "__main__":
    main()
