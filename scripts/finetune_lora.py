"""LoRA finetuning of a Switch model: the same entry point as `hf-switch finetune`."""

import sys

from hf_switch.cli import main

if __name__ == "__main__":
    main(["finetune", *sys.argv[1:]])
