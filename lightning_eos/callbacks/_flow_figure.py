"""The figure of :class:`FlowMonitor`: gradient descent beside its flows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_COLORS = {"gd": "0.55", "gradient": "tab:blue", "central": "tab:orange"}
_NAMES = {"gradient": "gradient flow", "central": "central flow"}


def centered_average(values: Sequence[float], half_width: int) -> list[float]:
    """Mean over ``[i − half_width, i + half_width]``; NaN where it leaves the data."""
    out = []
    for index in range(len(values)):
        if index < half_width or index + half_width >= len(values):
            out.append(float("nan"))
            continue
        window = values[index - half_width : index + half_width + 1]
        out.append(sum(window) / len(window))
    return out


def comparison_figure(history: Sequence[Any], title: str = "") -> Any:
    """Loss, sharpness, distance to gradient descent and the critical set, by step.

    Args:
        history: :class:`~lightning_eos.callbacks.FlowMonitorRecord` entries.
        title: Figure title.

    Returns:
        A ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure  # optional dependency, imported on use

    steps = [r.step for r in history]
    flows = list(history[0].flows) if history else []
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True)
    loss, sharpness, distance, critical = axes.flat

    gd_loss = [r.gd_loss for r in history]
    loss.plot(steps, gd_loss, color=_COLORS["gd"], lw=0.6, label="gradient descent")
    loss.plot(
        steps,
        centered_average(gd_loss, 10),
        color="black",
        lw=1.2,
        label="gradient descent, mean over ±10 steps",
    )
    for name in flows:
        values = [r.flows[name].loss for r in history]
        style = "--" if name == "central" else "-"
        loss.plot(steps, values, style, color=_COLORS[name], lw=1.2, label=_NAMES[name])
    if "central" in flows:
        predicted = [r.flows["central"].loss_average for r in history]
        loss.plot(
            steps,
            predicted,
            color=_COLORS["central"],
            lw=1.6,
            label="central flow: predicted mean loss",
        )
    loss.set_yscale("log")
    loss.set_ylabel("training loss")
    loss.legend(fontsize=8)

    measured = [(r.step, r.gd_sharpness) for r in history if r.gd_sharpness is not None]
    if measured:
        sharpness.plot(
            *zip(*measured, strict=True),
            color=_COLORS["gd"],
            lw=0.8,
            label="gradient descent",
        )
    for name in flows:
        values = [r.flows[name].sharpness for r in history]
        sharpness.plot(steps, values, color=_COLORS[name], lw=1.2, label=_NAMES[name])
    thresholds = [r.threshold for r in history]
    preconditioned = bool(history) and history[0].threshold != 2.0 / history[0].lr
    label = "threshold 2" if preconditioned else "2/η"
    sharpness.plot(steps, thresholds, ":", color="black", lw=1.0, label=label)
    sharpness.set_ylabel("sharpness λ₁(P⁻¹H)" if preconditioned else "sharpness λ₁")
    sharpness.legend(fontsize=8)

    for name in flows:
        values = [r.distances.get(name, float("nan")) for r in history]
        distance.plot(steps, values, color=_COLORS[name], lw=1.2, label=_NAMES[name])
    distance.set_ylabel("‖θ_GD − θ_flow‖ / ‖θ_GD − θ₀‖")
    distance.set_xlabel("step (flow time)")
    distance.set_ylim(bottom=0)
    if flows:
        distance.legend(fontsize=8)

    if "central" in flows:
        critical.step(
            steps,
            [r.flows["central"].critical for r in history],
            where="post",
            color=_COLORS["central"],
            label="critical directions (rank Σ)",
        )
        ax2 = critical.twinx()
        ax2.plot(
            steps,
            [sum(r.flows["central"].variances) for r in history],
            color="tab:green",
            lw=1.0,
            label="tr Σ",
        )
        ax2.set_ylabel("tr Σ (oscillation variance)", color="tab:green")
        critical.legend(fontsize=8, loc="upper left")
    critical.set_ylabel("critical directions")
    critical.set_xlabel("step (flow time)")
    if title:
        figure.suptitle(title)
    return figure
