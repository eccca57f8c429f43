"""The loss curve, drawn on a matplotlib Axes: for the training's own `loss_curve.png` and
for the picture of `trajflow run`'s report. It imports no torch, so that the report uses it
where torch is not installed (and matplotlib only when drawing)."""
from __future__ import annotations

import math
from typing import Any

LOG_SCALE_SPAN = 30  # losses spanning more than this factor are drawn on a log scale


def finite_number(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(float(value)) else None


def plot_losses(ax: Any, history: list[dict[str, Any]], initial_val_loss: float | None) -> bool:
    """Training and validation loss per epoch (epoch 0: the untrained model's validation
    loss); False when there was nothing to plot. Entries without a finite loss are left out."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(h["epoch"]) + 1 if finite_number(h.get("epoch")) is not None else i + 1 for i, h in enumerate(history)]
    plotted: list[float] = []
    for key, label, style in (("train_loss", "training", "-o"), ("val_loss", "validation", "-s")):
        points = [(e, finite_number(h.get(key))) for e, h in zip(epochs, history)]
        points = [(e, v) for e, v in points if v is not None]
        if key == "val_loss" and finite_number(initial_val_loss) is not None:
            points.insert(0, (0, float(initial_val_loss)))  # type: ignore[arg-type]
        if points:
            ax.plot([e for e, _ in points], [v for _, v in points], style, markersize=4, label=label)
            plotted += [v for _, v in points]
    positive = [v for v in plotted if v > 0]
    if positive and len(positive) == len(plotted) and max(positive) / min(positive) > LOG_SCALE_SPAN:
        ax.set_yscale("log")
    if plotted:
        ax.legend()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("loss (MSE, normalised units)")
    ax.grid(True, alpha=0.3)
    return bool(plotted)
