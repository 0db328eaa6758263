"""PNG plots written at the end of training: loss curves and expert load per sparse layer over training."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_loss_curves(log_history: list[dict], path: Path) -> None:
    """Training loss and, when evaluated, validation loss against the step; nothing is written when no loss was
    logged, as in a run shorter than its logging interval."""
    curves = {
        label: [(entry["step"], entry[key]) for entry in log_history if key in entry]
        for key, label in (("loss", "train"), ("eval_loss", "validation"))
    }
    if not any(curves.values()):
        return
    figure, axes = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, marker="o" if label == "validation" else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _step_ticks(axis, steps: list[int]) -> None:
    """At most 12 readable step labels under a plot whose x positions are the indices of `steps`."""
    shown = range(0, len(steps), max(1, len(steps) // 12))
    axis.set_xlim(-0.5, len(steps) - 0.5)
    axis.set_xticks(list(shown), [str(steps[index]) for index in shown], fontsize=8)


def plot_expert_load(history: list[dict], path: Path) -> None:
    """One heatmap per sparse layer of each expert's share of the layer's tokens at each logged step, on one colour
    scale, then each layer's max violation (max/mean load - 1) and dropped fraction over the same steps."""
    layers = list(history[0]["layers"])
    steps = [entry["step"] for entry in history]
    shares = {}
    for layer in layers:
        counts = np.array([entry["layers"][layer]["expert_counts"] for entry in history], dtype=float)
        shares[layer] = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    top_share = max(share.max() for share in shares.values())
    figure, axes = plt.subplots(
        len(layers) + 2, 1, figsize=(8, 1.9 * len(layers) + 4.5), squeeze=False, layout="constrained"
    )
    for axis, layer in zip(axes[: len(layers), 0], layers, strict=True):
        image = axis.imshow(
            shares[layer].T, aspect="auto", cmap="viridis", vmin=0, vmax=top_share, interpolation="nearest"
        )
        axis.set_title(layer, fontsize=9, loc="left")
        axis.set_ylabel("expert", fontsize=8)
        _step_ticks(axis, steps)
    figure.colorbar(image, ax=axes[: len(layers), 0].tolist(), fraction=0.02, label="share of the layer's tokens")
    for axis, key in zip(axes[len(layers) :, 0], ("max_violation", "dropped_fraction"), strict=True):
        for layer in layers:
            axis.plot([entry["layers"][layer][key] for entry in history], marker=".", label=layer)
        _step_ticks(axis, steps)
        axis.set_ylabel(key.replace("_", " "), fontsize=8)
        axis.legend(fontsize=7, ncol=len(layers))
    axes[-1, 0].set_xlabel("step")
    figure.suptitle("expert load per sparse layer (one colour scale for all layers)")
    figure.savefig(path, dpi=120)
    plt.close(figure)
