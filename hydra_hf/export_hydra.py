"""HYDRA through transformers' exporters (`transformers.exporters`: torch.export, ONNX, ExecuTorch).

Two graphs run a HYDRA decode off PyTorch, both on the static cache (`HydraStaticCache`, preallocated, written in
place; the conv / value-shift rolling state is part of it):

- `prefill`: `input_ids` (B, P), `attention_mask` (B, max_cache_len), an empty cache -> the last position's logits and
  the filled cache;
- `decode`: one token per row, `input_ids` (B, 1), the same mask with the new column set, the cache -> logits and the
  cache written one column further.

`export_for_decoding` traces both with the exporter of the chosen format (`DynamoExporter`, `OnnxExporter`,
`ExecutorchExporter`) and returns the exporters' own `ExportedModel` with the components `"prefill"` and `"decode"`;
`save_pretrained` writes it and `ExportedModel.from_pretrained` loads it back on the exporters' runners (ONNX Runtime,
`torch.export`'s module, the ExecuTorch runtime). `greedy_decode` drives the two runners like `generate(do_sample=False)`.
The mask is a plain 2D padding mask padded to `max_cache_len`: left padding is exact (a left-padded row gives the
tokens of the same row alone), so shorter prompts are left-padded to the graph's prompt length.

What exports: routing off, MoD and MoR (expert choice and token choice, `static_routing`, `middle_cycle`): on the
static cache every routed layer keeps fixed shapes (a decode step computes every row and masks; a prefill gathers each
row's processed tokens into T slots, the rest invalid), and inference routing is the causal "logit > 0" rule. MoE does
not: its expert dispatch sizes each expert's batch by the tokens routed to it (`moe_enabled` is refused by name).

Importing `hydra_hf` registers what the graphs carry across their inputs and outputs as pytree nodes, with the
exporters' own `register_pytree_node` (the flatten transformers uses for its caches: tensor leaves, a JSON context,
serialized type `module:qualname`): `HydraCache`, `HydraStaticCache` and the `RoutingRecord` of the model's output.
The exporters register transformers' cache classes themselves, and when they load a saved export they register the
transformers classes its specs name; HYDRA's classes live outside transformers, so they are registered at import,
which is what loading an export back needs.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json

import torch

from .cache_hydra import HydraCache, HydraStaticCache
from .routing_hydra import RoutingRecord

PYTREE_CLASSES = (HydraCache, HydraStaticCache, RoutingRecord)

# format -> (exporter, its config, the packages it needs besides torch)
EXPORT_FORMATS = {
    "onnx": ("exporter_onnx.OnnxExporter", "configs.OnnxConfig", ("onnx", "onnxscript", "onnxruntime")),
    "dynamo": ("exporter_dynamo.DynamoExporter", "configs.DynamoConfig", ()),
    "executorch": ("exporter_executorch.ExecutorchExporter", "configs.ExecutorchConfig", ("executorch",)),
}
# pip package of each module name (what to install)
PIP_NAMES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime", "executorch": "executorch"}
MIN_DYNAMIC_PROMPT = 3  # a dynamic prefill takes 3 .. max_cache_len - 1 prompt tokens (shorter ones are left-padded)


class HydraExportError(ValueError):
    """A model, a setting or an environment that cannot export: the message names the field or the package."""


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


# ---------------------------------------------------------------------------- what can export


def check_exportable(config) -> None:
    """Raise `HydraExportError` naming the config field when a model of this config cannot be exported."""
    if getattr(config, "moe_enabled", False) and getattr(config, "moe_num_layers", 0) > 0:
        raise HydraExportError(
            "moe_enabled=True cannot export: the MoE expert dispatch gives each expert a batch as large as the tokens "
            "routed to it (a data-dependent shape torch.export cannot trace); routing off, MoD and MoR export"
        )


def check_environment(format: str) -> None:
    """Raise `HydraExportError` when the format is unknown, or transformers or a package the format needs is missing."""
    if format not in EXPORT_FORMATS:
        raise HydraExportError(f"format={format!r} is not an export format; choose one of {', '.join(EXPORT_FORMATS)}")
    import transformers

    try:
        from transformers.exporters.base import ExportedModel  # noqa: F401
    except ImportError as exc:
        raise HydraExportError(
            f"exporting needs transformers >= 5.23 (its exporters' ExportedModel, runners and save format); found "
            f"transformers {transformers.__version__}, whose exporters return bare programs"
        ) from exc
    missing = [name for name in EXPORT_FORMATS[format][2] if importlib.util.find_spec(name) is None]
    if missing:
        raise HydraExportError(
            f"format={format!r} needs {', '.join(missing)}: pip install {' '.join(PIP_NAMES[m] for m in missing)} "
            f"(or pip install 'hydra_hf[{'executorch' if format == 'executorch' else 'export'}]')"
        )


def _exporter(format: str):
    from transformers.exporters.utils import import_dotted_path

    exporter_path, config_path, _ = EXPORT_FORMATS[format]
    return (
        import_dotted_path(f"transformers.exporters.{exporter_path}")(),
        import_dotted_path(f"transformers.exporters.{config_path}"),
    )


@contextlib.contextmanager
def _reference_ops(model: torch.nn.Module):
    """Trace with the plain PyTorch ops (`kernel_backend="torch"`): what every export backend can lower."""
    owners = [m for m in model.modules() if isinstance(getattr(m, "kernel_backend", None), str)]
    saved = [m.kernel_backend for m in owners]
    config_saved = model.config.kernel_backend
    try:
        for m in owners:
            m.kernel_backend = "torch"
        model.config.kernel_backend = "torch"
        yield
    finally:
        for m, value in zip(owners, saved):
            m.kernel_backend = value
        model.config.kernel_backend = config_saved


# ---------------------------------------------------------------------------- sample inputs


def _padded_mask(attention_mask: torch.Tensor, max_cache_len: int) -> torch.Tensor:
    """(B, T) padding mask -> (B, max_cache_len), zeros after the prompt (the columns decoding will fill)."""
    B, T = attention_mask.shape
    mask = torch.zeros(B, max_cache_len, dtype=torch.long, device=attention_mask.device)
    mask[:, :T] = attention_mask.long()
    return mask


def sample_inputs(config, batch_size: int, prompt_length: int, max_cache_len: int, seed: int = 0) -> dict:
    """Prefill inputs of the exported signature: random ids, a mask padded to `max_cache_len`, an empty cache."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch_size, prompt_length), generator=generator)
    mask = torch.ones(batch_size, prompt_length, dtype=torch.long)
    if batch_size > 1 and prompt_length > 1:
        mask[-1, 0] = 0  # one left-padded row (the graph has no data-dependent branch: any mask runs)
    return {
        "input_ids": ids,
        "attention_mask": _padded_mask(mask, max_cache_len),
        "cache": HydraStaticCache(config, max_cache_len=max_cache_len),
        "logits_to_keep": 1,
    }


