"""Tiny-Shakespeare char-level: transformers `LlamaForCausalLM` vs HYDRA with the same stock Trainer loop.

In ONE run this trains
  (a) LlamaForCausalLM, 4 layers x 128 dim x 4 heads (~0.79M parameters with the 65-char vocab), and
  (b) a HYDRA model of ~0.8M parameters (3 shared blocks x 2 recursions, routing off), and
  (c) the same HYDRA with routing on (MoD capacity 0.5 on every block + MoR expert choice), which spends
      about as many FLOPs per token as the Llama,
each with block 64, batch 12, AdamW lr 1e-3 with a cosine schedule, `--steps` steps (default 2000), on the
first 90% of the corpus (the last 10% is the validation set), evaluating every `--eval_every` steps and
recording the wall clock. It prints final val loss and wall clock side by side, plus each model's val loss
at the same wall-clock budget (the shortest run; linear interpolation between evaluations) and the training
FLOPs per token of each model (torch.utils.flop_counter, one step).

Reference (SPEC section 8): Llama val loss 1.670 after 186 s at 2000 steps on 2 CPU cores.

    python benchmarks/bench_llama_shakespeare.py --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hydra_hf import HydraConfig, HydraForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import train_flops_per_step  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "tinyshakespeare.txt")


class RandomBlocks(Dataset):
    """Random windows of `block` tokens (nanoGPT style); deterministic per index."""

    def __init__(self, data: torch.Tensor, block: int, length: int, seed: int):
        self.data, self.block, self.length, self.seed = data, block, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, len(self.data) - self.block - 1, (1,), generator=g))
        ids = self.data[start:start + self.block]
        return {"input_ids": ids, "labels": ids.clone()}


class WallClockEval(TrainerCallback):
    """Records (step, seconds since train begin, eval loss) at every evaluation."""

    def __init__(self):
        self.points = []
        self.t0 = None
        self.eval_time = 0.0  # seconds spent in finished evaluations
        self.eval_start = None  # start of the evaluation in progress

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # training time only: time to the start of this evaluation minus the earlier evaluations
        now = self.eval_start if self.eval_start is not None else time.perf_counter()
        if self.points and self.points[-1][0] == state.global_step:
            return  # the final evaluate() after training repeats the last step's evaluation
        self.points.append((state.global_step, now - self.t0 - self.eval_time, metrics["eval_loss"]))


ROUTED = dict(mod_enabled=True, mod_every=1, mod_capacity=0.5, mor_enabled=True, mor_routing="expert_choice")


def hydra_config(vocab: int, block: int, **routing) -> HydraConfig:
    # ~0.8M parameters: hidden 160, 3 shared blocks x 2 recursions, tied embeddings
    kwargs = dict(vocab_size=vocab, hidden_size=160, intermediate_size=480, num_attention_heads=4,
                  num_key_value_heads=2, compression_factor=2, num_unique_blocks=3, mor_recursions=2,
                  max_position_embeddings=block, mod_enabled=False, mor_enabled=False)
    kwargs.update(routing)
    return HydraConfig(**kwargs)


def train_flops_per_token(model, vocab: int, batch: int, block: int) -> float:
    """FLOPs of one forward + backward with labels, per token (the model's routing as configured)."""
    return train_flops_per_step(model, vocab, batch, block) / (batch * block)


def train_one(name, model, train_ds, val_ds, args_kw, out_dir):
    args = TrainingArguments(output_dir=os.path.join(out_dir, name), **args_kw)
    cb = WallClockEval()
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, callbacks=[cb])
    original_evaluate = trainer.evaluate

    def timed_evaluate(*a, **k):
        t = time.perf_counter()
        cb.eval_start = t
        try:
            return original_evaluate(*a, **k)
        finally:
            cb.eval_time += time.perf_counter() - t
            cb.eval_start = None

    trainer.evaluate = timed_evaluate
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t - cb.eval_time
    final = timed_evaluate()["eval_loss"]
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "val_loss": final,
            "train_seconds": wall, "points": cb.points}


def loss_at(points, budget):
    """Val loss at `budget` seconds of training, linearly interpolated between evaluations."""
    prev = (0.0, None)
    for _, t, loss in points:
        if t >= budget:
            if prev[1] is None:
                return loss
            frac = (budget - prev[0]) / max(1e-9, t - prev[0])
            return prev[1] + frac * (loss - prev[1])
        prev = (t, loss)
    return points[-1][2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--eval_batches", type=int, default=50, help="val batches (of 12) per evaluation")
    p.add_argument("--out", default="/tmp/bench_llama_shakespeare")
    p.add_argument("--only", nargs="+", choices=["llama", "hydra", "hydra_routed"], default=None,
                   help="run only these models (default: all three)")
    args = p.parse_args(argv)

    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    block, batch = 64, 12
    train_ds = RandomBlocks(data[:n], block, args.steps * batch, seed=1)
    val_ds = RandomBlocks(data[n:], block, args.eval_batches * batch, seed=2)
    torch.set_num_threads(os.cpu_count() or 1)

    common = dict(max_steps=args.steps, per_device_train_batch_size=batch, per_device_eval_batch_size=batch,
                  learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1,
                  adam_beta1=0.9, adam_beta2=0.99, max_grad_norm=1.0, eval_strategy="steps",
                  eval_steps=args.eval_every, logging_steps=args.eval_every, save_strategy="no", report_to="none",
                  seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True,
                  label_names=["labels"])
    vocab = len(chars)
    builders = {
        "llama": lambda: LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=block, tie_word_embeddings=True)),
        "hydra": lambda: HydraForCausalLM(hydra_config(vocab, block)),
        "hydra_routed": lambda: HydraForCausalLM(hydra_config(vocab, block, **ROUTED)),
    }
    results = []
    for name, build in builders.items():
        if args.only is not None and name not in args.only:
            continue
        torch.manual_seed(0)
        model = build()
        flops = train_flops_per_token(model, vocab, batch, block)
        results.append(train_one(name, model, train_ds, val_ds, common, args.out))
        results[-1]["flops_per_token"] = flops
        print(f"{name}: val loss {results[-1]['val_loss']:.4f}, {results[-1]['train_seconds']:.1f} s", flush=True)

    print(f"\nTiny Shakespeare char level, {args.steps} steps, block {block}, batch {batch}, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'model':13s} {'params':>9s} {'val loss':>9s} {'train s':>8s} {'tokens/s':>9s} {'train MFLOP/token':>18s}")
    for r in results:
        tps = args.steps * batch * block / r["train_seconds"]
        print(f"{r['name']:13s} {r['params'] / 1e6:8.3f}M {r['val_loss']:9.4f} {r['train_seconds']:8.1f} {tps:9.0f} "
              f"{r['flops_per_token'] / 1e6:18.2f}")
    if len(results) >= 2:
        budget = min(r["train_seconds"] for r in results)
        print(f"\nval loss at the same wall-clock budget ({budget:.1f} s of training):")
        for r in results:
            print(f"  {r['name']:13s} {loss_at(r['points'], budget):.4f}")
    print("\neval curve (step, train seconds, val loss):")
    for r in results:
        print(f"  {r['name']}: " + ", ".join(f"({s}, {t:.0f}s, {l:.3f})" for s, t, l in r["points"]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
