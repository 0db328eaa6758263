"""Peak memory of one model's training steps, alone in a fresh process: `python -m benchmarks.memory '<json>'`.

The JSON is `{"kind": "hf_switch" | "transformers" | "t5", "case": {ModelCase fields}, "steps": n}`. Prints one JSON
line, in MiB: the resident set size after imports and after building the model, its peak over the steps (the
kernel's high-water mark `VmHWM`, reset after building so that import-time peaks do not count), and the parameters'
size.
"""

import json
import sys

import torch

from . import device
from .model import ModelCase, batch, build_model, train_step


def main(spec: dict) -> dict:
    torch.set_num_threads(2)
    device.use(spec["device"], spec["dtype"])
    imported = device.memory_mib()
    case = ModelCase(**spec["case"])
    model = build_model(case, spec["kind"])
    built, peak = device.step_memory_mib(train_step(model, batch(case)), spec["steps"])
    return {
        "imported_mib": imported,
        "built_mib": built,
        "peak_mib": peak,
        "parameter_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
