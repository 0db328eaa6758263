"""Distil a Switch teacher into a dense T5 student: the same entry point as `hf-switch distill`."""

from hf_switch.distillation import distill_main

if __name__ == "__main__":
    distill_main()
