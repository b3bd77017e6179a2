"""HYDRA model configuration (`HydraConfig`) and the size presets of the product spec.

The config follows transformers' own (Llama / Mixtral) names wherever the concept exists
there and prefixes HYDRA-only fields by component (``mod_*``, ``mor_*``, ``moe_*``,
CCGQA fields). Every field is validated in ``validate_architecture``, the hook of the ``@strict``
validation that transformers runs at construction, in ``config.validate()`` and in
``save_pretrained``, with an error that names the field and the allowed values.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

# The one list of kernel backends. The dispatcher (``ops_hydra``) imports it from here: the config never imports
# the ops (nothing in this module depends on which kernels exist).
KERNEL_BACKENDS = ("auto", "triton", "liger", "torch")
# ``rope_parameters["rope_type"]`` values HYDRA runs ("default" plus transformers' ``ROPE_INIT_FUNCTIONS`` that
# apply to one RoPE over a partial rotary dim).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # HYDRA's default (transformers' is 1.0)

MOR_SHARING_MODES = ("sequence", "middle_cycle")

# The routing modes a config may name, per component (`mod_routing`, `mor_routing`). routing_hydra.ROUTING_MODES maps
# each to its router class; `routing_hydra.register_routing_mode` adds a mode to both tables.
ROUTING_MODE_NAMES: dict[str, list[str]] = {"mod": ["expert_choice"], "mor": ["expert_choice", "token_choice"]}
MOR_ROUTING_MODES = tuple(ROUTING_MODE_NAMES["mor"])  # the built-in ones

# name -> (hidden, unique blocks, recursions, query heads, kv heads, intermediate, vocab)
# Latent head dim h = hidden / (compression_factor * query heads), compression_factor = 4.
_PRESETS = {
    "debug": dict(hidden_size=512, num_unique_blocks=2, mor_recursions=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=2048),
    "50M": dict(hidden_size=512, num_unique_blocks=8, mor_recursions=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=1792),
    "100M": dict(hidden_size=768, num_unique_blocks=8, mor_recursions=4, num_attention_heads=6,
                 num_key_value_heads=2, intermediate_size=3328),
    "250M": dict(hidden_size=1024, num_unique_blocks=10, mor_recursions=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=4608),
    "500M": dict(hidden_size=1280, num_unique_blocks=16, mor_recursions=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=5760),
    "750M": dict(hidden_size=1536, num_unique_blocks=18, mor_recursions=4, num_attention_heads=6,
                 num_key_value_heads=2, intermediate_size=6784),
    "1B": dict(hidden_size=1792, num_unique_blocks=20, mor_recursions=4, num_attention_heads=8,
               num_key_value_heads=2, intermediate_size=7936),
    "1.5B": dict(hidden_size=2048, num_unique_blocks=22, mor_recursions=4, num_attention_heads=8,
                 num_key_value_heads=2, intermediate_size=9472),
    # ~0.8M-parameter char-level models (vocab ~65, block 64): the best configuration of the quality
    # benchmark (benchmarks/bench_quality.py, docs/results.md) against a 4 x 128 Llama with tied embeddings.
    # Two wide blocks instead of four narrow ones (half the per-layer tensor ops, which is what a step
    # costs at this size), MHA at C=1, the cheap CCGQA features only (value shift, a 2-tap causal conv
    # on q/k, partial RoPE, L2 q/k norm + temperature); routing stays off because at this size it loses
    # per unit of wall-clock (measured, docs/results.md). Init std 0.04: at this width the usual 0.02 leaves
    # the weights too small for lr 1e-3 (0.04 measured best of 0.01-0.05). <= 1.05x the Llama's parameters
    # for vocabularies up to ~1000 (the embedding is 176 wide against the Llama's 128).
    "tiny": dict(hidden_size=176, num_unique_blocks=2, mor_recursions=1, num_attention_heads=4,
                 num_key_value_heads=4, intermediate_size=480, compression_factor=1, qk_conv_kernel_size=2,
                 qk_channel_conv_kernel_size=1, use_qk_mean=False, use_value_shift=True,
                 partial_rotary_factor=0.5, initializer_range=0.04, tie_word_embeddings=True),
}
PRESET_NAMES = tuple(_PRESETS)


@strict(accept_kwargs=True)
class HydraConfig(PreTrainedConfig):
    r"""
    Configuration of a HYDRA decoder-only language model ([`HydraModel`], [`HydraForCausalLM`]).

    HYDRA runs attention in a compressed latent space (CCGQA), lets tokens skip blocks
    (Mixture-of-Depths), gives each token its own number of passes through weight-shared
    blocks (Mixture-of-Recursions) and can add Mixture-of-Experts FFN blocks.

    Args:
        vocab_size (`int`, *optional*, defaults to 50257):
            Size of the token vocabulary.
        hidden_size (`int`, *optional*, defaults to 512):
            Width E of the residual stream.
        intermediate_size (`int`, *optional*, defaults to 2048):
            Hidden width of the SwiGLU MLP in every block.
        num_attention_heads (`int`, *optional*, defaults to 4):
            Query heads Hq of the latent attention.
        num_key_value_heads (`int`, *optional*, defaults to 2):
            Key/value heads Hk (grouped-query attention); must divide `num_attention_heads`.
        head_dim (`int`, *optional*):
            Per-head dim of the cached keys and values, i.e. the latent head dim
            h = `hidden_size / (compression_factor * num_attention_heads)` (the Llama name, so that tools
            sizing a KV cache from `head_dim` get HYDRA's latent size). A derived field: leave it unset (`None`)
            and it is set from those three fields after every other argument (`from_preset` overrides included);
            an explicit value must equal h. It is never `None` on a built config and is saved with it.
            `from_pretrained(path, hidden_size=...)` (or an override of `compression_factor` /
            `num_attention_heads`) re-derives it: overrides of those fields are applied before the config is
            built, and a saved `head_dim` that was derived from the saved sizes is dropped (it would otherwise
            contradict the new sizes). `num_hidden_layers` follows overrides of `num_unique_blocks` /
            `mor_recursions` / `mor_sharing` the same way. Changing a size by assignment on a built config does
            not re-derive anything: set `head_dim` (and `num_hidden_layers`) too, or `validate()` and model
            construction raise naming it.
        compression_factor (`int`, *optional*, defaults to 4):
            C: queries live in a latent space of width E / C (`Hq * h = E / C`).
        qk_conv_kernel_size (`int`, *optional*, defaults to 3):
            Kernel of the causal depthwise sequence convolution on latent q and k (1 disables it).
        qk_channel_conv_kernel_size (`int`, *optional*, defaults to 1):
            Kernel (over time, causal) of the per-head grouped channel convolution; 1 = pointwise.
        use_value_shift (`bool`, *optional*, defaults to `True`):
            Half of the KV heads (the last `Hk // 2`) take their values from the previous token. Needs
            `num_key_value_heads >= 2`: with one KV head there is no half to shift, and the config raises (naming
            both fields) instead of silently shifting nothing. For such a model set `use_value_shift=False`, which
            computes exactly what a 1-KV-head model with `use_value_shift=True` computed before this was an error.
        use_qk_mean (`bool`, *optional*, defaults to `True`):
            Add the pre-convolution q-k mean back after the convolutions.
        partial_rotary_factor (`float`, *optional*, defaults to 0.5):
            Fraction of each latent head's channels that get RoPE (rounded down to an even count, at least 2:
            `rotary_dim`). Stored in `rope_parameters["partial_rotary_factor"]`, as transformers 5 configs do;
            `config.partial_rotary_factor` reads (and assigning it writes) that entry, and as a keyword it is moved
            there (where `rope_parameters` has no such entry).
        num_unique_blocks (`int`, *optional*, defaults to 2):
            Number of distinct (weight-owning) blocks.
        mor_recursions (`int`, *optional*, defaults to 2):
            How many times each shared block is applied at most.
        num_hidden_layers (`int`, *optional*):
            Effective depth = `num_unique_blocks * mor_recursions`. Derived like `head_dim`; if given it must match.
        mor_sharing (`str`, *optional*, defaults to `"sequence"`):
            `"sequence"`: each block is repeated in place (b0 b0 b1 b1 ...). `"middle_cycle"`: the first and
            last block are unshared and the middle blocks are cycled as a stack; then the number of unique
            blocks is `num_unique_blocks` and the effective depth is `2 + (num_unique_blocks - 2) * mor_recursions`.
        mor_enabled (`bool`, *optional*, defaults to `False`):
            Route tokens to their own recursion depth (otherwise every token gets full depth).
        mor_routing (`str`, *optional*, defaults to `"expert_choice"`):
            `"expert_choice"` (hierarchical top-k per recursion) or `"token_choice"` (depth picked up front); the
            modes are the entries of `routing_hydra.ROUTING_MODES["mor"]`.
        mor_capacity (`float` or `list[float]`, *optional*):
            Fraction of tokens that continue at each recursion step after the first (expert choice). `None` uses
            the layer-aware schedule: early blocks keep ~40%, late blocks ~80%.
        mor_ponder_loss_coef (`float`, *optional*, defaults to 0.001):
            Weight of the ponder loss (mean expected depth).
        mor_z_loss_coef (`float`, *optional*, defaults to 0.0):
            Weight of the MoR router z-loss.
        mor_balance_loss_coef (`float`, *optional*, defaults to 0.01):
            Weight of the token-choice balancing loss.
        mod_enabled (`bool`, *optional*, defaults to `False`):
            Mixture-of-Depths: routed blocks process only the top-k tokens of each sequence.
        mod_capacity (`float`, *optional*, defaults to 0.75):
            Fraction of tokens a routed block processes in training (k = ceil(capacity * T)).
        mod_every (`int`, *optional*, defaults to 2):
            Route every n-th effective layer (layers n-1, 2n-1, ...); 1 routes every layer.
        mod_aux_loss_coef (`float`, *optional*):
            Weight of the BCE loss that teaches the router the causal inference rule. `None` = auto:
            `0.01 * (effective_layers / 32) * sqrt(hidden_size / 768)`.
        router_threshold_momentum (`float`, *optional*, defaults to 0.05):
            Expert-choice routers (MoD, MoR expert choice) keep a running estimate of their top-k boundary
            (a buffer, like BatchNorm's running mean, updated in training forwards with this momentum) and
            subtract it from their logit, so that "processed iff logit > 0" at inference keeps the training
            capacity even when the BCE weight is small. 0 = off (raw router logit).
        mod_routing (`str`, *optional*, defaults to `"expert_choice"`):
            How MoD routers decide: `"expert_choice"` (top-k in training, "logit > 0" at inference). Modes are the
            entries of `routing_hydra.ROUTING_MODES["mod"]` (a new mode is a router class there).
        mod_use_predictor (`bool`, *optional*, defaults to `False`):
            Train a small MLP on the detached block input to predict top-k membership and use it at inference.
        moe_enabled (`bool`, *optional*, defaults to `False`):
            Insert `moe_num_layers` FFN-only Mixture-of-Experts blocks between blocks.
        moe_num_layers (`int`, *optional*, defaults to 0):
            Number of MoE blocks (0 = none even when `moe_enabled`).
        num_local_experts (`int`, *optional*, defaults to 4):
            Experts per MoE block.
        num_experts_per_tok (`int`, *optional*, defaults to 1):
            Top-k experts per token.
        moe_intermediate_size (`int`, *optional*):
            Hidden width of each expert (defaults to `intermediate_size`).
        moe_router_jitter (`float`, *optional*, defaults to 0.0):
            Multiplicative jitter noise on router inputs in training (0 = off).
        router_aux_loss_coef (`float`, *optional*, defaults to 0.01):
            Weight of the Switch load-balancing loss.
        moe_z_loss_coef (`float`, *optional*, defaults to 0.001):
            Weight of the MoE router z-loss.
        output_router_logits (`bool`, *optional*, defaults to `False`):
            Return the MoE router logits (`router_logits`, as Mixtral). The attribute exists only on a config with
            MoE blocks (`has_moe_blocks`): TRL and other Mixtral-style code read its presence as "this model returns
            router logits for a load-balancing loss", which a HYDRA without MoE does not (read it with
            `getattr(config, "output_router_logits", False)`; the value is still stored and saved).
        static_routing (`bool`, *optional*, defaults to `False`):
            Compute every token and weight outputs by the router instead of gathering (fixed shapes).
        kernel_backend (`str`, *optional*, defaults to `"auto"`):
            `"auto"` | `"triton"` | `"liger"` | `"torch"`: which implementation of the fused ops runs.
        fused_linear_cross_entropy (`bool`, *optional*):
            Training loss without materialising the `(tokens, vocab)` logits: when `forward` gets `labels` in
            training mode, the lm_head projection and the cross-entropy run as one fused op (Liger's chunked
            kernel on CUDA) and the output's `logits` is `None`. `None` (default) = on exactly when that op is
            really fused (CUDA tensors, Liger installed, `kernel_backend` other than `"torch"`); `True` = always
            through the fused-op entry point (on CPU it runs the reference, same loss); `False` = never.
        hidden_act (`str`, *optional*, defaults to `"silu"`):
            MLP activation (SwiGLU gate).
        max_position_embeddings (`int`, *optional*, defaults to 2048):
            Longest sequence the model is meant for.
        rope_parameters (`RopeParameters` or `dict`, *optional*):
            transformers' RoPE dict: `rope_type` (one of `"default"`, `"linear"`, `"dynamic"`, `"yarn"`,
            `"llama3"`), `rope_theta` (base, defaults to 10000.0), `partial_rotary_factor` (see above) and the keys
            of the scaling type (`factor`; `original_max_position_embeddings` for yarn / llama3, defaulting to
            `max_position_embeddings`; `low_freq_factor` / `high_freq_factor` for llama3; `attention_factor`,
            `beta_fast`, `beta_slow` for yarn). Standardized and validated by transformers' own
            `RotaryEmbeddingConfigMixin` (missing keys raise naming them), over HYDRA's `rotary_dim` channels of
            each latent head. `None` = `{"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}`.
            Configs saved before this field existed have top-level `rope_theta` / `partial_rotary_factor` (and maybe
            `rope_scaling`): they load into `rope_parameters` and give the same model.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            RoPE base, stored as `rope_parameters["rope_theta"]` (`config.rope_theta` reads and writes it there).
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            RMSNorm epsilon.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Std of the normal init of linear and embedding weights.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities in training.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Share the input embedding with the LM head.
        use_cache (`bool`, *optional*, defaults to `True`):
            Return a `HydraCache` for fast generation.

    Example:

    ```python
    >>> from hydra_hf import HydraConfig, HydraForCausalLM
    >>> config = HydraConfig.from_preset("debug", vocab_size=1000)
    >>> model = HydraForCausalLM(config)
    ```"""

    model_type = "hydra"
    keys_to_ignore_at_inference = ["cache", "past_key_values", "routing"]
    attribute_map = {"num_experts": "num_local_experts"}

    vocab_size: int = 50257
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    compression_factor: int = 4
    qk_conv_kernel_size: int = 3
    qk_channel_conv_kernel_size: int = 1
    use_value_shift: bool = True
    use_qk_mean: bool = True
    num_unique_blocks: int = 2
    mor_recursions: int = 2
    num_hidden_layers: int | None = None
    mor_sharing: str = "sequence"
    mor_enabled: bool = False
    mor_routing: str = "expert_choice"
    mor_capacity: float | int | list | None = None
    mor_ponder_loss_coef: float | int = 0.001
    mor_z_loss_coef: float | int = 0.0
    mor_balance_loss_coef: float | int = 0.01
    mod_enabled: bool = False
    mod_capacity: float | int = 0.75
    mod_every: int = 2
    mod_aux_loss_coef: float | int | None = None
    router_threshold_momentum: float | int = 0.05
    mod_routing: str = "expert_choice"
    mod_use_predictor: bool = False
    moe_enabled: bool = False
    moe_num_layers: int = 0
    num_local_experts: int = 4
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    moe_router_jitter: float | int = 0.0
    router_aux_loss_coef: float | int = 0.01
    moe_z_loss_coef: float | int = 0.001
    output_router_logits: bool = False
    static_routing: bool = False
    kernel_backend: str = "auto"
    fused_linear_cross_entropy: bool | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rope_parameters: RopeParameters | dict | None = None
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    attention_dropout: float | int = 0.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        # RoPE, the transformers 5 way (as PhiConfig does): `rope_theta` / `partial_rotary_factor` / `rope_scaling`
        # keywords (and the top-level keys of configs saved before `rope_parameters`) are moved into
        # `rope_parameters` by `PreTrainedConfig.__post_init__` (`convert_rope_params_to_dict`), where entries already
        # in `rope_parameters` win. The caller's dict is copied first: standardization writes into it.
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = dict(self.rope_parameters)
        kwargs.setdefault("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)
        if self.num_hidden_layers is None:
            self.num_hidden_layers = self.effective_layers_for(self.num_unique_blocks, self.mor_recursions, self.mor_sharing)
        if self.head_dim is None:  # None only while the sizes it comes from are invalid (validation names them)
            self.head_dim = _derived_head_dim(self.hidden_size, self.compression_factor, self.num_attention_heads)
        super().__post_init__(**kwargs)
        # Plain ValueError at construction (strict's validate(), which runs next, wraps it in its own type).
        self.validate_architecture()

    # ------------------------------------------------------------------ MoE presence
    @property
    def has_moe_blocks(self) -> bool:
        """Whether the model has MoE blocks (`moe_enabled` and `moe_num_layers` > 0)."""
        return bool(self.moe_enabled) and self.moe_num_layers > 0

    def __getattribute__(self, key):
        # `output_router_logits` is hidden on a config without MoE blocks: TRL's trainers (SFT, DPO, GRPO, RLOO, KTO)
        # take their MoE path when the config *has* the attribute, ask for router logits, get none, and then crash
        # on Mixtral's load-balancing loss of nothing (an int 0: `'int' object has no attribute 'mean'`). Without
        # the attribute they treat HYDRA as the dense model it is (an explicit `router_aux_loss_coef` gets TRL's own
        # "not a Mixture-of-Experts model" error). The routing losses of MoD / MoR still train the routers: the
        # backbone attaches them to its output's gradient.
        if key == "output_router_logits" and not super().__getattribute__("has_moe_blocks"):
            raise AttributeError(
                "'HydraConfig' has no attribute 'output_router_logits' when the model has no MoE blocks "
                "(moe_enabled=False or moe_num_layers=0): it returns no router logits. "
                "Use getattr(config, 'output_router_logits', False)"
            )
        return super().__getattribute__(key)

    def __iter__(self):
        # hidden like transformers' own per-layer attributes of heterogeneous configs: not exposed by iteration
        hidden = not self.has_moe_blocks
        yield from (key for key in super().__iter__() if not (hidden and key == "output_router_logits"))

    # ------------------------------------------------------------------ derived sizes
    @staticmethod
    def effective_layers_for(num_unique_blocks: int, mor_recursions: int, mor_sharing: str) -> int:
        if mor_sharing == "middle_cycle" and num_unique_blocks > 2:
            return 2 + (num_unique_blocks - 2) * mor_recursions
        return num_unique_blocks * mor_recursions

    @property
    def latent_size(self) -> int:
        """Width of the latent query space, E / C."""
        return self.hidden_size // self.compression_factor

    @property
    def latent_head_dim(self) -> int:
        return self.latent_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Channels of each latent head that get RoPE: `partial_rotary_factor` of them, rounded down to even, >= 2."""
        h = self.latent_head_dim
        return max(2, int(h * self.partial_rotary_factor) // 2 * 2)

    # ------------------------------------------------------------------ RoPE (stored in rope_parameters)
    @property
    def rope_theta(self) -> float:
        """RoPE base: `rope_parameters["rope_theta"]` (a top-level field of configs saved before rope_parameters)."""
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        return rope.get("rope_theta", self.default_theta)

    @rope_theta.setter
    def rope_theta(self, value):
        self.rope_parameters = {**(self.rope_parameters or {}), "rope_theta": value}

    @property
    def partial_rotary_factor(self) -> float:
        """Fraction of each latent head that gets RoPE: `rope_parameters["partial_rotary_factor"]`."""
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        return rope.get("partial_rotary_factor", DEFAULT_PARTIAL_ROTARY_FACTOR)

    @partial_rotary_factor.setter
    def partial_rotary_factor(self, value):
        self.rope_parameters = {**(self.rope_parameters or {}), "partial_rotary_factor": value}

    def rotary_config(self) -> "HydraRotaryConfig":
        """This config as transformers' RoPE init functions (``ROPE_INIT_FUNCTIONS``, ``dynamic_rope_update``) should
        see it for HYDRA's RoPE: see ``HydraRotaryConfig``."""
        return HydraRotaryConfig(self)

    @property
    def num_value_shift_heads(self) -> int:
        return self.num_key_value_heads // 2 if self.use_value_shift else 0

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Latent K and V bytes one token costs in one layer's cache: Hk * h * 2 * dtype_bytes."""
        return self.num_key_value_heads * self.latent_head_dim * 2 * dtype_bytes

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HydraConfig":
        """Build the config of a named size preset (SPEC section 6), with keyword overrides."""
        if name not in _PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
        kwargs = dict(_PRESETS[name])
        kwargs.update(overrides)
        return cls(**kwargs)  # derived fields (head_dim, num_hidden_layers) are set after the overrides

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "HydraConfig":
        """transformers' ``from_dict`` (used by ``from_pretrained`` / ``AutoConfig``), except that overrides of
        HYDRA fields in ``kwargs`` are applied *before* the config is built, so that the derived fields follow them
        and the result is validated; a saved derived value that the overrides make stale is re-derived (see
        ``head_dim`` in the class docstring)."""
        overrides = {k: v for k, v in kwargs.items() if k in _HYDRA_FIELDS}
        if overrides:
            config_dict = dict(config_dict)
            for derived, inputs in _DERIVED_FIELDS.items():
                if derived in overrides or not any(name in overrides for name in inputs):
                    continue
                saved = config_dict.get(derived)
                if saved is not None and saved == _derive(derived, {**_defaults(), **config_dict}):
                    config_dict[derived] = None  # it was derived from the saved sizes: derive it from the new ones
            config_dict.update(overrides)
        return super().from_dict(config_dict, **kwargs)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' ``save_pretrained``, validating first: an invalid config writes nothing.

        transformers validates only after creating the directory and copying the remote-code files;
        here ``validate()`` runs before anything is touched (it raises huggingface_hub's
        ``StrictDataclassClassValidationError`` naming the field, like every transformers config)."""
        self.validate()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    # ------------------------------------------------------------------ validation
    def check_hydra_fields(self):
        """Raise a `ValueError` naming the offending field and what is allowed (same checks as
        ``validate_architecture``; ``config.validate()`` runs them too, wrapped in huggingface_hub's
        ``StrictDataclassClassValidationError``). Runs at construction and in ``save_pretrained``; call it
        (or ``validate()``) again after changing fields by hand."""
        self.validate_architecture()

    def _check_rope_parameters(self):
        """The HYDRA side of `rope_parameters` (transformers' `validate_rope` checks each type's keys)."""
        rope = self.rope_parameters
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be a dict (transformers' RopeParameters), got {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_parameters['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
        factor = self.partial_rotary_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 < factor <= 1.0:
            raise ValueError(
                f"partial_rotary_factor (rope_parameters['partial_rotary_factor']) must be in (0, 1], got {factor!r}"
            )
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
            raise ValueError(f"rope_theta (rope_parameters['rope_theta']) must be a positive number, got {theta!r}")
        if rope_type == "dynamic" and self.rotary_dim < 4:
            raise ValueError(
                f"rope_parameters['rope_type']='dynamic' needs a rotary dim >= 4 (its base is rescaled by an exponent "
                f"dim / (dim - 2)), got rotary_dim={self.rotary_dim}: raise partial_rotary_factor or the latent head dim"
            )

    def validate_rope(self):
        """transformers' RoPE validation (`RotaryEmbeddingConfigMixin.validate_rope`, a `@strict` class validator): the
        keys each `rope_type` needs (a missing one raises naming it) and the ranges of their values (warnings).

        Two differences: the rope types HYDRA does not run are refused by ``validate_architecture`` (naming
        `rope_parameters['rope_type']`), and transformers' "RoPE requires an even rotary dimension" check (an odd
        `head_dim` with `partial_rotary_factor` 1) is left out: HYDRA rotates `rotary_dim` channels, rounded down to
        an even count, so an odd latent head dim is fine."""
        rope = self.rope_parameters
        if not isinstance(rope, dict) or not rope:
            return
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            return  # validate_architecture names it
        rope["rope_type"] = rope_type
        validate = getattr(self, f"_validate_{rope_type}_rope_parameters")
        validate(rope, ignore_keys=self.ignore_keys_at_rope_validation)

    def validate_architecture(self):
        """Part of `@strict`-powered validation: every HYDRA field, with errors naming the field."""
        super().validate_architecture()

        def positive_int(field):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "compression_factor", "qk_conv_kernel_size",
                      "qk_channel_conv_kernel_size", "num_unique_blocks", "mor_recursions", "mod_every",
                      "num_local_experts", "num_experts_per_tok", "max_position_embeddings"):
            positive_int(field)
        if self.hidden_size % self.compression_factor != 0:
            raise ValueError(
                f"compression_factor ({self.compression_factor}) must divide hidden_size ({self.hidden_size})"
            )
        if self.latent_size % self.num_attention_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must divide the latent width "
                f"hidden_size / compression_factor = {self.latent_size}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim is None:
            raise ValueError(
                f"head_dim is None; on a built config it must be the latent head dim hidden_size / (compression_factor "
                f"* num_attention_heads) = {self.latent_head_dim} (only the constructor derives it from None)"
            )
        if self.head_dim != self.latent_head_dim:
            raise ValueError(
                f"head_dim ({self.head_dim}) must equal the latent head dim hidden_size / (compression_factor * "
                f"num_attention_heads) = {self.hidden_size} / ({self.compression_factor} * {self.num_attention_heads}) "
                f"= {self.latent_head_dim}: it is derived from those fields; leave it unset (None) to derive it, or "
                "change it together with them"
            )
        if self.latent_head_dim < 2:
            raise ValueError(f"latent head dim must be >= 2, got {self.latent_head_dim}")
        for field in ("qk_conv_kernel_size", "qk_channel_conv_kernel_size"):
            if getattr(self, field) > 8:
                raise ValueError(f"{field} must be in [1, 8], got {getattr(self, field)}")
        if self.use_value_shift and self.num_key_value_heads < 2:
            raise ValueError(
                f"use_value_shift=True needs num_key_value_heads >= 2 (half of the KV heads take the previous token's "
                f"values), got num_key_value_heads={self.num_key_value_heads}: with one KV head nothing would be "
                "shifted. Use num_key_value_heads >= 2, or use_value_shift=False (what such a model computed before "
                "this was an error)"
            )
        self._check_rope_parameters()
        if self.mor_sharing not in MOR_SHARING_MODES:
            raise ValueError(f"mor_sharing must be one of {MOR_SHARING_MODES}, got {self.mor_sharing!r}")
        for component in ("mod", "mor"):
            modes, value = tuple(ROUTING_MODE_NAMES[component]), getattr(self, f"{component}_routing")
            if value not in modes:
                raise ValueError(f"{component}_routing must be one of {modes}, got {value!r}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {self.kernel_backend!r}")
        if not (self.fused_linear_cross_entropy is None or isinstance(self.fused_linear_cross_entropy, bool)):
            raise ValueError(
                f"fused_linear_cross_entropy must be None (auto), True or False, got {self.fused_linear_cross_entropy!r}"
            )
        effective = self.effective_layers_for(self.num_unique_blocks, self.mor_recursions, self.mor_sharing)
        if self.num_hidden_layers != effective:
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) must equal the effective depth of "
                f"num_unique_blocks={self.num_unique_blocks} x mor_recursions={self.mor_recursions} "
                f"({self.mor_sharing}) = {effective}; leave it unset to derive it. The depth comes from the "
                "weight-shared blocks, so num_hidden_layers alone cannot make a shallower model: PEFT's shadow "
                "adapters (a mirror backbone with fewer num_hidden_layers) are not supported for HYDRA"
            )
        if self.mor_sharing == "middle_cycle" and self.num_unique_blocks < 3:
            raise ValueError("mor_sharing='middle_cycle' needs num_unique_blocks >= 3 (first, middle, last)")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ValueError(f"mod_capacity must be in (0, 1], got {self.mod_capacity}")
        capacities = self.mor_capacity if isinstance(self.mor_capacity, list) else [self.mor_capacity]
        for cap in capacities:
            if cap is not None and not (isinstance(cap, (int, float)) and 0.0 < cap <= 1.0):
                raise ValueError(f"mor_capacity values must be in (0, 1], got {self.mor_capacity!r}")
        if isinstance(self.mor_capacity, list) and len(self.mor_capacity) != self.mor_recursions - 1:
            raise ValueError(
                f"mor_capacity as a list needs mor_recursions - 1 = {self.mor_recursions - 1} entries "
                f"(one per recursion after the first), got {len(self.mor_capacity)}"
            )
        if self.moe_num_layers < 0:
            raise ValueError(f"moe_num_layers must be >= 0, got {self.moe_num_layers}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be <= num_local_experts "
                f"({self.num_local_experts})"
            )
        for field in ("mor_ponder_loss_coef", "mor_z_loss_coef", "mor_balance_loss_coef", "router_aux_loss_coef",
                      "moe_z_loss_coef", "moe_router_jitter", "attention_dropout"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if not 0.0 <= self.router_threshold_momentum <= 1.0:
            raise ValueError(f"router_threshold_momentum must be in [0, 1], got {self.router_threshold_momentum}")
        if self.mod_aux_loss_coef is not None and self.mod_aux_loss_coef < 0:
            raise ValueError(f"mod_aux_loss_coef must be >= 0 or None (auto), got {self.mod_aux_loss_coef}")


class HydraRotaryConfig:
    """A `HydraConfig` as transformers' RoPE init functions see it for HYDRA's RoPE.

    transformers computes RoPE over `int(head_dim * partial_rotary_factor)` channels; HYDRA rotates `rotary_dim`
    channels of each latent head (`partial_rotary_factor` of the latent head dim rounded down to an even count, at
    least 2). This view answers `head_dim` with `rotary_dim` and `rope_parameters` with the config's dict with
    `partial_rotary_factor` 1, so that `ROPE_INIT_FUNCTIONS[rope_type](view, ...)` and `dynamic_rope_update` compute
    exactly HYDRA's frequencies (e.g. `1 / theta ** (arange(0, r, 2) / r)` for the default type); everything else
    (`max_position_embeddings`, `standardize_rope_params`, ...) is the config's. It reads the config live.
    """

    def __init__(self, config: HydraConfig):
        self.config = config

    @property
    def head_dim(self) -> int:
        return self.config.rotary_dim

    @property
    def rope_parameters(self) -> dict:
        return {**self.config.rope_parameters, "partial_rotary_factor": 1.0}

    def __getattr__(self, name):
        if name == "config" or name.startswith("__"):  # copy / pickle look these up before __init__ ran
            raise AttributeError(name)
        return getattr(self.config, name)

    def __repr__(self):
        return f"HydraRotaryConfig(rotary_dim={self.head_dim}, rope_parameters={self.rope_parameters})"


def _derived_head_dim(hidden_size, compression_factor, num_attention_heads) -> int | None:
    """hidden_size / (compression_factor * num_attention_heads), or None where the sizes do not give one."""
    sizes = (hidden_size, compression_factor, num_attention_heads)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
        return None
    if hidden_size % (compression_factor * num_attention_heads):
        return None
    return hidden_size // (compression_factor * num_attention_heads)


# derived field -> the fields it is computed from
_DERIVED_FIELDS = {
    "head_dim": ("hidden_size", "compression_factor", "num_attention_heads"),
    "num_hidden_layers": ("num_unique_blocks", "mor_recursions", "mor_sharing"),
}
_HYDRA_FIELDS = frozenset(HydraConfig.__dataclass_fields__) - frozenset(PreTrainedConfig.__dataclass_fields__)


def _defaults() -> dict:
    return {name: f.default for name, f in HydraConfig.__dataclass_fields__.items() if name in _HYDRA_FIELDS}


def _derive(field: str, values: dict):
    if field == "head_dim":
        return _derived_head_dim(values["hidden_size"], values["compression_factor"], values["num_attention_heads"])
    try:
        return HydraConfig.effective_layers_for(values["num_unique_blocks"], values["mor_recursions"], values["mor_sharing"])
    except TypeError:
        return None


__all__ = ["HydraConfig", "HydraRotaryConfig", "PRESET_NAMES", "KERNEL_BACKENDS", "ROPE_TYPES"]
