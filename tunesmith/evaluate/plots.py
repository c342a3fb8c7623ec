"""Evaluation figures: reliability diagram and confusion matrices (before | after)."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: Path) -> None:
    """Write a figure as tunesmith writes every PNG (tight layout, 110 dpi) and free it."""
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    pyplot().close(fig)


def _sides(before: dict | None, after: dict, key: str) -> list[tuple[str, dict]]:
    out = [("before training", before)] if before and key in before.get("metrics", {}) else []
    return out + [("after training", after)]


def reliability_diagram(before: dict | None, after: dict, out_png: Path) -> bool:
    """Accuracy against mean confidence per confidence bin, with the diagonal of perfect
    calibration and each bin's share of examples; before and after side by side. Returns False
    (writes nothing) when the evaluation has no calibration bins (a task without probabilities)."""
    if "calibration" not in after.get("metrics", {}):
        return False
    plt = pyplot()
    sides = _sides(before, after, "calibration")
    fig, axes = plt.subplots(1, len(sides), figsize=(4.6 * len(sides), 4.4), squeeze=False)
    for ax, (title, result) in zip(axes[0], sides):
        bins = result["metrics"]["calibration"]
        total = max(sum(b["count"] for b in bins), 1)
        width = bins[0]["upper"] - bins[0]["lower"]
        centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
        ax.bar(centres, [b["accuracy"] if b["count"] else 0 for b in bins], width=width * 0.95,
               edgecolor="tab:blue", color="tab:blue", alpha=0.75, label="accuracy in bin")
        ax.bar(centres, [b["count"] / total for b in bins], width=width * 0.45, color="tab:gray", alpha=0.6,
               label="share of examples")
        ax.plot([0, 1], [0, 1], "--", color="tab:red", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{title}: ECE {result['metrics']['ece']:.3f}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    save_figure(fig, out_png)
    return True


def confusion_plot(before: dict | None, after: dict, out_png: Path) -> bool:
    """Confusion matrices (rows: true class, columns: predicted), counts and row shares; before
    and after side by side. Returns False when the evaluation has none."""
    if not after.get("metrics", {}).get("confusion_matrix"):
        return False
    plt = pyplot()
    sides = _sides(before, after, "confusion_matrix")
    names = list(after["metrics"]["per_class"])
    size = max(3.6, 0.5 * len(names) + 2.5)
    fig, axes = plt.subplots(1, len(sides), figsize=(size * len(sides), size), squeeze=False)
    for ax, (title, result) in zip(axes[0], sides):
        cm = result["metrics"]["confusion_matrix"]
        shares = [[x / max(sum(row), 1) for x in row] for row in cm]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i, row in enumerate(cm):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x}\n{shares[i][j]:.0%}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.6 else "black")
        ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 4 else 0, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: accuracy {result['metrics']['accuracy']:.3f}", fontsize=10)
    save_figure(fig, out_png)
    return True
