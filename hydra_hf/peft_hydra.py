"""PEFT defaults for `model_type="hydra"`.

PEFT picks the modules an adapter wraps, when a config gives no `target_modules`, from its public
`peft.utils.constants.TRANSFORMERS_MODELS_TO_<METHOD>_TARGET_MODULES_MAPPING` dicts, keyed by `model_type`.
HYDRA names its modules as Llama does (`q_proj`, `k_proj`, `v_proj`, `o_proj` in attention, `gate_proj`, `up_proj`,
`down_proj` in every MLP and MoE expert, `input_layernorm`, `post_attention_layernorm`, `norm`), so every mapping
that has a `"llama"` entry gets the same entry under `"hydra"`: `LoraConfig(task_type="CAUSAL_LM")` adapts
`q_proj` and `v_proj`, IA3 adapts `k_proj`, `v_proj`, `down_proj`, and so on. The routers (`proj` of the MoD / MoR
routers, `gate` of the MoE blocks) are never a default target.

`register_peft_defaults()` runs when the first HYDRA model is built (PEFT always needs a model, so the defaults are
in place before `get_peft_model`), whether the model class comes from `hydra_hf` or from the remote code saved
next to a checkpoint (`trust_remote_code=True` without `hydra_hf` installed): this file travels with the remote
code. Entries already present for `"hydra"` are left alone, so a user's own registration wins. Without PEFT
installed it does nothing.
"""

from __future__ import annotations

import importlib.util

MODEL_TYPE = "hydra"
TEMPLATE_MODEL_TYPE = "llama"  # same module names
_registered = False


def register_peft_defaults() -> bool:
    """Add HYDRA's default target modules to PEFT's per-model-type mappings. Returns True if PEFT is installed."""
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("peft") is None:
        return False
    from peft.utils import constants

    for name in dir(constants):
        mapping = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_MODULES_MAPPING")):
            continue
        if isinstance(mapping, dict) and TEMPLATE_MODEL_TYPE in mapping:
            default = mapping[TEMPLATE_MODEL_TYPE]
            mapping.setdefault(MODEL_TYPE, default if isinstance(default, str) else list(default))
    _registered = True
    return True


__all__ = ["register_peft_defaults"]
