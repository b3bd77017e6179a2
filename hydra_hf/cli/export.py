"""`hydra-export RUN_DIR --format onnx|dynamo|executorch`: export a trained HYDRA model for decoding off PyTorch.

Writes, through transformers' exporters, the prefill and the single-token decode step on the static cache
(`hydra_hf.export_hydra.export_for_decoding`) into `--output_dir` (default `RUN_DIR/export-FORMAT`): `prefill.*` and
`decode.*` (`.onnx` + `.onnx.data`, `.pt2` or `.pte`), `export.json` (the exporters' manifest), `config.json`,
`generation_config.json` and the run's tokenizer. The folder loads back with the exporters' runner::

    import hydra_hf
    from transformers.exporters.base import ExportedModel
    exported = ExportedModel.from_pretrained("RUN_DIR/export-onnx")  # dynamo: trust_remote_code=True (a pickle)
    ids = hydra_hf.export_hydra.greedy_decode(exported, input_ids, max_new_tokens=32)

Before it returns, the command loads the folder back and checks that a greedy decode from the export equals
`generate()` on the PyTorch model token for token (`--check N` tokens; 0 skips it).
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ArgumentParser, UsageError, check_range, one_line, run_cli
from .generate import check_model_dir

FORMATS = ("onnx", "dynamo", "executorch")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hydra-export", description="Export a HYDRA model's prefill and decode step (static cache) "
                       "with transformers' exporters, to run off PyTorch.")
    p.add_argument("run_dir", help="a hydra-train output folder, or any save_pretrained folder of a HYDRA model")
    p.add_argument("--format", default="onnx", choices=FORMATS, metavar="FORMAT",
                   help="onnx (ONNX Runtime), dynamo (a torch.export .pt2) or executorch (.pte, XNNPACK); default onnx")
    p.add_argument("--output_dir", default=None, metavar="DIR",
                   help="where to write the export (default RUN_DIR/export-FORMAT)")
    p.add_argument("--max_cache_len", type=int, default=256, metavar="N",
                   help="positions the static cache holds: prompt + new tokens (default 256)")
    p.add_argument("--prompt_length", type=int, default=32, metavar="N",
                   help="prompt tokens the prefill takes, shorter prompts left-padded; with --dynamic the most (default 32)")
    p.add_argument("--batch_size", type=int, default=1, metavar="N",
                   help="rows per call: the traced size, any size with --dynamic (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and prompt length (slower to export)")
    p.add_argument("--check", type=int, default=8, metavar="N",
                   help="load the export back and check N greedy tokens equal generate() (0 = skip; default 8)")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error")
    return p


def check_args(args) -> None:
    """Errors a user can fix, before anything is loaded."""
    # the config first (a non-HYDRA or MoE config is named before the weights are read); the tokenizer is optional
    check_model_dir(args.run_dir, field="run_dir", needs=("config",))
    check_range(args.batch_size, "--batch_size", minimum=1, integer=True)
    check_range(args.max_cache_len, "--max_cache_len", minimum=2, integer=True)
    check_range(args.prompt_length, "--prompt_length", minimum=1, integer=True)
    if args.prompt_length < 1 or args.max_cache_len <= args.prompt_length:
        raise UsageError(f"--prompt_length={args.prompt_length} --max_cache_len={args.max_cache_len}: need "
                         "1 <= prompt_length < max_cache_len (the cache holds the prompt and every new token)")
    if args.check < 0 or args.prompt_length + args.check > args.max_cache_len:
        raise UsageError(f"--check={args.check}: must be >= 0 and fit the cache with the prompt "
                         f"(prompt_length + check <= max_cache_len = {args.max_cache_len})")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("hydra-export", lambda: export(args), debug=args.debug)


def _load(args):
    """The config (checked before the weights are read) and the model, fp32 on CPU."""
    from transformers import AutoConfig

    import hydra_hf
    from hydra_hf.export_hydra import HydraExportError, check_environment, check_exportable

    try:
        check_environment(args.format)
    except HydraExportError as exc:
        raise UsageError(str(exc)) from exc
    try:
        config = AutoConfig.from_pretrained(args.run_dir)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the model config in {args.run_dir!r}: {one_line(exc)}") from exc
    if not isinstance(config, hydra_hf.HydraConfig):
        raise UsageError(f"{args.run_dir!r} holds a {type(config).__name__} (model_type {config.model_type!r}), "
                         "not a HYDRA model")
    try:
        check_exportable(config)
    except HydraExportError as exc:
        raise UsageError(str(exc)) from exc
    try:
        model = hydra_hf.HydraForCausalLM.from_pretrained(args.run_dir, dtype="float32").eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the model weights in {args.run_dir!r}: {one_line(exc)}") from exc
    return model


def export(args) -> int:
    check_args(args)
    import torch

    from hydra_hf.export_hydra import (
        HydraExportError, eager_greedy_decode, export_for_decoding, export_shapes, greedy_decode,
    )

    model = _load(args)
    output_dir = args.output_dir or os.path.join(args.run_dir, f"export-{args.format}")
    print(f"hydra-export: tracing prefill and decode ({args.format}) of {args.run_dir} ...", flush=True)
    try:
        exported = export_for_decoding(
            model, args.format, max_cache_len=args.max_cache_len, batch_size=args.batch_size,
            prompt_length=args.prompt_length, dynamic=args.dynamic,
        )
    except HydraExportError as exc:
        raise UsageError(str(exc)) from exc
    exported.save_pretrained(output_dir)
    _save_tokenizer(args.run_dir, output_dir)
    if args.check:
        from transformers.exporters.base import ExportedModel

        loaded = ExportedModel.from_pretrained(output_dir, trust_remote_code=args.format == "dynamo")
        shapes = export_shapes(loaded)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (args.batch_size, min(args.prompt_length, 8)), generator=generator)
        got = greedy_decode(loaded, ids, max_new_tokens=args.check)
        want = eager_greedy_decode(model, ids, max_new_tokens=args.check)
        if not torch.equal(got, want):
            print(f"hydra-export: CHECK FAILED: the export's greedy tokens {got.tolist()} differ from generate()'s "
                  f"{want.tolist()}", file=sys.stderr)
            return 1
        print(f"hydra-export: check: loaded back with the exporters' runner; {args.check} greedy tokens equal "
              f"generate() (batch {args.batch_size}; graphs take {shapes})")
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            print(f"  {os.path.getsize(path):>12,d}  {path}")
    print(f"hydra-export: done; load with ExportedModel.from_pretrained({output_dir!r}"
          + (", trust_remote_code=True" if args.format == "dynamo" else "") + ") after `import hydra_hf`")
    return 0


def _save_tokenizer(run_dir: str, output_dir: str) -> None:
    """Copy the run's tokenizer next to the graphs (nothing when the run has none)."""
    from transformers import AutoTokenizer

    for folder in (run_dir, os.path.join(run_dir, "tokenizer")):
        if not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            continue
        try:
            AutoTokenizer.from_pretrained(folder).save_pretrained(output_dir)
            return
        except (OSError, ValueError, TypeError):
            continue


if __name__ == "__main__":
    sys.exit(main())
