"""`hydra-generate MODEL_DIR --prompt "..."`: load a HYDRA model and stream a generation to the terminal."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import ArgumentParser, UsageError, first_line, run_cli


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


def check_args(args) -> None:
    """Errors a user can fix, before the model is loaded."""
    if not os.path.isdir(args.model_dir):
        raise UsageError(f"model_dir {args.model_dir!r}: no such folder (expected a hydra-train --output_dir "
                         "or a save_pretrained folder)")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens={args.max_new_tokens}: must be >= 1")
    if args.temperature < 0:
        raise UsageError(f"--temperature={args.temperature}: must be >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p={args.top_p}: must be in (0, 1]")
    if args.top_k < 0 or args.num_beams < 1:
        raise UsageError(f"--top_k={args.top_k} / --num_beams={args.num_beams}: need top_k >= 0 and num_beams >= 1")


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
        raise UsageError(f"cannot load a model and tokenizer from {args.model_dir!r}: {first_line(exc)}") from exc
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
