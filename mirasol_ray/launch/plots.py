"""PNG plots of a run's metrics (matplotlib, Agg): learning curves, and the bytes of any figure for storage."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen; other modules take plt from here)

from mirasol_ray import storage  # noqa: E402

_BELOW = {"fontsize": 7, "loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncol": 2, "frameon": False}
"""A legend below its axes: it never covers a curve."""


def plot_curves(records: list[dict[str, Any]], png: str, title: str = "") -> str | None:
    """Learning curves from metrics.jsonl records into one PNG: the loss parts, with the validation loss and the
    loss on the scored training clips (``train_eval``) as points; beside them each task metric on held-out clips
    (solid) and on training clips (dashed, same colour): the gap between the two is memorisation."""
    if not records:
        return None
    loss_keys = [k for k in records[0] if k in ("loss", "text", "latent", "cls")]
    metric_keys = sorted({k for r in records for split in ("val", "train_eval") for k in r.get(split, {})}
                         - {"loss"})  # the losses go beside training's
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(11 if metric_keys else 6, 4.8), squeeze=False)
    ax = axes[0, 0]
    for k in loss_keys:
        pts = [(r["step"], r[k]) for r in records if k in r]
        ax.plot(*zip(*pts), label=k)
    for split, label, marker in (("val", "validation loss", "o"), ("train_eval", "loss on training clips", "x")):
        pts = [(r["step"], r[split]["loss"]) for r in records if "loss" in r.get(split, {})]
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(**_BELOW)
    ax.set_title(title or "training loss")
    if metric_keys:
        ax = axes[0, 1]
        for i, k in enumerate(metric_keys):
            colour = f"C{i % 10}"
            for split, style, suffix in (("val", "-", "held-out"), ("train_eval", "--", "train")):
                pts = [(r["step"], r[split][k]) for r in records if k in r.get(split, {})]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o" if split == "val" else "x", color=colour,
                            label=f"{k} ({suffix})")
        ax.set_xlabel("step")
        ax.set_ylabel("metric: held-out (solid), training clips (dashed)")
        ax.set_ylim(0, 1)
        ax.legend(**_BELOW)
    fig.tight_layout()
    data = png_bytes(fig)
    plt.close(fig)
    storage.write_bytes(png, data)
    return png


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()
