"""Routing callbacks: the end of each optimizer step for balancing, and dashboards of per sparse layer losses,
expert load balance and dropped tokens, logged and plotted."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..modeling_switch import SwitchStack
from ..routing import end_balancing_step
from .plots import plot_expert_load, plot_loss_curves

STATS_FILE = "routing_stats.json"


class BalancingStepCallback(TrainerCallback):
    """Tells the routers that an optimizer step is done (`routing.end_balancing_step`): expert biases move against the
    step's load, and the global-batch load-balancing loss starts counting the next step's micro-batches.

    `SwitchTrainer` adds it."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        end_balancing_step(model)


class TrainingClockCallback(TrainerCallback):
    """Adds `train_seconds` to every entry of the log history and to the training logs: seconds spent in training
    steps so far, evaluation and saving left out.

    Curves of loss against wall-clock time compare runs by it. A resumed run continues from the last logged value.
    """

    def __init__(self):
        self.seconds, self._step_start = 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        logged = [entry["train_seconds"] for entry in state.log_history if "train_seconds" in entry]
        self.seconds = logged[-1] if logged else 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._step_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        seconds = round(self.seconds, 3)
        # An evaluation's `logs` is the metrics dict `evaluate()` returns (and `eval_results.json` holds): only the
        # training logs, which loggers read, get the clock.
        if "loss" in logs:
            logs["train_seconds"] = seconds
        # Trainer appends a copy of `logs` to the history before calling back; the history is what checkpoints keep.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["train_seconds"] = seconds


@dataclass
class _LayerTotals:
    """Sums over the training forwards since the last log."""

    forwards: int = 0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    dropped_fraction: float = 0.0
    expert_counts: torch.Tensor | None = None

    def add(self, stats) -> None:
        self.forwards += 1
        self.aux_loss += stats.aux_loss.item()
        self.z_loss += stats.z_loss.item()
        self.dropped_fraction += stats.dropped_fraction.item()
        counts = stats.expert_counts.detach().cpu()
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts

    def as_tensor(self) -> torch.Tensor:
        scalars = torch.tensor([self.forwards, self.aux_loss, self.z_loss, self.dropped_fraction], dtype=torch.float64)
        return torch.cat([scalars, self.expert_counts.to(torch.float64)])


def _summary(totals: torch.Tensor) -> dict:
    """Means over forwards and load-balance figures from `_LayerTotals.as_tensor()` (summed over processes)."""
    forwards, counts = totals[0].clamp(min=1), totals[4:]
    mean_load = counts.mean().clamp(min=1e-12)
    return {
        "aux_loss": (totals[1] / forwards).item(),
        "z_loss": (totals[2] / forwards).item(),
        "dropped_fraction": (totals[3] / forwards).item(),
        "load_max_over_mean": (counts.max() / mean_load).item(),
        "max_violation": (counts.max() / mean_load - 1).item(),
        "load_cv": (counts.std(unbiased=False) / mean_load).item(),
        "expert_counts": counts.long().tolist(),
    }


