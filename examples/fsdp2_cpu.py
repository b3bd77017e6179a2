"""FSDP2 (`torch.distributed.fsdp.fully_shard`) training of HYDRA on CPU processes over gloo.

`accelerate launch --use_fsdp` shards only on accelerators: with CPU processes accelerate chooses
`DistributedType.MULTI_CPU` and wraps the model in DDP (docs/distributed.md). This script shows that
HYDRA itself shards with FSDP2 on CPU - weight-shared recursion blocks, tied embeddings and routing
included - and that the loss does not depend on the number of processes:

    python examples/fsdp2_cpu.py --out one.json                            # 1 process, no sharding
    torchrun --nproc_per_node 2 examples/fsdp2_cpu.py --out two.json       # 2 processes, FSDP2, gloo

Each step takes the same global batch (`--global_batch` sequences, split evenly over the processes), so
the printed per-step losses agree up to float rounding. Every unique decoder block (called once per
recursion) and every MoE block is an FSDP2 unit; the root unit holds the embeddings, the tied lm_head, the
final norm and the routers.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import hydra_hf  # noqa: F401
from hydra_hf import HydraConfig, HydraForCausalLM


def build_model(seed: int) -> HydraForCausalLM:
    torch.manual_seed(seed)
    config = HydraConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, compression_factor=2, num_unique_blocks=2, mor_recursions=2,
                         max_position_embeddings=64, mod_enabled=True, mod_every=1, mor_enabled=True)
    return HydraForCausalLM(config)


def shard(model: HydraForCausalLM) -> HydraForCausalLM:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    inner = model.model
    # routers are called through their own methods, not `forward`, so FSDP2's pre-forward all-gather would
    # not run for them: they stay in the root unit, whose parameters are gathered for the whole forward
    for module in [*inner.layers, *inner.moe_blocks]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--global_batch", type=int, default=8)
    p.add_argument("--seq_len", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the per-step losses here (JSON), from rank 0")
    args = p.parse_args()

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.global_batch % world:
        raise SystemExit(f"--global_batch {args.global_batch} must be divisible by the {world} processes")
    torch.set_num_threads(1)

    model = build_model(args.seed)
    model.train()
    if distributed:
        model = shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(args.seed + 1)
    per_rank = args.global_batch // world
    losses = []
    for step in range(args.steps):
        # learnable sequences: arithmetic progressions mod 97 with a random start and step per sequence
        start = torch.randint(0, 97, (args.global_batch, 1), generator=data)
        step_size = torch.randint(1, 4, (args.global_batch, 1), generator=data)
        batch = (start + step_size * torch.arange(args.seq_len)) % 97
        local = batch[rank * per_rank:(rank + 1) * per_rank]
        out = model(input_ids=local, labels=local)
        out.loss.backward()  # FSDP2 reduce-scatters the mean of the ranks' gradients
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach().clone()
        if distributed:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step + 1}: loss {losses[-1]:.6f}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"world_size": world, "losses": losses}, f)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
