"""Run a script as `__main__` after turning off DeepSpeed's shared-memory comm op build.

`deepspeed.init_distributed` on a CPU JIT-compiles that op (about a minute, cold) for fast CPU all-reduces; the
multi-process tests use gloo and do not need it.
Usage: `accelerate launch ... tests/deepspeed_cpu_entry.py SCRIPT ARGS`.
"""

import runpy
import sys

import deepspeed.comm.torch  # noqa: F401  (imported for the module object, patched through sys.modules)

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

if __name__ == "__main__":
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
