"""HYDRA ops with a backend switch: the one place the model calls its fused ops through.

Every op has a plain PyTorch reference (``ops_reference_hydra.py``). ``kernel_backend`` in the
config chooses the implementation: ``"torch"`` always runs the reference, ``"triton"`` runs our
Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"liger"`` uses Liger's kernels
for RMSNorm / SwiGLU / fused linear cross-entropy and ours for the rest, ``"auto"`` picks
Triton/Liger on CUDA and the reference on CPU. The choice is made per call from the config,
never by patching modules.

Fallbacks (decided at call time, so the model runs everywhere with any backend):

* A Triton path is taken for CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET`` is set in
  ``os.environ`` *and* the kernel module was first imported with it set (Triton decides
  interpreted-vs-compiled when a kernel is defined). Otherwise the reference runs.
* Kernel modules (``hydra_hf/ops/<op>_triton.py``, ``cross_entropy_liger.py``) and Triton / Liger are imported lazily, only when a
  Triton / Liger path is taken, so ``backend="torch"`` never needs Triton installed.
* ``"auto"`` arriving here is treated as ``"triton"`` for CUDA tensors and ``"torch"`` otherwise.
* RMSNorm / SwiGLU / fused linear cross-entropy use Liger on CUDA for ``"liger"``, ``"triton"``
  and ``"auto"``. Without Liger installed, ``"liger"`` raises ImportError; ``"triton"`` uses our
  Triton RMSNorm and the SwiGLU / cross-entropy references. Liger is called through its public
  functional API (``liger_kernel.transformers.functional``), by keyword.
* ``qk_mean`` always runs the reference (see ``ops/qk_norm_rope_triton.py`` for why).
* Sizes above ``TRITON_LIMITS`` (e.g. ``qk_conv_kernel_size`` > 4) run the reference on every
  backend; ``check_kernel_backend`` (called at model construction) makes ``"triton"`` raise for
  such a config instead, naming the field. Float tensors outside ``TRITON_DTYPES`` (float64) and
  ``causal_conv`` sequences beyond its int32 / grid range run the reference too (per call).

Import layout (no cycle; each layer imports only the ones above it in this list):

1. ``ops_reference_hydra.py`` and ``configuration_hydra.py`` (``KERNEL_BACKENDS``): no HYDRA imports
   (``configuration_hydra`` never imports the ops).
2. The kernel modules in ``hydra_hf/ops/`` (``<op>_triton.py``, ``cross_entropy_liger.py``, ``_triton_utils.py``,
   ``_triton_lang.py``): they import each other and layer 1, never this dispatcher.
3. This module (the dispatcher): layer 1 at import time; the kernel modules with ordinary import statements
   inside functions (``_import_triton_kernels`` / ``_import_kernel_utils`` / ``_import_cross_entropy_kernel``), on
   the first Triton or Liger path, because they import Triton (and because bare remote code has no ``hydra_hf`` to import them from:
   the imports are absolute ``hydra_hf.ops`` imports inside ``try``, which transformers' remote-code import check
   skips, and an ``ImportError`` means "references only").
4. ``hydra_hf/ops/__init__.py`` re-exports this module's functions as ``hydra_hf.ops.<name>`` (and
   ``aot_compile.py`` reads ``TRITON_LIMITS``); nothing below imports them.

This module and ``ops_reference_hydra.py`` are flat files with only torch imports at module level
(plus the config's ``KERNEL_BACKENDS``) so that ``save_pretrained`` ships them with ``modeling_hydra.py`` as remote
code: a model loaded with ``trust_remote_code=True`` on a machine without ``hydra_hf`` runs on the references (the
Triton kernels live in the ``hydra_hf.ops`` package and are used whenever it is installed).
Users reach these functions as ``hydra_hf.ops.<name>``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .configuration_hydra import KERNEL_BACKENDS  # the one list of backends
from .ops_reference_hydra import (
    causal_conv_ref,
    causal_conv_state_len,
    gather_tokens_ref,
    linear_cross_entropy_ref,
    moe_permute_ref,
    moe_unpermute_ref,
    qk_mean_ref,
    qk_norm_rope_ref,
    rms_norm_ref,
    scatter_gated_add_ref,
    swiglu_ref,
)

# The one place that says which sizes our Triton kernels run: the largest value of each kernel-facing
# size of a config (``triton_config_sizes``) they are built and compile-checked for.
# ``hydra_hf/ops/aot_compile.py`` compiles every specialization up to these edges for sm_80 and sm_90 and
# ``tests/test_ops_compile.py`` asserts no register spills and shared memory within both GPUs' limits there.
# Below the limits every size the config accepts runs (odd head dims and head counts are masked, tiles are
# padded to powers of two; ``tests/test_ops_limits.py`` runs a grid of such configs in the interpreter).
TRITON_LIMITS = {
    "qk_conv_kernel_size": 4,  # causal_conv: Ks (static loops; the config allows up to 8)
    "qk_channel_conv_kernel_size": 2,  # causal_conv: Kc (one weight-gradient accumulator per tap)
    "latent_head_dim": 64,  # causal_conv / qk_norm_rope: h, one head per tl.dot tile
    # qk_norm_rope: all heads of a token in one program, a (next_pow2(Hq), next_pow2(h)) register tile
    "padded_latent_size": 2048,
    "hidden_size": 8192,  # rms_norm: one row in registers
}
_LIMIT_FIELDS = {
    "qk_conv_kernel_size": "qk_conv_kernel_size",
    "qk_channel_conv_kernel_size": "qk_channel_conv_kernel_size",
    "latent_head_dim": "latent head dim = hidden_size / (compression_factor * num_attention_heads)",
    "padded_latent_size": "num_attention_heads x latent head dim, each rounded up to a power of two "
                          "(one token's tile in qk_norm_rope)",
    "hidden_size": "hidden_size",
}
# What the kernels compute in (tl.dot input types, fp32 accumulation); other float dtypes (float64) run the reference.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# causal_conv indexes one sequence with int32 offsets (t * C + c) and tiles time over grid axis 1 (at most
# 65535 programs of >= 16 steps): longer sequences run the reference (a property of the call, not of the config).
_CONV_MAX_SEQUENCE_ELEMENTS = 2**31 - 1
_CONV_MAX_SEQUENCE_LEN = 65535 * 16


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def triton_limit_violations(**sizes: int) -> list[str]:
    """One message per size above ``TRITON_LIMITS`` (keys are its names), naming the config field.

    Empty when our Triton kernels can run these sizes. The dispatcher calls it with sizes read off
    the tensors, ``check_kernel_backend`` with the config's (``triton_config_sizes``).
    """
    return [
        f"{_LIMIT_FIELDS[name]} is {value}, but the Triton kernels support 1..{TRITON_LIMITS[name]}"
        for name, value in sizes.items() if value > TRITON_LIMITS[name]
    ]


def triton_config_sizes(config) -> dict[str, int]:
    """The kernel-facing sizes of a ``HydraConfig``, keyed like ``TRITON_LIMITS``."""
    h = config.hidden_size // (config.compression_factor * config.num_attention_heads)
    return {
        "qk_conv_kernel_size": config.qk_conv_kernel_size,
        "qk_channel_conv_kernel_size": config.qk_channel_conv_kernel_size,
        "latent_head_dim": h,
        "padded_latent_size": _next_pow2(max(config.num_attention_heads, config.num_key_value_heads)) * _next_pow2(h),
        "hidden_size": config.hidden_size,
    }


def triton_config_violations(config) -> list[str]:
    """``triton_limit_violations`` for a ``HydraConfig``: empty when every kernel can run it."""
    return triton_limit_violations(**triton_config_sizes(config))


def check_kernel_backend(config) -> None:
    """Model construction: ``kernel_backend="triton"`` with sizes our kernels cannot run raises.

    ``"auto"`` (and ``"liger"``) never raise: the dispatcher runs the reference for sizes outside
    ``TRITON_LIMITS``, so such a config never reaches a kernel on a GPU.
    """
    problems = triton_config_violations(config)
    if config.kernel_backend == "triton" and problems:
        raise ValueError(
            "kernel_backend='triton' cannot run this config: " + "; ".join(problems)
            + ". Use kernel_backend='auto' (the PyTorch reference runs for these ops) or 'torch'."
        )


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a configured backend to the one that runs on ``device``."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"kernel_backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _effective_backend(backend: str, *tensors: torch.Tensor | None) -> str:
    """Validate ``backend`` and resolve ``"auto"`` from where the tensors live."""
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend must be one of {KERNEL_BACKENDS}, got {backend!r}")
    if backend == "auto":
        on_cuda = all(t.is_cuda for t in tensors if t is not None)
        return "triton" if on_cuda else "torch"
    return backend


# Lazy imports. Each import statement sits inside ``try`` (transformers' remote-code check skips those, so bare
# remote code without hydra_hf / Liger loads, and an ImportError means "not installed": the references run); each
# importer runs once (``_once``: a plain dict, which torch.compile traces without a graph break).
def _import_kernel_utils() -> ModuleType | None:
    """``hydra_hf.ops._triton_utils`` (no Triton import; ``interpret_requested`` lives there)."""
    try:
        from hydra_hf.ops import _triton_utils
    except ImportError:
        return None
    return _triton_utils


def _import_triton_kernels() -> dict[str, ModuleType]:
    """The Triton kernel modules by name. Importing them imports Triton and defines the kernels, interpreted or
    compiled per ``TRITON_INTERPRET`` at that time. Empty where hydra_hf or Triton is not installed."""
    try:
        from hydra_hf.ops import (
            causal_conv_triton,
            moe_permute_triton,
            qk_norm_rope_triton,
            rms_norm_triton,
            routing_gather_triton,
        )
    except ImportError:
        return {}
    modules = (causal_conv_triton, moe_permute_triton, qk_norm_rope_triton, rms_norm_triton, routing_gather_triton)
    return {mod.__name__.rpartition(".")[2]: mod for mod in modules}


def _import_cross_entropy_kernel() -> ModuleType | None:
    """``hydra_hf.ops.cross_entropy_liger`` (our wrapper of Liger's fused linear cross-entropy)."""
    try:
        from hydra_hf.ops import cross_entropy_liger
    except ImportError:
        return None
    return cross_entropy_liger


def _import_liger() -> ModuleType | None:
    """Liger's public functional API, ``liger_kernel.transformers.functional``."""
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


_IMPORTED: dict = {}


def _once(importer):
    """``importer()``, run on the first call only."""
    if importer not in _IMPORTED:
        _IMPORTED[importer] = importer()
    return _IMPORTED[importer]


def _interpret_requested() -> bool:
    """``TRITON_INTERPRET`` is set now (False where the kernel package is absent: no kernel could run anyway)."""
    utils = _once(_import_kernel_utils)
    return utils is not None and utils.interpret_requested()


def _missing_package_error(backend: str, on_cuda: bool, imported) -> ImportError | None:
    """The error for an explicitly chosen backend (``"triton"`` or ``"liger"``, not ``"auto"``) whose package is not
    installed, on CUDA tensors (where it would run); ``imported`` is what its importer returned (None / empty: not
    installed). None otherwise: on CPU, and in remote code without hydra_hf, the reference ops run quietly, so a
    config saved with any backend loads and runs everywhere."""
    if backend not in ("triton", "liger") or not on_cuda or imported or _once(_import_kernel_utils) is None:
        return None
    package = "triton" if backend == "triton" else "liger-kernel"
    return ImportError(
        f"kernel_backend={backend!r} needs {package}, which is not installed: pip install 'hydra_hf[gpu]' "
        "(or use kernel_backend='auto' or 'torch': the PyTorch reference ops)"
    )


def _triton_module(backend: str, module: str, *tensors: torch.Tensor | None):
    """The kernel module ``hydra_hf.ops.<module>`` if its Triton kernels can run on ``tensors`` now, else None.

    None as well where the kernel package or Triton is not installed (remote code without hydra_hf) and for
    float tensors outside ``TRITON_DTYPES``. Sizes are checked by each dispatcher against ``TRITON_LIMITS``.
    """
    requested, backend = backend, _effective_backend(backend, *tensors)
    if backend == "torch":
        return None
    ts = [t for t in tensors if t is not None]
    if any(t.is_floating_point() and t.dtype not in TRITON_DTYPES for t in ts):
        return None  # e.g. float64: the reference keeps its precision
    all_cuda = all(t.is_cuda for t in ts)
    all_cpu = all(t.device.type == "cpu" for t in ts)
    if not (all_cuda or (all_cpu and _interpret_requested())):
        return None
    kernels = _once(_import_triton_kernels)
    error = _missing_package_error(requested, all_cuda, kernels) if requested == "triton" else None
    if error is not None:
        raise error
    mod = kernels.get(module)
    if mod is None:  # Triton or the hydra_hf kernel package is not installed
        return None
    if all_cuda:
        return mod if (not mod.INTERPRETED or _interpret_requested()) else None
    return mod if mod.INTERPRETED else None


def _liger(backend: str, *tensors: torch.Tensor) -> ModuleType | None:
    """Liger's functional API if Liger should run: CUDA tensors, a non-torch backend and Liger importable.

    An explicit ``"liger"`` backend without Liger installed raises instead of silently falling back.
    """
    backend = _effective_backend(backend, *tensors)
    if backend == "torch" or not all(t.is_cuda for t in tensors):
        return None
    liger = _once(_import_liger)
    error = _missing_package_error(backend, True, liger)
    if error is not None:
        raise error
    return liger


def _liger_ok(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether Liger runs for these tensors (see ``_liger``)."""
    return _liger(backend, *tensors) is not None


def causal_conv(x, seq_weight, chan_weight, num_heads, state=None, sequence_ids=None, backend="torch"):
    """CCGQA causal depthwise + per-head channel conv. x (B, T, C) -> (B, T, C); see ``causal_conv_ref``.

    ``sequence_ids`` (B, T) (packed sequences) runs the reference, which restarts the convs at each new id."""
    mod = _triton_module(backend, "causal_conv_triton", x, seq_weight, chan_weight, state)
    if sequence_ids is not None:
        return causal_conv_ref(x, seq_weight, chan_weight, num_heads, state, sequence_ids)
    if mod is not None and not triton_limit_violations(
        qk_conv_kernel_size=seq_weight.shape[-1], qk_channel_conv_kernel_size=chan_weight.shape[-1],
        latent_head_dim=x.shape[-1] // max(num_heads, 1),
    ) and x.shape[-2] <= _CONV_MAX_SEQUENCE_LEN and x.shape[-2] * x.shape[-1] <= _CONV_MAX_SEQUENCE_ELEMENTS:
        return mod.causal_conv_triton(x, seq_weight, chan_weight, num_heads, state)
    return causal_conv_ref(x, seq_weight, chan_weight, num_heads, state)


def qk_mean(q, k, backend="torch"):
    """CCGQA q-k mean -> (m_q, m_k); the reference on every backend (see ``ops/qk_norm_rope_triton.py``)."""
    _effective_backend(backend, q, k)
    return qk_mean_ref(q, k)


def qk_norm_rope(q, k, q_mean, k_mean, temperature, cos, sin, eps=1e-6, backend="torch"):
    """Mean add-back + L2 norm x sqrt(h) (x key temperature) + partial RoPE -> (q, k); see ``qk_norm_rope_ref``."""
    mod = _triton_module(backend, "qk_norm_rope_triton", q, k, q_mean, k_mean, temperature, cos, sin)
    if mod is not None and not triton_limit_violations(
        latent_head_dim=q.shape[-1], padded_latent_size=_next_pow2(max(q.shape[-2], k.shape[-2])) * _next_pow2(q.shape[-1])
    ):
        return mod.qk_norm_rope_triton(q, k, q_mean, k_mean, temperature, cos, sin, eps)
    return qk_norm_rope_ref(q, k, q_mean, k_mean, temperature, cos, sin, eps)


def gather_tokens(x, index, backend="torch"):
    """x (B, T, E), index (B, K) -> (B, K, E); see ``gather_tokens_ref``."""
    mod = _triton_module(backend, "routing_gather_triton", x, index)
    if mod is not None:
        return mod.gather_tokens_triton(x, index)
    return gather_tokens_ref(x, index)


def scatter_gated_add(residual, update, index, gate=None, backend="torch"):
    """Out-of-place residual[b, index[b, k]] += gate[b, k] * update[b, k]; see ``scatter_gated_add_ref``."""
    mod = _triton_module(backend, "routing_gather_triton", residual, update, index, gate)
    if mod is not None:
        return mod.scatter_gated_add_triton(residual, update, index, gate)
    return scatter_gated_add_ref(residual, update, index, gate)


def moe_permute(x, expert_index, num_experts, backend="torch"):
    """-> (permuted (N*k, E), tokens_per_expert (X,), sorted_pairs (N*k,)); see ``moe_permute_ref``."""
    mod = _triton_module(backend, "moe_permute_triton", x, expert_index)
    if mod is not None:
        return mod.moe_permute_triton(x, expert_index, num_experts)
    return moe_permute_ref(x, expert_index, num_experts)


def moe_unpermute(expert_out, sorted_pairs, weights, backend="torch"):
    """-> (N, E) weighted sum of each token's expert rows; see ``moe_unpermute_ref``."""
    mod = _triton_module(backend, "moe_permute_triton", expert_out, sorted_pairs, weights)
    if mod is not None:
        return mod.moe_unpermute_triton(expert_out, sorted_pairs, weights)
    return moe_unpermute_ref(expert_out, sorted_pairs, weights)


def rms_norm(x, weight, eps, backend="torch"):
    """Llama RMSNorm; Liger on CUDA, our Triton kernel without Liger / under the interpreter."""
    liger = _liger(backend, x, weight)
    if liger is not None:
        # in_place=False: Liger would otherwise overwrite the incoming gradient with grad_x
        return liger.liger_rms_norm(X=x, W=weight, eps=eps, offset=0.0, casting_mode="llama", in_place=False)
    if _effective_backend(backend, x, weight) == "triton":
        mod = _triton_module("triton", "rms_norm_triton", x, weight)
        if mod is not None and not triton_limit_violations(hidden_size=x.shape[-1]):
            return mod.rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def swiglu(gate, up, backend="torch"):
    """silu(gate) * up; Liger on CUDA, the reference elsewhere."""
    liger = _liger(backend, gate, up)
    if liger is not None:
        return liger.liger_swiglu(a=gate, b=up)
    return swiglu_ref(gate, up)


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, backend="torch", reduction="mean"):
    """Cross-entropy of ``hidden (N, E) @ weight (V, E).T`` against ``labels (N,)``, ignoring ``ignore_index``.

    ``reduction`` is ``"mean"`` (over the non-ignored labels) or ``"sum"``. Liger's fused kernel
    on CUDA (the (N, V) logits are never materialised); ``linear_cross_entropy_ref`` elsewhere.
    Returns an fp32 scalar.
    """
    kernel = _liger_cross_entropy_module(backend, hidden, weight, labels)
    if kernel is not None:
        return kernel.linear_cross_entropy_liger(hidden, weight, labels, ignore_index, reduction)
    return linear_cross_entropy_ref(hidden, weight, labels, ignore_index, reduction)


def linear_cross_entropy_is_fused(backend, *tensors) -> bool:
    """Whether ``fused_linear_cross_entropy`` on these tensors runs the chunked kernel (no full logits)."""
    return _liger_cross_entropy_module(backend, *tensors) is not None


def _liger_cross_entropy_module(backend, *tensors):
    if not _liger_ok(backend, *tensors):
        return None
    return _once(_import_cross_entropy_kernel)  # None in remote code without the hydra_hf package: the reference runs


__all__ = [
    "KERNEL_BACKENDS",
    "TRITON_LIMITS",
    "TRITON_DTYPES",
    "triton_limit_violations",
    "triton_config_sizes",
    "triton_config_violations",
    "check_kernel_backend",
    "resolve_backend",
    "causal_conv_state_len",
    "causal_conv",
    "qk_mean",
    "qk_norm_rope",
    "gather_tokens",
    "scatter_gated_add",
    "moe_permute",
    "moe_unpermute",
    "rms_norm",
    "swiglu",
    "fused_linear_cross_entropy",
    "linear_cross_entropy_is_fused",
]
