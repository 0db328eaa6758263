"""Run a script as `__main__` with accelerate building FSDP on CPU ranks.

accelerate 1.16 selects `DistributedType.FSDP` only on accelerator devices: on CPU ranks an FSDP plugin yields
`MULTI_CPU` (plain data parallelism). This entry point changes that one decision after `AcceleratorState` made it,
as accelerate makes it on GPUs, so that the Trainer's FSDP2 path (accelerate's `fsdp2_prepare_model`, mixed precision,
FSDP checkpoints and resume, the gathered save) runs on gloo ranks unchanged.
Usage: `torchrun --nproc_per_node N tests/fsdp_cpu_entry.py SCRIPT ARGS` (with `ACCELERATE_USE_CPU=true`).
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_initialise = AcceleratorState.__init__


def _initialise_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _initialise(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _initialise_with_fsdp_on_cpu

if __name__ == "__main__":
    script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
