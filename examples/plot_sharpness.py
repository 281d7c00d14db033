"""Plot the sharpness of a run against its stability threshold, from TensorBoard logs.

    python examples/plot_sharpness.py lightning_logs/version_0 --output sharpness.png

Reads the ``sharpness/*`` scalars written by ``SharpnessMonitor`` and the training
loss, and draws λ₁ … λ_k with the threshold 2/η above the loss.
"""

from __future__ import annotations

import argparse
import glob
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from tensorboard.backend.event_processing.event_accumulator import (
    EventAccumulator,
)


def load_scalars(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """All scalar series of the newest event file under ``run_dir``."""
    paths = sorted(glob.glob(f"{run_dir}/**/events.out.tfevents.*", recursive=True))
    if not paths:
        raise SystemExit(f"No TensorBoard event file under {run_dir}.")
    events = EventAccumulator(paths[-1], size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: (
            [e.step for e in events.Scalars(tag)],
            [e.value for e in events.Scalars(tag)],
        )
        for tag in events.Tags()["scalars"]
    }


def plot(scalars: dict, output: Path, title: str) -> None:
    """Draw the eigenvalues with the threshold, and the loss, into ``output``."""
    eigen_tags = sorted(
        (t for t in scalars if re.fullmatch(r"sharpness/lambda_\d+", t)),
        key=lambda t: int(t.rsplit("_", 1)[1]),
    )
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2.2, 1]
    )
    colors = plt.cm.Blues_r(
        [0.15 + 0.55 * i / max(len(eigen_tags), 1) for i in range(9)]
    )
    for index, tag in enumerate(eigen_tags):
        steps, values = scalars[tag]
        label = f"λ{chr(0x2081 + index)}" if index < 9 else tag
        top.plot(
            steps,
            values,
            color=colors[index],
            lw=1.6 if index == 0 else 1.0,
            label=label,
            zorder=3 - index * 0.1,
        )
    if "sharpness/threshold" in scalars:
        steps, values = scalars["sharpness/threshold"]
        top.plot(steps, values, "k--", lw=1.2, label="stability threshold 2/η")
    top.set_ylabel("Hessian eigenvalue")
    top.set_ylim(bottom=0)
    top.legend(loc="lower right", frameon=False)
    top.set_title(title)
    top.grid(alpha=0.3)

    loss_tag = next(
        (t for t in ("train/loss", "train_loss", "loss") if t in scalars), None
    )
    if loss_tag is not None:
        steps, values = scalars[loss_tag]
        bottom.plot(steps, values, color="tab:red", lw=1.0)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bottom.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_ylabel("training loss")
        bottom.grid(alpha=0.3, which="both")
    bottom.set_xlabel("optimizer step")
    figure.tight_layout()
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "run_dir", help="a TensorBoard run directory, e.g. lightning_logs/version_0"
    )
    parser.add_argument("--output", default="sharpness.png", type=Path)
    parser.add_argument(
        "--title",
        default=(
            "Full-batch GD on digits, η = 0.2: sharpening, then the edge of stability"
        ),
    )
    args = parser.parse_args()
    plot(load_scalars(args.run_dir), args.output, args.title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
