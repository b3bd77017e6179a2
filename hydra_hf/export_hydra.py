"""HYDRA through transformers' exporters (`transformers.exporters`: torch.export, ONNX, ExecuTorch).

Importing `hydra_hf` registers what an exported HYDRA graph carries across its inputs and outputs as pytree nodes,
with the exporters' own `register_pytree_node` (the flatten transformers uses for its caches: tensors as leaves, a
JSON context, serialized type `module:qualname`): `HydraCache`, `HydraStaticCache` and the `RoutingRecord` of the
model's output. The exporters register transformers' cache classes themselves when they export, and when they load a
saved export they register the transformers classes its specs name; HYDRA's classes live outside transformers, so
they are registered here, at import, which is what loading a saved export back needs.
"""

from __future__ import annotations

from .cache_hydra import HydraCache, HydraStaticCache
from .routing_hydra import RoutingRecord

PYTREE_CLASSES = (HydraCache, HydraStaticCache, RoutingRecord)


def register_pytree_nodes() -> bool:
    """Register HYDRA's cache and routing-record classes as pytree nodes the way the exporters register caches.

    Returns False (and registers nothing) when the installed transformers has no exporters."""
    try:
        from transformers.exporters.exporter_dynamo import register_pytree_node
    except ImportError:  # a transformers without `exporters`
        return False
    for cls in PYTREE_CLASSES:
        register_pytree_node(cls)  # idempotent: an already registered class is left as it is
    return True
