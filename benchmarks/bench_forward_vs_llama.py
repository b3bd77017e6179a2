"""Forward-pass time of HYDRA vs transformers' LlamaForCausalLM of the same width and depth.

HYDRA debug preset (hidden 512, 2 unique blocks x 2 recursions = 4 effective layers, latent
attention with C=4) vs a Llama with hidden 512, 4 layers, 8 heads (head dim 64), 2 KV heads,
the same SwiGLU width and vocab. Eval mode, no cache, median of several runs, side by side.
Also prints parameter counts and KV-cache bytes per token per layer.

    python benchmarks/bench_forward_vs_llama.py [--batch 4 --seq 256 --repeats 9]
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hydra_hf import HydraConfig, HydraForCausalLM
from timing import median_time



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    hydra_cfg = HydraConfig.from_preset("debug")
    llama_cfg = LlamaConfig(
        vocab_size=hydra_cfg.vocab_size, hidden_size=hydra_cfg.hidden_size,
        intermediate_size=hydra_cfg.intermediate_size, num_hidden_layers=hydra_cfg.num_hidden_layers,
        num_attention_heads=8, num_key_value_heads=hydra_cfg.num_key_value_heads,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    models = {"HYDRA debug": HydraForCausalLM(hydra_cfg).eval(), "Llama same width/depth": LlamaForCausalLM(llama_cfg).eval()}
    x = torch.randint(0, hydra_cfg.vocab_size, (args.batch, args.seq))
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            t = median_time(lambda: model(x, use_cache=False), args.repeats)
        params = sum(p.numel() for p in model.parameters())
        rows.append((name, params, t))
    kv_hydra = hydra_cfg.kv_cache_bytes_per_token(2)
    kv_llama = llama_cfg.num_key_value_heads * (llama_cfg.hidden_size // llama_cfg.num_attention_heads) * 2 * 2
    print(f"batch {args.batch} x seq {args.seq}, {args.threads} threads, eval forward, median of {args.repeats}")
    print("| model | params | forward s | tokens/s | KV bytes/token/layer (bf16) |")
    print("|---|---|---|---|---|")
    for (name, params, t), kv in zip(rows, (kv_hydra, kv_llama)):
        print(f"| {name} | {params / 1e6:.1f}M | {t:.4f} | {args.batch * args.seq / t:,.0f} | {kv} |")
    print(f"HYDRA / Llama forward time: {rows[0][2] / rows[1][2]:.3f}; KV cache ratio 1/{kv_llama / kv_hydra:.1f}")


if __name__ == "__main__":
    main()