def _dims(**axes) -> dict | None:
    """A `dynamic_shapes` entry: {axis: Dim} for the axes that are dynamic, None when none is."""
    dims = {int(axis[1:]): dim for axis, dim in axes.items() if dim is not None}
    return dims or None


def _cache_dynamic_shapes(cache: HydraStaticCache, batch) -> list:
    """One entry per pytree leaf of the cache (the exporters' flatten): the batch axis of every batched tensor."""
    leaves, _ = torch.utils._pytree.SUPPORTED_NODES[type(cache)].flatten_fn(cache)
    return [_dims(d0=batch) if leaf.dim() > 0 else None for leaf in leaves]


# ---------------------------------------------------------------------------- export


def export_for_decoding(
    model,
    format: str = "onnx",
    *,
    max_cache_len: int = 256,
    batch_size: int = 1,
    prompt_length: int = 16,
    dynamic: bool = False,
    dynamic_batch: bool | None = None,
    **config_kwargs,
):
    """Export a `HydraForCausalLM`'s prefill and single-token decode step on the static cache.

    Args:
        model: the HYDRA model (put in eval mode; traced with the PyTorch reference ops, on its device).
        format: "onnx" (`OnnxExporter`, runs on ONNX Runtime), "dynamo" (`DynamoExporter`, a `torch.export`
            program) or "executorch" (`ExecutorchExporter`, XNNPACK on CPU).
        max_cache_len: positions the static cache holds: prompt plus generated tokens.
        batch_size, prompt_length: the traced shapes. A static export runs exactly these (prompts are left-padded to
            `prompt_length`); with `dynamic=True` the batch and the prompt length (3 .. max_cache_len - 1) are dynamic.
        dynamic_batch: only the batch dynamic (default: as `dynamic`); prompts are left-padded to `prompt_length`.
        config_kwargs: more fields of the format's export config (e.g. `optimize=False` for ONNX).

    Returns:
        transformers' `ExportedModel` with the components "prefill" and "decode", the model config and a generation
        config (`cache_implementation="static"`, `max_cache_len`); `save_pretrained` / `ExportedModel.from_pretrained`
        write and read it, `greedy_decode` runs it.
    """
    check_environment(format)
    check_exportable(model.config)
    if prompt_length < 1 or max_cache_len <= prompt_length:
        raise HydraExportError(
            f"prompt_length={prompt_length}, max_cache_len={max_cache_len}: need 1 <= prompt_length < max_cache_len "
            "(the cache holds the prompt and every generated token)"
        )
    if dynamic and prompt_length < MIN_DYNAMIC_PROMPT:
        raise HydraExportError(f"prompt_length={prompt_length}: a dynamic export traces at least {MIN_DYNAMIC_PROMPT}")
    from transformers import GenerationConfig
    from transformers.exporters.base import ExportedModel

    exporter, config_class = _exporter(format)
    model.eval()
    device = next(model.parameters()).device
    prefill = sample_inputs(model.config, batch_size, prompt_length, max_cache_len)
    prefill = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prefill.items()}
    with torch.no_grad():
        out = model(**copy.deepcopy(prefill), use_cache=True)
    mask = prefill["attention_mask"].clone()
    mask[:, prompt_length] = 1
    decode = {
        "input_ids": out.logits[:, -1:].argmax(-1),
        "attention_mask": mask,
        "cache": out.cache,
    }
    shapes = {"prefill": None, "decode": None}
    dynamic_batch = dynamic if dynamic_batch is None else dynamic_batch
    if dynamic or dynamic_batch:
        from torch.export import Dim

        batch = Dim("batch", min=1, max=1024) if dynamic_batch else None
        prompt = Dim("prompt_length", min=MIN_DYNAMIC_PROMPT, max=max_cache_len - 1) if dynamic else None
        shapes["prefill"] = {
            "input_ids": _dims(d0=batch, d1=prompt), "attention_mask": _dims(d0=batch),
            "cache": _cache_dynamic_shapes(prefill["cache"], batch), "logits_to_keep": None,
        }
        shapes["decode"] = {
            "input_ids": _dims(d0=batch), "attention_mask": _dims(d0=batch),
            "cache": _cache_dynamic_shapes(decode["cache"], batch),
        }
    components = {}
    with _reference_ops(model):
        for name, inputs in (("prefill", prefill), ("decode", decode)):
            config = config_class(dynamic_shapes=shapes[name], **config_kwargs)
            try:
                components[name] = exporter.export(model, copy.deepcopy(inputs), config).components["model"]
            except Exception as exc:
                raise RuntimeError(f"{type(exporter).__name__} failed on HYDRA's {name} graph: {exc}") from exc
            if isinstance(components[name].program, torch.export.ExportedProgram):
                # The traced example inputs hold a HYDRA cache object, which a saved `.pt2` would pickle and
                # `torch.export.load`'s weights-only unpickler refuses (it falls back to a full unpickle, with a
                # broken warning). Running the program never reads them.
                components[name].program.example_inputs = None
    generation_config = GenerationConfig(
        cache_implementation="static", max_cache_len=max_cache_len, do_sample=False,
        pad_token_id=model.config.pad_token_id, bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
    )
    return ExportedModel(components, exporter.export_format, config=model.config, generation_config=generation_config)