@dataclass
class RoutingDashboardCallback(TrainerCallback):
    """Logs routing health per sparse layer to the Trainer's loggers; plots it when training ends.

    At every training log it adds, for each sparse layer (`encoder.1`, `decoder.3`, ...), the mean router aux and
    z losses, the dropped-token fraction, and the expert load balance (max/mean, max violation = max/mean - 1, and
    coefficient of variation of token counts) since the previous log, summed over processes; with expert biases,
    their spread (max - min). At the end it writes `routing_stats.json` (the
    per-log history with token counts per expert), `loss_curves.png` and `expert_load.png` to the output dir. Each
    checkpoint gets the history so far, from which a resumed run continues it.

    It edits the logs in `on_log`, so it must run before the reporting callbacks: add it with
    [`add_routing_dashboard`].
    """

    history: list[dict] = field(default_factory=list)
    _totals: dict[str, _LayerTotals] = field(default_factory=dict)
    _hooks: list = field(default_factory=list)
    _expert_biases: dict[str, torch.Tensor] = field(default_factory=dict)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:  # resumed from a checkpoint
            self.history = _checkpoint_history(args, state.global_step)
        for name, module in model.named_modules():
            if isinstance(module, SwitchStack):
                stack = name.rsplit(".", 1)[-1]
                sparse = {f"{stack}.{index}": block for index, block in enumerate(module.block) if block.is_sparse}
                self._hooks.append(module.register_forward_hook(self._recorder(list(sparse))))
                routers = {layer: block.layer[-1].mlp.router for layer, block in sparse.items()}
                self._expert_biases.update(
                    {layer: router.expert_bias for layer, router in routers.items() if router.uses_expert_bias}
                )

    def _recorder(self, layers: list[str]):
        def record(module, inputs, output):
            if module.training:
                for layer, stats in zip(layers, output.routing, strict=True):
                    self._totals.setdefault(layer, _LayerTotals()).add(stats)

        return record

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._totals:
            return
        layers = list(self._totals)  # first-forward order: encoder layers, then decoder layers
        totals = torch.stack([self._totals[layer].as_tensor() for layer in layers])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        entry = {"step": state.global_step, "layers": {}}
        for layer, layer_totals in zip(layers, totals, strict=True):
            summary = _summary(layer_totals)
            if layer in self._expert_biases:
                bias = self._expert_biases[layer]
                summary["expert_bias_spread"] = (bias.max() - bias.min()).item()
            entry["layers"][layer] = summary
            for name, value in summary.items():
                if name != "expert_counts":
                    logs[f"routing/{layer}/{name}"] = round(value, 6)
        self.history.append(entry)
        self._totals.clear()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            (checkpoint / STATS_FILE).write_text(json.dumps({"history": self.history}))

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if not state.is_world_process_zero:
            return
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / STATS_FILE).write_text(json.dumps({"history": self.history}, indent=1))
        plot_loss_curves(state.log_history, output_dir / "loss_curves.png")
        if self.history:
            plot_expert_load(self.history, output_dir / "expert_load.png")


def _checkpoint_history(args, step: int) -> list[dict]:
    """The routing history up to `step` saved with the checkpoint a run resumes from (`--resume_from_checkpoint`,
    else the output dir's checkpoint of that step); empty for a checkpoint saved without one."""
    folders = [Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"]
    if isinstance(args.resume_from_checkpoint, str):
        folders.insert(0, Path(args.resume_from_checkpoint))
    for folder in folders:
        if (folder / STATS_FILE).is_file():
            history = json.loads((folder / STATS_FILE).read_text())["history"]
            return [entry for entry in history if entry["step"] <= step]
    return []


def console_logs(logs: dict) -> dict:
    """`logs` for the console: the per-layer `routing/*` entries (for TensorBoard and `routing_stats.json`) become
    one `routing` entry with the worst layer's dropped fraction and max violation."""
    console = {name: value for name, value in logs.items() if not name.startswith("routing/")}
    per_layer: dict[str, dict] = {}
    for name, value in logs.items():
        if name.startswith("routing/"):
            _, layer, metric = name.split("/", 2)
            per_layer.setdefault(layer, {})[metric] = value
    if per_layer:
        dropped = max(per_layer, key=lambda layer: per_layer[layer]["dropped_fraction"])
        violated = max(per_layer, key=lambda layer: per_layer[layer]["max_violation"])
        console["routing"] = (
            f"dropped {100 * per_layer[dropped]['dropped_fraction']:.1f}% ({dropped}), "
            f"max violation {per_layer[violated]['max_violation']:.2f} ({violated})"
        )
    return console


class CompactProgressCallback(ProgressCallback):
    """Trainer's progress bar, printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=None if logs is None else console_logs(logs), **kwargs)


class CompactPrinterCallback(PrinterCallback):
    """Trainer's log printer (with `disable_tqdm`), printing `console_logs(logs)`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=None if logs is None else console_logs(logs), **kwargs)


def add_routing_dashboard(trainer: Trainer) -> RoutingDashboardCallback:
    """Attach a `RoutingDashboardCallback` ahead of the reporting callbacks, so they log what it adds, and keep the
    console to one routing entry per log (`console_logs`)."""
    callback = RoutingDashboardCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    for plain, compact in ((ProgressCallback, CompactProgressCallback), (PrinterCallback, CompactPrinterCallback)):
        if trainer.pop_callback(plain) is not None:
            trainer.add_callback(compact)
    return callback
