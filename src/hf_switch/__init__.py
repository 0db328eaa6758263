"""hf_switch: Switch Transformers as first-class citizens of the Hugging Face stack.

Importing the package registers `SwitchConfig` and the model classes with transformers' Auto classes, and the
checkpoint conversion that loads transformers' own `SwitchTransformers` checkpoints.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

from .cache import SwitchCache
from .configuration_switch import SwitchConfig
from .conversion import register_checkpoint_conversion, save_as_switch_transformers, switch_config_from_transformers
from .modeling_switch import (
    SwitchEncoderModel,
    SwitchForConditionalGeneration,
    SwitchModel,
    SwitchPreTrainedModel,
    SwitchSeq2SeqOutput,
    SwitchStackOutput,
)

__version__ = "0.1.0"

AutoConfig.register(SwitchConfig.model_type, SwitchConfig)
AutoModel.register(SwitchConfig, SwitchModel)
AutoModelForSeq2SeqLM.register(SwitchConfig, SwitchForConditionalGeneration)
register_checkpoint_conversion()

__all__ = [
    "SwitchCache",
    "SwitchConfig",
    "SwitchEncoderModel",
    "SwitchForConditionalGeneration",
    "SwitchModel",
    "SwitchPreTrainedModel",
    "SwitchSeq2SeqOutput",
    "SwitchStackOutput",
    "save_as_switch_transformers",
    "switch_config_from_transformers",
]
