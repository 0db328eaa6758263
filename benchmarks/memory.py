"""Peak memory of one model's training steps, alone in a fresh process: `python -m benchmarks.memory '<json>'`.

The JSON is `{"kind": "hf_switch" | "transformers" | "t5", "case": {ModelCase fields}, "steps": n}`. Prints one JSON
line, in MiB: the resident set size after imports and after building the model, its peak over the steps (the
kernel's high-water mark `VmHWM`, reset after building so that import-time peaks do not count), and the parameters'
size.
"""

import json
import resource
import sys

import torch

from .model import ModelCase, batch, build_model, train_step


def resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**10


def main(spec: dict) -> dict:
    torch.set_num_threads(2)
    imported = resident_mib()
    case = ModelCase(**spec["case"])
    model = build_model(case, spec["kind"])
    step = train_step(model, batch(case))
    built = resident_mib()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident set size
    for _ in range(spec["steps"]):
        step()
    return {
        "imported_mib": imported,
        "built_mib": built,
        "peak_mib": peak_resident_mib(),
        "parameter_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
