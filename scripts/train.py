"""Train a Switch model: the same entry point as `hf-switch train` (use it with `accelerate launch` or `deepspeed`)."""

import sys

from hf_switch.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
