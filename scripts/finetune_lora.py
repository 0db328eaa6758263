"""LoRA finetuning of a Switch model: the same entry point as `hf-switch finetune`."""

from hf_switch.lora import finetune_main

if __name__ == "__main__":
    finetune_main()
