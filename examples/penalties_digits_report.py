"""Table and figure of the runs of ``penalties_digits.py`` (see its docstring)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LABELS = {
    "gd-large": "GD η = 0.2",
    "gd-small": "GD η = 0.02",
    "igr": "η = 0.02 + gradient norm (c = 0.18)",
    "central-flow": "η = 0.02 + central flow (η★ = 0.2)",
}
ORDER = ["gd-large", "gd-small", "igr", "sharpness", "trace", "central-flow"]
THRESHOLD = 2 / 0.2


def label(name: str) -> str:
    kind, _, argument = name.partition(":")
    if kind == "sharpness":
        return f"η = 0.02 + sharpness (μ = {argument})"
    if kind == "trace":
        return f"η = 0.02 + trace (μ = {argument})"
    return LABELS.get(name, name)


def load(out: Path) -> tuple[dict[str, Any], dict[str, dict[int, torch.Tensor]]]:
    summaries, snapshots = {}, {}
    for path in sorted(out.glob("*.json")):
        summary = json.loads(path.read_text())
        summaries[summary["name"]] = summary
        snapshots[summary["name"]] = torch.load(path.with_suffix(".pt"))
    order = sorted(summaries, key=lambda n: (ORDER.index(n.partition(":")[0]), n))
    return {n: summaries[n] for n in order}, snapshots


def distances(
    snapshots: dict[str, dict[int, torch.Tensor]],
) -> dict[str, list[tuple[int, float]]]:
    """‖θ(t) − θ_large(t)‖ at the times both runs recorded."""
    reference = snapshots["gd-large"]
    return {
        name: [
            (t, float((points[t] - reference[t]).norm()))
            for t in sorted(points)
            if t in reference
        ]
        for name, points in snapshots.items()
    }


def stable_time(summaries: dict[str, Any], gaps: dict[str, list]) -> int | None:
    """The last snapshot time before the large-step run first reaches 2/0.2."""
    if "gd-large" not in summaries:
        return None
    crossing = min(
        (t for t, v in summaries["gd-large"]["sharpness"] if v >= THRESHOLD),
        default=None,
    )
    times = [t for t, _ in gaps["gd-large"] if crossing is None or t < crossing]
    return max(times) if times else None


def table(summaries: dict[str, Any], gaps: dict[str, list]) -> str:
    horizon = next(iter(summaries.values()))["horizon"]
    late = horizon / 2
    reference = gaps["gd-small"][-1][1] if "gd-small" in gaps else None
    early = stable_time(summaries, gaps)
    rows = [
        f"| run | λ₁ / (2/0.2), mean over t ≥ {late:g} | λ₁ / (2/0.2), max "
        "| train loss | test loss | test accuracy "
        f"| ‖θ − θ_large‖ at t = {early} | ‖θ − θ_large‖ at t = {horizon:g} "
        "| gap to GD η = 0.02 closed | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        values = [v for t, v in summary["sharpness"] if t >= late]
        peak = max(v for _, v in summary["sharpness"])
        distance = gaps[name][-1][1]
        stable = dict(gaps[name]).get(early, float("nan"))
        closed = (
            "—"
            if reference is None or name in ("gd-large", "gd-small")
            else f"{100 * (1 - distance / reference):.0f} %"
        )
        rows.append(
            f"| {label(name)} | {sum(values) / len(values) / THRESHOLD:.3f} "
            f"| {peak / THRESHOLD:.3f} | {summary['train_loss']:.4f} "
            f"| {summary['test_loss']:.4f} | {100 * summary['test_accuracy']:.1f} % "
            f"| {stable:.3f} | {distance:.3f} | {closed} "
            f"| {summary['seconds'] / 60:.0f} min |"
        )
    return "\n".join(rows)


def figure(summaries: dict[str, Any], gaps: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=90)
    for index, (name, summary) in enumerate(summaries.items()):
        style = {
            "color": f"C{index}",
            "linewidth": 1.2,
            "label": label(name),
            "alpha": 0.9,
        }
        times, values = zip(*summary["sharpness"], strict=True)
        axes[0].plot(times, values, **style)
        times, losses = zip(*summary["train_loss_history"], strict=True)
        axes[1].plot(times, losses, **style)
        if name != "gd-large":  # zero distance to itself: not drawn on a log scale
            times, gap = zip(*[(t, d) for t, d in gaps[name] if t > 0], strict=True)
            axes[2].plot(times, gap, marker=".", **style)
    axes[0].axhline(THRESHOLD, color="black", linestyle="--", linewidth=1)
    axes[0].annotate("2/0.2", (0, THRESHOLD), xytext=(2, 3), textcoords="offset points")
    axes[0].set(xlabel="time η·steps", ylabel="sharpness λ₁ (full batch)")
    axes[1].set(xlabel="time η·steps", ylabel="training loss", yscale="log")
    axes[2].set(
        xlabel="time η·steps",
        ylabel="‖θ(t) − θ_GD η=0.2(t)‖ (parameter distance)",
        yscale="log",
    )
    axes[0].set_title("sharpness against 2/η of the large step")
    axes[1].set_title("training loss")
    axes[2].set_title("distance to the large-step run")
    axes[0].legend(fontsize=7, loc="lower right")
    for axis in axes:
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def report(out: Path, figure_path: Path | None, table_path: Path | None) -> None:
    summaries, snapshots = load(out)
    gaps = distances(snapshots)
    text = table(summaries, gaps)
    print(text)
    if table_path is not None:
        table_path.write_text(text + "\n")
    if figure_path is not None:
        figure(summaries, gaps, figure_path)
