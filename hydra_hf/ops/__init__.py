"""HYDRA's fused ops: ``hydra_hf.ops.<op>`` dispatchers plus one kernel module per op.

The dispatcher functions (``causal_conv``, ``qk_norm_rope``, ``gather_tokens``, ...,
``fused_linear_cross_entropy``) are defined in ``hydra_hf/ops_hydra.py`` and the plain PyTorch
references in ``hydra_hf/ops_reference_hydra.py`` (also reachable as ``hydra_hf.ops.reference``):
both are flat modules so that a saved model's remote code carries them. This package holds the
kernels, one module per op, named after the op and the implementation inside it:
``causal_conv_triton``, ``qk_norm_rope_triton``, ``routing_gather_triton`` (``gather_tokens`` and
``scatter_gated_add``), ``moe_permute_triton`` (``moe_permute`` and ``moe_unpermute``),
``rms_norm_triton`` and ``cross_entropy_liger``. Each Triton module has its kernels, launcher,
``autograd.Function`` and a functional ``<op>_triton(...)``; the dispatcher imports them lazily.
``aot_compile.py`` compiles every specialization the launchers choose for sm_80 / sm_90 on CPU
(no GPU). See ``docs/kernels.md``.

Imports go one way: the kernel modules never import the dispatcher (``ops_hydra``); the dispatcher imports
them (inside functions, on the first Triton / Liger path); this ``__init__`` re-exports the dispatcher's
functions. See the layout in ``hydra_hf/ops_hydra.py``.

No kernel module shares a name with a dispatcher function, so ``hydra_hf.ops.causal_conv`` is the
function and ``import hydra_hf.ops.causal_conv_triton as m`` is the module, in any import order.
"""

from __future__ import annotations

import sys

from .. import ops_reference_hydra as reference
from ..ops_hydra import *  # noqa: F403  (the public dispatcher functions)
from ..ops_hydra import __all__ as _dispatcher_names
from ..ops_hydra import _effective_backend, _liger_ok, _triton_module  # noqa: F401
from ._triton_utils import interpret_requested  # noqa: F401

sys.modules[f"{__name__}.reference"] = reference  # `from hydra_hf.ops.reference import ...` keeps working

__all__ = ["reference", *_dispatcher_names]
