"""Perplexity of a causal LM (HYDRA or any `AutoModelForCausalLM`) on local text, with a sliding window.

    python examples/perplexity.py hydra-run data/*.txt --stride 256
    python examples/perplexity.py hydra-run corpus.jsonl --text_field text

Each document is tokenized, prefixed with the BOS (or EOS) token so that its first token is scored too, and
scored in windows of `--max_length` tokens (default: the model's `max_position_embeddings`) that advance by
`--stride`: every window predicts only the tokens no earlier window predicted, with up to
`max_length - stride` tokens of context before them. Prints token perplexity, bits per byte and the
counts; the default stride, `max_length - 1`, is the fastest (windows overlap by the one token of context
their first target needs), a smaller stride gives each token more context. The model runs in eval mode, i.e. with HYDRA's causal routing rule, as in generation.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def read_documents(paths: list[str], text_field: str) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                docs += [json.loads(line)[text_field] for line in f if line.strip()]
            else:
                docs.append(f.read())
    return [d for d in docs if d]


@torch.no_grad()
def document_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Sum of the negative log-likelihoods of ids[1:] given what precedes them, and their count."""
    total, count, scored_until = 0.0, 0, 1  # ids[0] is the BOS prefix: never a target
    stride = min(stride, max_length - 1)  # a window needs one token of context before its first target
    while scored_until < len(ids):
        end = min(scored_until + stride, len(ids))
        start = max(0, end - max_length)
        window = ids[start:end].unsqueeze(0)
        logits = model(window).logits[0].float()
        targets = ids[scored_until:end]
        logprobs = logits[scored_until - start - 1:end - start - 1].log_softmax(-1)
        total -= logprobs.gather(-1, targets[:, None]).sum().item()
        count += len(targets)
        scored_until = end
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder or Hub id")
    p.add_argument("files", nargs="+", help="text files (one document each) or .jsonl (one document per line)")
    p.add_argument("--text_field", default="text")
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--stride", type=int, default=None, help="tokens scored per window (default max_length - 1)")
    p.add_argument("--trust_remote_code", action="store_true", help="load without hydra_hf installed")
    args = p.parse_args()
    if not args.trust_remote_code:
        import hydra_hf  # noqa: F401 - registers the Auto classes

    tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).eval()
    max_length = args.max_length or model.config.max_position_embeddings
    stride = args.stride or max_length - 1
    if not 0 < stride < max_length:
        raise SystemExit(f"--stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    docs = read_documents(args.files, args.text_field)
    nll, tokens, nbytes = 0.0, 0, 0
    for doc in docs:
        ids = torch.tensor([prefix] + tok(doc, add_special_tokens=False)["input_ids"])
        doc_nll, doc_tokens = document_nll(model, ids, max_length, stride)
        nll, tokens, nbytes = nll + doc_nll, tokens + doc_tokens, nbytes + len(doc.encode("utf-8"))
    print(f"{os.path.basename(os.path.normpath(args.model))}: {len(docs)} documents, {tokens} tokens, {nbytes} bytes; "
          f"window {max_length}, stride {stride}")
    print(f"token perplexity {math.exp(nll / tokens):.4f}   bits per byte {nll / nbytes / math.log(2):.4f}")


if __name__ == "__main__":
    main()
