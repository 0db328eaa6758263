"""PNG plots written at the end of training: loss curves and expert load per sparse layer over training."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curves(log_history: list[dict], path: Path) -> None:
    """Training loss and, when evaluated, validation loss against the step."""
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if key == "eval_loss" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_expert_load(history: list[dict], path: Path) -> None:
    """One heatmap per sparse layer: each expert's share of the layer's tokens (colour) at each logged step."""
    layers = list(history[0]["layers"])
    figure, axes = plt.subplots(len(layers), 1, figsize=(7, 1.6 * len(layers) + 0.8), squeeze=False)
    steps = [entry["step"] for entry in history]
    for axis, layer in zip(axes[:, 0], layers, strict=True):
        counts = np.array([entry["layers"][layer]["expert_counts"] for entry in history], dtype=float)
        shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        image = axis.imshow(shares.T, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
        axis.set_ylabel(layer, rotation=0, ha="right", fontsize=8)
        axis.set_xticks(range(len(steps)), [str(step) for step in steps], fontsize=6)
        figure.colorbar(image, ax=axis, fraction=0.02)
    axes[-1, 0].set_xlabel("step")
    figure.suptitle("expert load (share of tokens) per sparse layer")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
