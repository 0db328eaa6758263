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
    # The deepspeed launcher puts --local_rank=N first; it belongs to the script's arguments.
    launcher_flags = [flag for flag in sys.argv[1:] if flag.startswith("--local_rank=")]
    script, *arguments = [argument for argument in sys.argv[1:] if argument not in launcher_flags]
    sys.argv = [script, *arguments, *launcher_flags]
    runpy.run_path(script, run_name="__main__")
