"""HYDRA's fused ops: ``hydra_hf.ops.<op>`` dispatchers plus one Triton kernel module per op.

The dispatcher functions (``causal_conv``, ``qk_norm_rope``, ``gather_tokens``, ...,
``fused_linear_cross_entropy``) are defined in ``hydra_hf/ops_hydra.py`` and the plain PyTorch
references in ``hydra_hf/ops_reference_hydra.py`` (also reachable as ``hydra_hf.ops.reference``):
both are flat modules so that a saved model's remote code carries them. This package holds the
kernels, one file per op (``causal_conv.py``, ``qk_norm_rope.py``, ``routing_gather.py``,
``moe_permute.py``, ``rms_norm.py``, ``cross_entropy.py``), each with its Triton kernels, launcher
and ``autograd.Function``; the dispatcher imports them lazily. ``aot_compile.py`` compiles every
specialization the launchers choose for sm_80 / sm_90 on CPU (no GPU). See ``docs/kernels.md``.

Kernel modules share their names with the dispatcher functions (``causal_conv.py`` holds the
kernels behind ``causal_conv(...)``). Importing a submodule normally rebinds the package
attribute to the module; this package keeps the functions bound instead (see
``_OpsPackage``), so ``hydra_hf.ops.causal_conv`` is always the dispatcher function. Reach a
kernel module with ``from hydra_hf.ops.causal_conv import causal_conv_triton`` or
``importlib.import_module("hydra_hf.ops.causal_conv")`` (not ``import hydra_hf.ops.causal_conv as m``).
"""

from __future__ import annotations

import sys
import types

from .. import ops_reference_hydra as reference
from ..ops_hydra import *  # noqa: F403  (the public dispatcher functions)
from ..ops_hydra import __all__ as _dispatcher_names
from ..ops_hydra import _effective_backend, _liger_ok, _triton_module, interpret_requested  # noqa: F401

sys.modules[f"{__name__}.reference"] = reference  # `from hydra_hf.ops.reference import ...` keeps working


class _OpsPackage(types.ModuleType):
    """Module type of this package: importing a kernel submodule never shadows a dispatcher function."""

    def __setattr__(self, name, value):
        current = self.__dict__.get(name)
        if isinstance(value, types.ModuleType) and isinstance(current, types.FunctionType):
            return  # the submodule stays in sys.modules; the public function keeps its name
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _OpsPackage

__all__ = ["reference", *_dispatcher_names]
