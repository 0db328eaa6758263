"""Train a Switch model: the same entry point as `hf-switch train` (use it with `accelerate launch` or `deepspeed`)."""

from hf_switch.training import main

if __name__ == "__main__":
    main()
