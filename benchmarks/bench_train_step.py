"""End-to-end training step per kernel backend (GPU): tokens/s, MFU and peak memory.

100M preset, bf16 autocast, seq 1024, AdamW; one row per `kernel_backend` ("torch", "triton",
"liger"). MFU uses 6 * N_active * tokens / time against the GPU's dense bf16 peak (default
989 TFLOP/s, H100 SXM; pass --peak-tflops for another card). Needs CUDA; without it, prints
why and exits 0.

    python benchmarks/bench_train_step.py [--preset 100M --batch 8 --seq 1024 --steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from hydra_hf import HydraConfig, HydraForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="100M")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--backends", default="torch,triton,liger")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_train_step: no CUDA device; this benchmark measures GPU training steps. Nothing run.")
        return
    device = torch.device("cuda")
    rows = []
    for backend in args.backends.split(","):
        torch.manual_seed(0)
        config = HydraConfig.from_preset(args.preset, kernel_backend=backend)
        model = HydraForCausalLM(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        x = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
        n_params = sum(p.numel() for p in model.parameters())
        # Shared blocks run R times: FLOPs count every effective layer, not unique parameters.
        block_params = sum(p.numel() for p in model.model.layers.parameters())
        n_effective = n_params - block_params + block_params * config.mor_recursions

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        tokens = args.batch * args.seq
        mfu = 6 * n_effective * tokens / dt / (args.peak_tflops * 1e12)
        rows.append((backend, tokens / dt, mfu, torch.cuda.max_memory_allocated() / 2**30))
        del model, opt
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()} | {args.preset} | batch {args.batch} x seq {args.seq} | bf16")
    print("| backend | tokens/s | MFU | peak mem GiB |")
    print("|---|---|---|---|")
    for backend, tps, mfu, mem in rows:
        print(f"| {backend} | {tps:,.0f} | {mfu:.1%} | {mem:.1f} |")
    base = rows[0][1]
    for backend, tps, _, _ in rows[1:]:
        print(f"{backend} / {rows[0][0]} speedup: {tps / base:.2f}x")


if __name__ == "__main__":
    main()
