"""hydra_hf: the HYDRA architecture for the Hugging Face stack.

Importing this package registers `HydraConfig` (model_type "hydra"), `HydraModel` and
`HydraForCausalLM` with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`, and names them in
transformers' model-name tables (`MODEL_MAPPING_NAMES`, `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), as an
in-tree model is named. Code that reads those tables then treats HYDRA like Llama: the `Trainer`
shifts labels for label smoothing, the text-generation pipeline accepts the model, the `Trainer`
refuses a bare `HydraModel` with its usual message. (The Auto classes resolve HYDRA through their
registration; the tables only name the classes, they never import them.)
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.auto import modeling_auto

from .cache_hydra import HydraCache, HydraCacheLayer, HydraDynamicLayer, HydraStaticCache, HydraStaticLayer
from .configuration_hydra import PRESET_NAMES, HydraConfig
from .modeling_hydra import (
    HydraCausalLMOutputWithPast,
    HydraForCausalLM,
    HydraModel,
    HydraModelOutput,
    HydraPreTrainedModel,
)
from .routing_hydra import ROUTING_MODES, RoutingRecord, RoutingState, register_routing_mode
from .export_hydra import register_pytree_nodes

__version__ = "0.1.0"

AutoConfig.register("hydra", HydraConfig, exist_ok=True)
AutoModel.register(HydraConfig, HydraModel, exist_ok=True)
AutoModelForCausalLM.register(HydraConfig, HydraForCausalLM, exist_ok=True)
HydraConfig.register_for_auto_class()
HydraModel.register_for_auto_class("AutoModel")
HydraForCausalLM.register_for_auto_class("AutoModelForCausalLM")
modeling_auto.MODEL_MAPPING_NAMES.setdefault("hydra", "HydraModel")
modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault("hydra", "HydraForCausalLM")
register_pytree_nodes()  # the cache and the routing record as pytree nodes, for transformers' exporters

__all__ = [
    "HydraConfig",
    "PRESET_NAMES",
    "HydraModel",
    "HydraForCausalLM",
    "HydraPreTrainedModel",
    "HydraCache",
    "HydraCacheLayer",
    "HydraDynamicLayer",
    "HydraStaticCache",
    "HydraStaticLayer",
    "HydraCausalLMOutputWithPast",
    "HydraModelOutput",
    "RoutingRecord",
    "RoutingState",
    "ROUTING_MODES",
    "register_routing_mode",
]
