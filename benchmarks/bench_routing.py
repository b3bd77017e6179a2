"""Routing benchmark: does skipping tokens save wall-clock time on this machine?

Prints, in one run, the training-step time (forward + backward) and the inference forward
time of a debug-size HYDRA (hidden 512, 2 blocks x 2 recursions) with routing off vs MoD at
capacities 0.75 / 0.5 / 0.25 on every block, MoR expert / token choice and MoE 4 experts top-1,
next to the ideal speedup from the FLOP count (torch.utils.flop_counter).

    python benchmarks/bench_routing.py [--batch 4 --seq 256 --vocab 4096 --repeats 7]
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

import hydra_hf  # noqa: F401
from hydra_hf import HydraConfig, HydraForCausalLM
from timing import median_time

ROWS = [
    ("routing off", {}, {}),
    ("MoD cap 0.75", dict(mod_enabled=True, mod_every=1, mod_capacity=0.75), {}),
    ("MoD cap 0.50", dict(mod_enabled=True, mod_every=1, mod_capacity=0.5), {}),
    ("MoD cap 0.25", dict(mod_enabled=True, mod_every=1, mod_capacity=0.25), {}),
    ("MoR expert choice", dict(mor_enabled=True, mor_routing="expert_choice"), {}),
    ("MoR token choice", dict(mor_enabled=True, mor_routing="token_choice"), {}),
    ("MoE 4 experts top-1", dict(moe_enabled=True, moe_num_layers=2, num_local_experts=4, num_experts_per_tok=1), {}),
]



def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))

    results = []
    for name, overrides, _ in ROWS:
        torch.manual_seed(0)
        config = HydraConfig.from_preset("debug", vocab_size=args.vocab, **overrides)
        model = HydraForCausalLM(config)
        model.train()

        def train_step():
            model.zero_grad(set_to_none=True)
            model(x, labels=x).loss.backward()

        with FlopCounterMode(display=False) as counter:
            train_step()
        train_flops = counter.get_total_flops()
        train_t = median_time(train_step, args.repeats)

        # Inference: eval-mode routing (router logit > 0). Calibrate the routers' bias so eval processes
        # the same fraction as training would (an untrained router has no calibrated threshold).
        model.eval()
        with torch.no_grad():
            for router in list(model.model.mod_routers) + list(model.model.mor_routers):
                logits = router.proj(model.model.embed_tokens(x)).float()
                if logits.shape[-1] == 1:
                    cap = config.mod_capacity if router in model.model.mod_routers else 0.6
                    router.proj.bias.sub_(torch.quantile(logits.flatten(), 1 - cap))

            def infer():
                model(x, use_cache=False)

            infer_t = median_time(infer, args.repeats)
        with FlopCounterMode(display=False) as counter:  # (FlopCounterMode's module hooks need grad mode)
            model(x, use_cache=False)
        infer_flops = counter.get_total_flops()
        results.append((name, train_t, train_flops, infer_t, infer_flops))
        print(f"measured {name}", flush=True)

    base = results[0]
    print()
    print(f"debug preset (hidden 512, 2x2 blocks), vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
          f"{args.threads} threads, median of {args.repeats}")
    header = (f"| {'config':<20} | train step s | train ratio | ideal (FLOPs) | "
              f"infer fwd s | infer ratio | ideal (FLOPs) |")
    print(header)
    print("|" + "---|" * 7)
    for name, tt, tf, it, inf in results:
        print(f"| {name:<20} | {tt:12.4f} | {tt / base[1]:11.3f} | {tf / base[2]:13.3f} | "
              f"{it:11.4f} | {it / base[3]:11.3f} | {inf / base[4]:13.3f} |")


if __name__ == "__main__":
    main()
