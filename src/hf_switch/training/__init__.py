"""Training Switch models with transformers' `Seq2SeqTrainer`: data, span corruption, metrics, dashboards."""

from .arguments import PRESETS, DataArguments, ModelArguments
from .callbacks import BalancingStepCallback, RoutingDashboardCallback, add_routing_dashboard
from .span_corruption import SpanCorruption
from .train import main, run
from .trainer import SwitchTrainer

__all__ = [
    "PRESETS",
    "BalancingStepCallback",
    "DataArguments",
    "ModelArguments",
    "RoutingDashboardCallback",
    "SpanCorruption",
    "SwitchTrainer",
    "add_routing_dashboard",
    "main",
    "run",
]
