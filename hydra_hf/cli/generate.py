"""`hydra-generate MODEL_DIR --prompt "..."`: load a HYDRA model and stream a generation to the terminal."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ArgumentParser, UsageError, check_range, one_line, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="hydra-generate", description="Generate text with a trained HYDRA model.")
    p.add_argument("model_dir", help="folder with config.json, model.safetensors and the tokenizer")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--no_stream", action="store_true", help="print the text at the end instead of streaming it")
    p.add_argument("--debug", action="store_true", help="show the full traceback of a user error")
    return p


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


MODEL_DIR_PARTS = {"config": "config.json", "weights": "model.safetensors", "tokenizer": "the tokenizer files"}


def check_model_dir(model_dir: str, field: str = "model_dir", needs: tuple[str, ...] = tuple(MODEL_DIR_PARTS)) -> None:
    """The folder holds what `needs` names (a config, weights, a tokenizer), each named when missing, before anything
    is loaded; a run folder with checkpoints but no final model names its newest checkpoint."""
    parts = [MODEL_DIR_PARTS[n] for n in needs]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    expected = f"expected a hydra-train --output_dir or a save_pretrained folder with {listed}"
    if not os.path.isdir(model_dir):
        raise UsageError(f"{field} {model_dir!r}: no such folder; {expected}")
    names = set(os.listdir(model_dir))
    missing = []
    if "config" in needs and "config.json" not in names:
        missing.append("config.json")
    if "weights" in needs and not names & set(WEIGHT_FILES):
        missing.append("weights (model.safetensors)")
    if "tokenizer" in needs and not names & set(TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json)")
    if missing:
        shown = sorted(names)[:5]
        found = f"it holds {', '.join(shown)}{', ...' if len(names) > len(shown) else ''}" if names else "it is empty"
        checkpoints = [n for n in names if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()]
        newest = max(checkpoints, key=lambda n: int(n[len("checkpoint-"):]), default=None)
        hint = f"; or use a checkpoint, e.g. {os.path.join(model_dir, newest)}" if newest else ""
        raise UsageError(f"{field} {model_dir!r} has no {', no '.join(missing)} ({found}); {expected}{hint}")


def check_args(args) -> None:
    """Errors a user can fix, before the model is loaded."""
    check_model_dir(args.model_dir)
    check_range(args.max_new_tokens, "--max_new_tokens", minimum=1, integer=True)
    check_range(args.temperature, "--temperature", minimum=0, note="0 = greedy")
    check_range(args.top_p, "--top_p", minimum=0, maximum=1, min_exclusive=True)
    check_range(args.top_k, "--top_k", minimum=0, integer=True, note="0 = no top-k filter")
    check_range(args.num_beams, "--num_beams", minimum=1, integer=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("hydra-generate", lambda: generate(args), debug=args.debug)


def generate(args) -> int:
    check_args(args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import hydra_hf  # noqa: F401 - registers the Auto classes

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir).to(device).eval()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load a model and tokenizer from {args.model_dir!r}: {one_line(exc)}") from exc
    if args.seed is not None:
        torch.manual_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise UsageError("empty prompt and the tokenizer has no BOS/EOS token; pass --prompt")
        ids = torch.tensor([[start]])
    ids = ids.to(device)
    kwargs = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if args.temperature > 0 and args.num_beams == 1:
        kwargs.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    else:
        kwargs.update(do_sample=False)
    streamer = None if (args.no_stream or args.num_beams > 1) else TextStreamer(tokenizer, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    if streamer is None:
        print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
