"""Training step under `torch.compile`: inductor vs eager, per routing mode, in one run.

A training step here is forward + backward + AdamW step with static shapes (no padding, no packing), which is
what lets MoD and MoR expert choice keep a fixed top-k size. The dense, MoD, MoR-expert and static-routing
rows compile with `fullgraph=True` (any graph break raises); MoE compiles with graph breaks allowed (its expert
dispatch reads the per-expert token counts). Each row prints the compile time (first step), eager and inductor
ms/step (median of the timed steps, both timed in the same process, interleaved), the speedup and the largest
difference between the eager and compiled losses over the same steps from the same weights.

    python benchmarks/bench_compile.py [--hidden 256 --layers 4 --batch 8 --seq 256 --steps 10 --threads 2]
    python benchmarks/bench_compile.py --backend aot_eager   # graph capture only (no C++ compiler needed)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from hydra_hf import HydraConfig, HydraForCausalLM

MODES = {
    "dense": ({}, True),
    "mod": (dict(mod_enabled=True, mod_every=2, mod_capacity=0.5), True),
    "mor_expert": (dict(mor_enabled=True, mor_routing="expert_choice"), True),
    "static": (dict(mod_enabled=True, mod_every=2, mor_enabled=True, static_routing=True), True),
    "moe": (dict(moe_enabled=True, moe_num_layers=1, num_local_experts=4, num_experts_per_tok=2), False),
}


def build(args, overrides):
    torch.manual_seed(0)
    config = HydraConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, compression_factor=args.compression,
        num_unique_blocks=args.layers // 2, mor_recursions=2, num_hidden_layers=args.layers,
        kernel_backend="torch", **overrides,
    )
    return HydraForCausalLM(config).train()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="effective layers (2 blocks x 2 recursions)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--compression", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.modes.split(","):
        overrides, fullgraph = MODES[name]
        eager_model = build(args, overrides)
        compiled_model = copy.deepcopy(eager_model)
        runs = {}
        for label, model in (("eager", eager_model), ("compiled", compiled_model)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            forward = model if label == "eager" else torch.compile(model, fullgraph=fullgraph, backend=args.backend)

            def step(forward=forward, model=model, opt=opt):
                loss = forward(x, labels=x).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return float(loss.detach())

            runs[label] = dict(step=step, losses=[], times=[])
        torch._dynamo.reset()
        t0 = time.perf_counter()
        runs["compiled"]["losses"].append(runs["compiled"]["step"]())
        compile_s = time.perf_counter() - t0
        runs["eager"]["losses"].append(runs["eager"]["step"]())
        for _ in range(args.steps):  # interleaved, so machine load hits both alike
            for label in ("eager", "compiled"):
                t0 = time.perf_counter()
                runs[label]["losses"].append(runs[label]["step"]())
                runs[label]["times"].append(time.perf_counter() - t0)
        eager_ms = statistics.median(runs["eager"]["times"]) * 1e3
        compiled_ms = statistics.median(runs["compiled"]["times"]) * 1e3
        diff = max(abs(a - b) for a, b in zip(runs["eager"]["losses"], runs["compiled"]["losses"]))
        rows.append(dict(mode=name, fullgraph=fullgraph, compile_s=compile_s, eager_ms=eager_ms,
                         compiled_ms=compiled_ms, speedup=eager_ms / compiled_ms, max_loss_diff=diff))
        print(f"{name:>10}  fullgraph={fullgraph!s:5}  compile {compile_s:6.1f} s  eager {eager_ms:8.1f} ms  "
              f"{args.backend} {compiled_ms:8.1f} ms  x{eager_ms / compiled_ms:4.2f}  max |loss diff| {diff:.2e}",
              flush=True)
    print(f"\nbatch {args.batch} x seq {args.seq}, hidden {args.hidden}, {args.layers} effective layers, "
          f"{args.threads} threads, backend {args.backend}, torch {torch.__version__}")
    print("| mode | fullgraph | compile s | eager ms/step | compiled ms/step | speedup | max loss diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['fullgraph']} | {r['compile_s']:.1f} | {r['eager_ms']:.1f} | "
              f"{r['compiled_ms']:.1f} | {r['speedup']:.2f}x | {r['max_loss_diff']:.1e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
