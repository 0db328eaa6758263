"""Paired timing: variants run in alternation, and each variant's cost is the median of its per-round ratio to a
baseline, which cancels the slow drifts of a CPU shared with other work."""

import statistics
import time
from collections.abc import Callable

from .device import synchronize


def compare(variants: dict[str, Callable[[], object]], baseline: str, rounds: int, warmup: int = 2) -> dict:
    """Time each variant `rounds` times, alternating, rotating the order every round.

    Returns:
        `{name: {"median_s": seconds, "ratio": median over rounds of time / baseline's time in that round}}`.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            start = time.perf_counter()
            variants[name]()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return {
        name: {
            "median_s": statistics.median(times[name]),
            "ratio": statistics.median(t / b for t, b in zip(times[name], times[baseline], strict=True)),
        }
        for name in names
    }
