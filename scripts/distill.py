"""Distil a Switch teacher into a dense T5 student: the same entry point as `hf-switch distill`."""

import sys

from hf_switch.cli import main

if __name__ == "__main__":
    main(["distill", *sys.argv[1:]])