# ---------------------------------------------------------------------------- running an export


def export_shapes(exported) -> dict:
    """What the export's graphs take: `max_cache_len`, the prefill's `prompt_length` and `batch_size` (the traced
    ones) and whether each is dynamic (read back from the recorded export config)."""
    prefill = exported.components["prefill"].metadata
    ids = prefill.kwargs["input_ids"]["shape"]
    mask = prefill.kwargs["attention_mask"]["shape"]
    dynamic_ids = ((prefill.export_config.get("dynamic_shapes") or {}).get("input_ids")) or {}
    return {
        "batch_size": ids[0],
        "prompt_length": ids[1],
        "max_cache_len": mask[1],
        "dynamic_batch": dynamic_ids.get("0") is not None,
        "dynamic_prompt": dynamic_ids.get("1") is not None,
    }


def greedy_decode(
    exported,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    return_logits: bool = False,
):
    """Greedy decoding with an export's `prefill` and `decode` runners: the ids `generate(do_sample=False)` returns.

    `input_ids` (B, T) with a 2D padding mask (left padding, as for `generate`). Prompts shorter than the graph's are
    left-padded to it (exact: padding is never processed). Returns (B, T + max_new_tokens) ids, and the logits of
    every step (B, max_new_tokens, V) when `return_logits`. With `eos_token_id`, rows that produced it continue with
    the pad id (the config's, else the EOS id) and the loop stops when every row has."""
    from .cache_hydra import HydraStaticCache as _Cache

    shapes = export_shapes(exported)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if shapes["dynamic_prompt"]:
        P = max(T, MIN_DYNAMIC_PROMPT)
    else:
        P = shapes["prompt_length"]
        if T > P:
            raise HydraExportError(
                f"the prompt has {T} tokens but this export's prefill takes {P}: export with a larger prompt_length "
                "(or dynamic=True)"
            )
    if not shapes["dynamic_batch"] and B != shapes["batch_size"]:
        raise HydraExportError(
            f"the batch has {B} rows but this export was traced for {shapes['batch_size']}: export with that "
            "batch_size (or dynamic=True)"
        )
    S = shapes["max_cache_len"]
    if P + max_new_tokens > S:
        raise HydraExportError(
            f"{P} prompt positions + max_new_tokens={max_new_tokens} exceed this export's max_cache_len={S}"
        )
    pad_id = exported.config.pad_token_id if exported.config.pad_token_id is not None else 0
    if P > T:  # left-pad to the graph's prompt length
        input_ids = torch.cat([input_ids.new_full((B, P - T), pad_id), input_ids], dim=1)
        attention_mask = torch.cat([attention_mask.new_zeros(B, P - T), attention_mask], dim=1)
    runners = exported.runners
    mask = _padded_mask(attention_mask, S)
    cache = _Cache(exported.config, max_cache_len=S)
    out = runners["prefill"](input_ids=input_ids, attention_mask=mask, cache=cache, logits_to_keep=1)
    tokens, logits = [], []
    done = torch.zeros(B, dtype=torch.bool)
    finished_id = exported.config.pad_token_id if exported.config.pad_token_id is not None else eos_token_id
    for step in range(max_new_tokens):
        step_logits = out.logits[:, -1].float().cpu()
        nxt = step_logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, finished_id), nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt)
        logits.append(step_logits)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        mask[:, P + step] = 1
        out = runners["decode"](input_ids=nxt.view(B, 1), attention_mask=mask, cache=out.cache)
    result = torch.cat([input_ids[:, P - T :].cpu(), torch.stack(tokens, dim=1)], dim=1)
    return (result, torch.stack(logits, dim=1)) if return_logits else result


def eager_greedy_decode(model, input_ids, attention_mask=None, max_new_tokens: int = 32) -> torch.Tensor:
    """The eager reference: `generate(do_sample=False)` for exactly `max_new_tokens` tokens (no EOS stop)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
        pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
    )
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=attention_mask, generation_config=config).cpu()


def describe(exported) -> str:
    """One JSON line: the format, the graph shapes."""
    return json.dumps({"format": str(exported.export_format), **export_shapes(exported)})


__all__ = [
    "EXPORT_FORMATS",
    "HydraExportError",
    "check_environment",
    "check_exportable",
    "eager_greedy_decode",
    "export_for_decoding",
    "export_shapes",
    "greedy_decode",
    "register_pytree_nodes",
    "sample_inputs",
]
