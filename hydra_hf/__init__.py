"""hydra_hf: the HYDRA architecture for the Hugging Face stack.

Importing this package registers `HydraConfig` (model_type "hydra"), `HydraModel` and
`HydraForCausalLM` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_hydra import HydraCache, HydraCacheLayer, HydraStaticCache
from .configuration_hydra import PRESET_NAMES, HydraConfig
from .modeling_hydra import (
    HydraCausalLMOutputWithPast,
    HydraForCausalLM,
    HydraModel,
    HydraModelOutput,
    HydraPreTrainedModel,
)
from .routing_hydra import RoutingRecord, RoutingState

__version__ = "0.1.0"

AutoConfig.register("hydra", HydraConfig, exist_ok=True)
AutoModel.register(HydraConfig, HydraModel, exist_ok=True)
AutoModelForCausalLM.register(HydraConfig, HydraForCausalLM, exist_ok=True)
HydraConfig.register_for_auto_class()
HydraModel.register_for_auto_class("AutoModel")
HydraForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "HydraConfig",
    "PRESET_NAMES",
    "HydraModel",
    "HydraForCausalLM",
    "HydraPreTrainedModel",
    "HydraCache",
    "HydraCacheLayer",
    "HydraStaticCache",
    "HydraCausalLMOutputWithPast",
    "HydraModelOutput",
    "RoutingRecord",
    "RoutingState",
]
