"""hf_switch: Switch Transformers as first-class citizens of the Hugging Face stack.

Importing the package registers `SwitchConfig` and the model classes with transformers' Auto classes, and the
checkpoint conversion that loads transformers' own `SwitchTransformers` checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .cache import SwitchCache
from .configuration_switch import SwitchConfig
from .conversion import register_checkpoint_conversion, save_as_switch_transformers, switch_config_from_transformers
from .distillation import DistillationTrainer, init_dense_student
from .hub import publish
from .lora import apply_lora, lora_config
from .modeling_switch import (
    SwitchEncoderModel,
    SwitchForConditionalGeneration,
    SwitchModel,
    SwitchPreTrainedModel,
    SwitchSeq2SeqOutput,
    SwitchStackOutput,
)
from .upcycling import upcycle

__version__ = "0.1.0"

AutoConfig.register(SwitchConfig.model_type, SwitchConfig)
AutoModel.register(SwitchConfig, SwitchModel)
AutoModelForSeq2SeqLM.register(SwitchConfig, SwitchForConditionalGeneration)
register_checkpoint_conversion()

__all__ = [
    "DistillationTrainer",
    "SwitchCache",
    "SwitchConfig",
    "SwitchEncoderModel",
    "SwitchForConditionalGeneration",
    "SwitchModel",
    "SwitchPreTrainedModel",
    "SwitchSeq2SeqOutput",
    "SwitchStackOutput",
    "apply_lora",
    "init_dense_student",
    "lora_config",
    "publish",
    "save_as_switch_transformers",
    "switch_config_from_transformers",
    "upcycle",
]
