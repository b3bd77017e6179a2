"""Quality per unit of compute: transformers' `LlamaForCausalLM` vs HYDRA variants, side by side.

Every row is trained by the SAME plain PyTorch loop on the same data, with the same optimizer, LR
schedule, seeds and evaluation, and compared with the Llama baseline at

  (a) equal wall-clock: each model trains for `--seconds` of training time (evaluation excluded); the
      LR schedule runs over the elapsed fraction of that budget, so every model completes its schedule;
  (b) equal training FLOPs: each model trains for `budget / FLOPs-per-step` steps, where the budget is
      the Llama's FLOPs for `--flops_steps` steps and a model's FLOPs per step are counted with
      `torch.utils.flop_counter.FlopCounterMode` over one real training step (forward + backward with
      labels), so routed layers count at the capacity they really ran at.

The loop (our acceptance check uses the same one at the tiny scale): random windows of `block` tokens,
batch `batch`, AdamW (betas 0.9/0.99, weight decay 0.1 on matrices, none on vectors), lr 1e-3 with
100 linear warm-up steps then cosine to 1e-4, gradient clipping at 1.0. Evaluation: mean next-token
cross-entropy (no routing aux terms) over fixed validation windows, in `model.eval()` (HYDRA's routers
use their causal inference rule), at ~10 points along the run for the curves.

Scales:
  tiny   char level, ../shared/data/tinyshakespeare.txt (first 90% train, last 10% val), block 64,
         batch 12, ~0.8M parameters (Llama 4 x 128, 4 heads, FFN 344, tied embeddings).
  10m    byte-level BPE (vocab 4096) on the standard-library corpus (the package's embedded default
         data), block 128, batch 8, ~11M parameters (Llama 8 x 320, 5 heads, FFN 864, tied).

It prints a table (params, train FLOPs/token, tokens/s, steps, val CE mean +- std over seeds, ratio to
Llama) per comparison and writes PNGs of val CE against wall-clock and against FLOPs, plus a JSON with
every curve.

    python benchmarks/bench_quality.py --scale tiny --seeds 0 1 2            # all tiny rows, 120 s each
    python benchmarks/bench_quality.py --scale tiny --rows llama tiny --mode wallclock --seconds 120
    python benchmarks/bench_quality.py --scale 10m --rows llama tiny --seeds 0 --seconds 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hydra_hf import HydraConfig, HydraForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import train_flops_per_step  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")


# ----------------------------------------------------------------------------- data
@dataclass
class Corpus:
    train: torch.Tensor  # (N_train,) token ids
    val: torch.Tensor  # (N_val,) token ids
    vocab_size: int
    name: str


def char_corpus(path: str) -> Corpus:
    """Char-level tokens of a text file: first 90% train, last 10% validation (nanoGPT's split)."""
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    return Corpus(data[:n], data[n:], len(chars), os.path.basename(path))


def stdlib_bpe_corpus(vocab_size: int = 4096, max_bytes: int = 4_000_000) -> Corpus:
    """The standard-library corpus (hydra-train's embedded default) with a byte-level BPE trained on it."""
    from hydra_hf.training.data import stdlib_corpus, train_bpe_tokenizer

    docs = stdlib_corpus(max_bytes=max_bytes, seed=0)
    n_val = max(1, len(docs) // 10)
    tok = train_bpe_tokenizer(docs[n_val:], vocab_size=vocab_size)

    def encode(texts):
        ids = []
        for enc in tok(texts)["input_ids"]:
            ids.extend(enc)
        return torch.tensor(ids, dtype=torch.long)

    return Corpus(encode(docs[n_val:]), encode(docs[:n_val]), len(tok), "stdlib-bpe")


def batch_at(data: torch.Tensor, block: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
    return torch.stack([data[s:s + block] for s in starts.tolist()])  # (B, block)


# ----------------------------------------------------------------------------- models
@dataclass
class Scale:
    name: str
    block: int
    batch: int
    llama: dict  # LlamaConfig kwargs (vocab and positions filled in)
    recipe: dict  # the `tiny` preset's recipe at this scale: fewer, wider blocks (HydraConfig fields)
    seconds: float
    flops_steps: int
    eval_batches: int


SCALES = {
    "tiny": Scale("tiny", 64, 12, dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4),
                  dict(num_unique_blocks=2, hidden_size=176), 120.0, 1500, 40),
    "10m": Scale("10m", 128, 8, dict(hidden_size=320, intermediate_size=864, num_hidden_layers=8,
                                      num_attention_heads=5, num_key_value_heads=5),
                 dict(num_unique_blocks=4, hidden_size=448, num_attention_heads=7, num_key_value_heads=7),
                 300.0, 300, 10),
}


def llama(scale: Scale, vocab: int, build: bool = True, **over):
    kw = dict(scale.llama, vocab_size=vocab, max_position_embeddings=scale.block, tie_word_embeddings=True,
              rms_norm_eps=1e-6)
    kw.update(over)
    config = LlamaConfig(**kw)
    return LlamaForCausalLM(config) if build else config


def count_params(model_cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in model_cls(config).parameters())


def hydra_config(scale: Scale, vocab: int, **over) -> HydraConfig:
    """HYDRA config at `scale`: Llama's width, heads and depth, C=1, no convs / value shift / q-k mean,
    full RoPE (the "Llama-like" start of the ablations) with `over` applied. `fit_params=True` sizes
    `intermediate_size` (multiple of 8) so the model has the Llama baseline's parameter count."""
    fit = over.pop("fit_params", False)
    width = scale.llama["hidden_size"]
    kw = dict(vocab_size=vocab, hidden_size=width, intermediate_size=scale.llama["intermediate_size"],
              num_attention_heads=scale.llama["num_attention_heads"],
              num_key_value_heads=scale.llama["num_key_value_heads"], compression_factor=1,
              num_unique_blocks=scale.llama["num_hidden_layers"], mor_recursions=1,
              max_position_embeddings=scale.block, use_value_shift=False, use_qk_mean=False,
              qk_conv_kernel_size=1, qk_channel_conv_kernel_size=1, partial_rotary_factor=1.0)
    kw.update(over)
    if fit:
        target = count_params(LlamaForCausalLM, llama(scale, vocab, build=False))
        p0 = count_params(HydraForCausalLM, HydraConfig(**dict(kw, intermediate_size=64)))
        p1 = count_params(HydraForCausalLM, HydraConfig(**dict(kw, intermediate_size=128)))
        per_unit = (p1 - p0) / 64
        kw["intermediate_size"] = max(8, int((target - p0) / per_unit + 64) // 8 * 8)
    return HydraConfig(**kw)


def hydra(scale: Scale, vocab: int, **over) -> HydraForCausalLM:
    """A HYDRA model at `scale`; `over` are HydraConfig fields (or `preset=` for a named preset)."""
    preset = over.pop("preset", None)
    if preset is not None:
        return HydraForCausalLM(HydraConfig.from_preset(preset, vocab_size=vocab,
                                                        max_position_embeddings=scale.block, **over))
    return HydraForCausalLM(hydra_config(scale, vocab, **over))


CCGQA = dict(qk_conv_kernel_size=3, use_qk_mean=True, use_value_shift=True, partial_rotary_factor=0.5)
LEAN = dict(use_value_shift=True, qk_conv_kernel_size=2, partial_rotary_factor=0.5)


def with_key_temperature(model, value: float):
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.key_temperature.fill_(value)
    return model


# The dense start of the routing ablations (the best dense CCGQA row of the screen, see docs/results.md).
BASE = dict(CCGQA)


def base(s, v, **over):
    return hydra(s, v, **dict(BASE, **over))


def half_depth(s) -> dict:
    """Half the unique blocks, each applied twice: the same effective depth with shared weights."""
    return dict(num_unique_blocks=s.llama["num_hidden_layers"] // 2, mor_recursions=2)


MOD = dict(mod_enabled=True, mod_capacity=0.5, mod_every=2)

# Rows: name -> (description, builder(scale, vocab)). "Llama-like" = HYDRA code with MHA at C=1, no convs,
# no value shift, full RoPE: the dense start the attention ablations change one thing at a time from;
# the routing ablations change one thing at a time from BASE.
ROWS = {
    "llama": ("transformers LlamaForCausalLM", lambda s, v: llama(s, v)),
    "tiny": ("HYDRA preset 'tiny' (the recommended configuration)", lambda s, v: hydra(s, v, preset="tiny")),
    "hydra_llamalike": ("HYDRA code, Llama-like: C=1, no convs / value shift / q-k mean, full RoPE",
                        lambda s, v: hydra(s, v)),
    "ccgqa_c1": ("+ CCGQA q/k path at C=1 (seq conv 3, q-k mean, value shift, partial RoPE 0.5)",
                 lambda s, v: hydra(s, v, **CCGQA)),
    "ccgqa_c2": ("CCGQA C=2, 4/2 heads (h=16), FFN re-spent to equal params",
                 lambda s, v: hydra(s, v, **CCGQA, compression_factor=2, num_key_value_heads=2, fit_params=True)),
    "ccgqa_c4": ("CCGQA C=4, 4/2 heads (h=8), FFN re-spent to equal params",
                 lambda s, v: hydra(s, v, **CCGQA, compression_factor=4, num_key_value_heads=2, fit_params=True)),
    "ccgqa_c2_h2": ("CCGQA C=2, 2/2 heads (h=32), FFN re-spent",
                    lambda s, v: hydra(s, v, **CCGQA, compression_factor=2, num_attention_heads=2,
                                       num_key_value_heads=2, fit_params=True)),
    "lean": ("Llama-like + value shift + seq conv 2 (no q-k mean), partial RoPE 0.5",
             lambda s, v: hydra(s, v, **LEAN)),
    "recipe": ("the tiny preset's recipe at this scale (lean, half the blocks, wider; FFN to equal params)",
               lambda s, v: hydra(s, v, **LEAN, **s.recipe, fit_params=True)),
    "recipe_h8": ("recipe with 8 heads", lambda s, v: hydra(s, v, **LEAN, **dict(s.recipe, num_attention_heads=8,
                                                                             num_key_value_heads=8), fit_params=True)),
    "recipe_init03": ("recipe with initializer_range 0.03",
                      lambda s, v: hydra(s, v, **LEAN, **s.recipe, initializer_range=0.03, fit_params=True)),
    "recipe_init04": ("recipe with initializer_range 0.04",
                      lambda s, v: hydra(s, v, **LEAN, **s.recipe, initializer_range=0.04, fit_params=True)),
    "recipe_init05": ("recipe with initializer_range 0.05",
                      lambda s, v: hydra(s, v, **LEAN, **s.recipe, initializer_range=0.05, fit_params=True)),
    "recipe_wider_init04": ("recipe_wider with initializer_range 0.04",
                            lambda s, v: hydra(s, v, **LEAN, **dict(s.recipe, hidden_size=s.recipe["hidden_size"] * 12 // 11),
                                               initializer_range=0.04, fit_params=True)),
    "llama_init03": ("LlamaForCausalLM with initializer_range 0.03 (does the init help Llama too?)",
                     lambda s, v: llama(s, v, initializer_range=0.03)),
    "recipe_wider": ("recipe 1/11 wider (FFN re-spent to equal params)",
                     lambda s, v: hydra(s, v, **LEAN, **dict(s.recipe, hidden_size=s.recipe["hidden_size"] * 12 // 11),
                                        fit_params=True)),
    "lean_init01": ("lean with initializer_range 0.01", lambda s, v: hydra(s, v, **LEAN, initializer_range=0.01)),
    "lean_init03": ("lean with initializer_range 0.03",
                    lambda s, v: hydra(s, v, **LEAN, initializer_range=0.03)),
    "lean_3blocks": ("lean with 3 blocks, hidden 144 (FFN re-spent to equal params): fewer ops per step",
                     lambda s, v: hydra(s, v, **LEAN, num_unique_blocks=3, hidden_size=144, fit_params=True)),
    "lean_2blocks": ("lean with 2 blocks, hidden 176 (FFN re-spent to equal params)",
                     lambda s, v: hydra(s, v, **LEAN, num_unique_blocks=2, hidden_size=176, fit_params=True)),
    "lean_3blocks_160": ("lean with 3 blocks, hidden 160 (FFN re-spent to equal params)",
                         lambda s, v: hydra(s, v, **LEAN, num_unique_blocks=3, hidden_size=160, fit_params=True)),
    "ccgqa_2blocks": ("ccgqa_c1 (seq conv 3, q-k mean, value shift) with 2 blocks, hidden 176, equal params",
                      lambda s, v: hydra(s, v, **CCGQA, num_unique_blocks=2, hidden_size=176, fit_params=True)),
    "lean_temp2": ("lean with the key temperature initialised at 2 (sharper attention from the start)",
                   lambda s, v: with_key_temperature(hydra(s, v, **LEAN), 2.0)),
    # --- routing, one change at a time from BASE
    "mod_e2_c50": ("BASE + MoD every 2nd block, capacity 0.5", lambda s, v: base(s, v, **MOD)),
    "mod_e1_c50": ("BASE + MoD every block, capacity 0.5", lambda s, v: base(s, v, **dict(MOD, mod_every=1))),
    "mod_e2_c25": ("BASE + MoD every 2nd block, capacity 0.25",
                   lambda s, v: base(s, v, **dict(MOD, mod_capacity=0.25))),
    "mod_e2_c125": ("BASE + MoD every 2nd block, capacity 0.125 (the MoD paper's)",
                    lambda s, v: base(s, v, **dict(MOD, mod_capacity=0.125))),
    "mod_e2_c50_bce03": ("mod_e2_c50 with BCE weight 0.03 instead of the auto weight",
                         lambda s, v: base(s, v, **dict(MOD, mod_aux_loss_coef=0.03))),
    "shared2x2": ("BASE with shared depth: half the blocks x 2 recursions, FFN re-spent to equal params",
                  lambda s, v: base(s, v, **half_depth(s), fit_params=True)),
    "mor_expert": ("shared2x2 + MoR expert choice (layer-aware capacities)",
                   lambda s, v: base(s, v, **half_depth(s), fit_params=True, mor_enabled=True)),
    "mor_token": ("shared2x2 + MoR token choice",
                  lambda s, v: base(s, v, **half_depth(s), fit_params=True, mor_enabled=True,
                                    mor_routing="token_choice")),
    "middle_cycle": ("BASE, 4 unique blocks in middle_cycle x 2 (6 effective layers), equal params",
                     lambda s, v: base(s, v, num_unique_blocks=s.llama["num_hidden_layers"], mor_recursions=2,
                                       mor_sharing="middle_cycle", fit_params=True)),
    "moe": ("BASE + 2 MoE FFN blocks (4 experts, top-1), all FFNs re-sized to equal params",
            lambda s, v: base(s, v, moe_enabled=True, moe_num_layers=2, fit_params=True)),
}


def build(row: str, scale: Scale, vocab: int, seed: int):
    torch.manual_seed(seed)
    return ROWS[row][1](scale, vocab)


# ----------------------------------------------------------------------------- training
def param_groups(model, weight_decay: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, progress: float, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100) -> float:
    """100 linear warm-up steps, then cosine from `lr` to `min_lr` over `progress` in [0, 1]."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, val_batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy only (no aux losses), eval mode."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x in val_batches:
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V)
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1)
        ).item()
    model.train(was_training)
    return total / len(val_batches)


@dataclass
class RunResult:
    row: str
    seed: int
    mode: str
    params: int
    flops_per_step: float
    steps: int = 0
    train_seconds: float = 0.0
    val_ce: float = float("nan")
    curve: list = field(default_factory=list)  # (step, train seconds, train FLOPs, val CE)


def train_run(row: str, corpus: Corpus, scale: Scale, seed: int, mode: str, seconds: float, max_steps: int,
              flops_per_step: float, n_evals: int = 10) -> RunResult:
    """Train one model in `mode` ("wallclock": for `seconds`; "flops": for `max_steps` steps)."""
    model = build(row, scale, corpus.vocab_size, seed)
    res = RunResult(row, seed, mode, sum(p.numel() for p in model.parameters()), flops_per_step)
    gen = torch.Generator().manual_seed(1000 + seed)
    val_gen = torch.Generator().manual_seed(7)
    val_batches = [batch_at(corpus.val, scale.block, scale.batch, val_gen) for _ in range(scale.eval_batches)]
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.99), fused=False)
    model.train()
    train_time, step = 0.0, 0
    next_eval = 1
    while True:
        progress = train_time / seconds if mode == "wallclock" else step / max_steps
        if progress >= 1.0:  # "flops" and "steps" modes both run exactly max_steps steps
            break
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress)
        x = batch_at(corpus.train, scale.block, scale.batch, gen)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_time += time.perf_counter() - t0
        step += 1
        progress = train_time / seconds if mode == "wallclock" else step / max_steps
        if progress >= next_eval / n_evals and next_eval < n_evals:
            res.curve.append((step, train_time, step * flops_per_step, evaluate(model, val_batches)))
            next_eval += 1
    res.steps, res.train_seconds = step, train_time
    res.val_ce = evaluate(model, val_batches)
    res.curve.append((step, train_time, step * flops_per_step, res.val_ce))
    return res


def step_times(rows: list[str], corpus: Corpus, scale: Scale, steps: int = 20, repeats: int = 3) -> dict:
    """Milliseconds per training step of each row, measured round-robin in one process (row A's 20
    steps, row B's 20 steps, ..., three times; best of three), so that the machine's load hits every
    row alike and the ratios stay meaningful on a busy machine."""
    models = {r: build(r, scale, corpus.vocab_size, 0) for r in rows}
    opts = {r: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-3, betas=(0.9, 0.99)) for r, m in models.items()}
    gen = torch.Generator().manual_seed(0)

    def step(r):
        x = batch_at(corpus.train, scale.block, scale.batch, gen)
        models[r](input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(models[r].parameters(), 1.0)
        opts[r].step()
        opts[r].zero_grad(set_to_none=True)

    for r in rows:
        for _ in range(5):
            step(r)
    times = {r: [] for r in rows}
    for _ in range(repeats):
        for r in rows:
            t = time.perf_counter()
            for _ in range(steps):
                step(r)
            times[r].append((time.perf_counter() - t) / steps * 1e3)
    return {r: min(v) for r, v in times.items()}


# ----------------------------------------------------------------------------- report
def summarize(results: list[RunResult], mode: str, tokens_per_step: int) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r.row for r in results if r.mode == mode):
        runs = [r for r in results if r.mode == mode and r.row == name]
        ces = torch.tensor([r.val_ce for r in runs], dtype=torch.float64)
        steps = sum(r.steps for r in runs) / len(runs)
        secs = sum(r.train_seconds for r in runs) / len(runs)
        rows.append(dict(row=name, params=runs[0].params, flops_per_token=runs[0].flops_per_step / tokens_per_step,
                         tokens_per_s=steps * tokens_per_step / max(secs, 1e-9), steps=steps,
                         ce_mean=ces.mean().item(), ce_std=ces.std().item() if len(runs) > 1 else 0.0,
                         seeds=len(runs)))
    base = next((r for r in rows if r["row"] == "llama"), None)
    for r in rows:
        r["ratio"] = r["ce_mean"] / base["ce_mean"] if base else float("nan")
    return rows


def print_table(rows: list[dict], title: str):
    print(f"\n{title}")
    print(f"| row | params | train MFLOP/token | tokens/s | steps | val CE (mean +- std, n) | ratio to Llama |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['params'] / 1e6:.3f}M | {r['flops_per_token'] / 1e6:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['steps']:.0f} | {r['ce_mean']:.4f} +- {r['ce_std']:.4f} ({r['seeds']}) | {r['ratio']:.4f} |")


def plot(results: list[RunResult], out_dir: str, scale: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for mode, xi, xlabel in (("wallclock", 1, "training seconds"), ("flops", 2, "training FLOPs")):
        runs = [r for r in results if r.mode == mode]
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        names = list(dict.fromkeys(r.row for r in runs))
        for i, name in enumerate(names):
            for j, r in enumerate(x for x in runs if x.row == name):
                xs = [p[xi] for p in r.curve]
                ys = [p[3] for p in r.curve]
                ax.plot(xs, ys, color=f"C{i % 10}", alpha=0.8, label=name if j == 0 else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val cross-entropy")
        ax.set_title(f"{scale}: val CE vs {xlabel}")
        lo = min(p[3] for r in runs for p in r.curve)
        ax.set_ylim(lo - 0.05, lo + 0.8)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"quality_{scale}_{mode}.png"), dpi=110)
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    p.add_argument("--rows", nargs="+", default=None, help=f"rows to run (default: all): {', '.join(ROWS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mode", choices=["wallclock", "flops", "both", "steps", "speed"], default="both",
                   help="both = wallclock + flops; steps = every model trains --steps steps (per-step quality); "
                        "speed = only time training steps, round-robin, and print ms/step")
    p.add_argument("--steps", type=int, default=2000, help="steps per run in --mode steps")
    p.add_argument("--seconds", type=float, default=None, help="equal wall-clock budget per run (default by scale)")
    p.add_argument("--flops_steps", type=int, default=None,
                   help="equal-FLOPs budget = Llama's FLOPs for this many steps (default by scale)")
    p.add_argument("--data", default=SHAKESPEARE, help="char-level text file for --scale tiny")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="/tmp/bench_quality")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    p.add_argument("--reuse_llama", action="store_true",
                   help="reuse a Llama run of the same steps and seed from --out (steps / flops modes only)")
    args = p.parse_args(argv)
    if args.list:
        for name, (desc, _) in ROWS.items():
            print(f"{name:24s} {desc}")
        return 0
    rows = args.rows or list(ROWS)
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if "llama" not in rows:
        rows = ["llama"] + rows
    scale = SCALES[args.scale]
    seconds = args.seconds or scale.seconds
    torch.set_num_threads(args.threads)
    corpus = char_corpus(args.data) if args.scale == "tiny" else stdlib_bpe_corpus()
    tokens_per_step = scale.block * scale.batch
    if args.mode == "speed":
        ms = step_times(rows, corpus, scale)
        print(f"\n{scale.name} scale, {args.threads} threads: ms per training step (best of 3 x 20, round-robin)")
        print("| row | params | ms/step | vs Llama |")
        print("|---|---|---|---|")
        for r in rows:
            n = sum(p.numel() for p in build(r, scale, corpus.vocab_size, 0).parameters())
            print(f"| {r} | {n / 1e6:.3f}M | {ms[r]:.1f} | {ms[r] / ms['llama']:.2f} |")
        return 0
    flops = {r: train_flops_per_step(build(r, scale, corpus.vocab_size, 0), corpus.vocab_size, scale.batch,
                                     scale.block) for r in rows}
    budget = flops["llama"] * (args.flops_steps or scale.flops_steps)
    os.makedirs(args.out, exist_ok=True)
    modes = ["wallclock", "flops"] if args.mode == "both" else [args.mode]
    results: list[RunResult] = []
    cache_path = os.path.join(args.out, "llama_cache.json")
    llama_cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    for mode in modes:
        for seed in args.seeds:
            for row in rows:
                steps = args.steps if mode == "steps" else max(1, round(budget / flops[row]))
                key = f"{scale.name}/{corpus.name}/{mode}/{steps}/{seed}"
                if args.reuse_llama and row == "llama" and mode != "wallclock" and key in llama_cache:
                    r = RunResult(**llama_cache[key])  # deterministic: same steps, same seed, same code
                else:
                    r = train_run(row, corpus, scale, seed, mode, seconds, steps, flops[row])
                if row == "llama" and mode != "wallclock":
                    llama_cache[key] = r.__dict__
                    with open(cache_path, "w") as f:
                        json.dump(llama_cache, f)
                results.append(r)
                print(f"[{mode}] {row} seed {seed}: val CE {r.val_ce:.4f} after {r.steps} steps, "
                      f"{r.train_seconds:.1f} s", flush=True)
    print(f"\n{scale.name} scale, corpus {corpus.name} (vocab {corpus.vocab_size}), block {scale.block}, "
          f"batch {scale.batch}, {args.threads} threads, seeds {args.seeds}")
    summary = {}
    for mode in modes:
        title = {"wallclock": f"equal wall-clock: {seconds:.0f} s of training",
                 "flops": f"equal training FLOPs: {budget / 1e12:.3f} TFLOP (Llama x {args.flops_steps or scale.flops_steps} steps)",
                 "steps": f"equal steps: {args.steps}"}[mode]
        summary[mode] = summarize(results, mode, tokens_per_step)
        print_table(summary[mode], title)
    plot(results, args.out, scale.name)
    with open(os.path.join(args.out, f"quality_{scale.name}.json"), "w") as f:
        json.dump({"summary": summary, "runs": [r.__dict__ for r in results]}, f, indent=1)
    print(f"\nplots and JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
