"""Cached greedy decoding: HYDRA vs transformers' Llama and Zaya (CCA) of the same width and depth.

Models (randomly initialised, eval mode, --dtype, SDPA attention), all with hidden --hidden, --layers
effective layers, --heads query heads / --kv_heads KV heads, vocab --vocab, SwiGLU width --intermediate
(default Llama's convention: 8/3 * hidden rounded up to a multiple of 32, 1376 for 512):

- llama:         transformers' `LlamaForCausalLM` (head dim hidden / heads).
- zaya:          transformers' `ZayaForCausalLM`, the CCA reference, made dense-equivalent: 1 expert of the
                 same SwiGLU width, top-1 (its router and skip class remain, with router_hidden_size
                 --zaya_router_hidden), head dim hidden / (C * heads) so its latent width matches HYDRA's.
- hydra:         `HydraForCausalLM`, compression_factor C (--compression, default 4), routing off,
                 --layers unique blocks x 1 recursion (the same parameters per layer as Llama).
- hydra_mod_mor: HYDRA with MoD (mod_every 2) and MoR expert choice on, --layers / 2 unique blocks x 2
                 recursions (the same effective depth). Routers are untrained: at inference a token runs
                 a routed layer iff its router logit > 0, so roughly half of the routed slots run; the
                 "layers run" column says how many layer-token slots were computed.

Per case (batch x prompt, --cases) and model:

- prefill ms: one forward over the prompt with use_cache=True, attention_mask of ones and
  logits_to_keep=1 (as generate() does), median of --prefill_repeats fresh runs;
- decode tok/s: after ONE prefill (the last timed one), 2 untimed warm-up steps, then --steps greedy
  single-token steps on that cache (argmax of the last logits fed back with the cache and an attention
  mask of ones covering past + new, as generate() passes it; positions are left to the model). Only the
  decode loop is inside time.perf_counter(); tokens/s = batch * steps / seconds ("tok/s best round":
  from the fastest round's seconds per step, what a step costs when no other process interferes; the
  JSON also has the median round and every round);
- cache B/token: bytes of the keys/values in the cache (HYDRA: `cache.kv_bytes()`; DynamicCache: the
  layers' keys and values) / (batch * positions cached). Other cache tensors are split by whether they
  grew during decoding: "other B/tok" (HYDRA's per-column positions / validity / steps) and fixed
  states (HYDRA's conv / value-shift states, Zaya's conv and recurrent states; in the JSON);
- theory: the per-token KV size of a dense layer stack relative to Llama (2 * Hk * head_dim per layer).

Machine load (this CPU is shared) is spread over the rows alike: every model is warmed up on a short
prompt when built, prefill repeats go round-robin over the models, and the decode steps run in --rounds
round-robin rounds (each model decodes steps / rounds tokens per round; the timed seconds of its rounds
are summed). The ratio rows divide each model by Llama (prefill: time ratio, < 1 is faster; decode:
throughput ratio, > 1 is faster; ms/step: time ratio). The 1-minute load average is printed with the
table: on a shared machine absolute numbers move with it, the ratios much less. With other processes on
the cores, 2 OpenMP threads lose whole rounds to scheduling (10-50x slower steps); the best round and
--threads 1 are then the numbers to read.

--profile runs torch.profiler (ops: calls and self CPU ms per token, GEMMs vs the rest) and cProfile
(model-code functions, cumulative ms per token) over --steps decode steps of each model on the first case,
instead of the timing table.

    python benchmarks/bench_decode.py [--cases 1x128,1x2048,8x2048 --steps 64 --threads 2 --json out.json]
    python benchmarks/bench_decode.py --cases 1x32 --steps 8 --hidden 128 --vocab 1000   # smoke test
    python benchmarks/bench_decode.py --cases 1x128 --steps 32 --models llama,hydra,hydra_mod_mor --profile --threads 1
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import math
import os
import pstats
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hydra_hf  # noqa: F401  (registers the Auto classes)
from hydra_hf import HydraConfig, HydraForCausalLM

MODELS = ("llama", "zaya", "hydra", "hydra_mod_mor")
BASELINE_MODELS = ("hydra_base", "hydra_mod_mor_base")  # the same two HYDRA models from --baseline_src
LABELS = {
    "llama": "Llama", "zaya": "Zaya (CCA)", "hydra": "HYDRA off", "hydra_mod_mor": "HYDRA MoD+MoR",
    "hydra_base": "HYDRA off (baseline)", "hydra_mod_mor_base": "HYDRA MoD+MoR (baseline)",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WARMUP_STEPS = 2


# ---------------------------------------------------------------------------- models


def build_model(name: str, args) -> tuple[torch.nn.Module, dict]:
    """The model and its theoretical KV numbers: {"kv_heads", "head_dim", "layers"}."""
    E, L, H, Hk, V, I = args.hidden, args.layers, args.heads, args.kv_heads, args.vocab, args.intermediate
    max_pos = args.max_positions
    if name == "llama":
        cfg = LlamaConfig(
            vocab_size=V, hidden_size=E, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
            num_key_value_heads=Hk, max_position_embeddings=max_pos, tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        model, head_dim = LlamaForCausalLM(cfg), E // H
    elif name == "zaya":
        from transformers import ZayaConfig, ZayaForCausalLM  # transformers >= 5.23

        head_dim = E // (args.compression * H)
        cfg = ZayaConfig(
            vocab_size=V, hidden_size=E, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=Hk,
            head_dim=head_dim, num_experts=1, num_experts_per_tok=1, moe_intermediate_size=I,
            router_hidden_size=args.zaya_router_hidden, max_position_embeddings=max_pos, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa",
        )
        model = ZayaForCausalLM(cfg)
    elif name in ("hydra", "hydra_mod_mor") + BASELINE_MODELS:
        routed = name.startswith("hydra_mod_mor")
        config_class, model_class = (HydraConfig, HydraForCausalLM)
        if name in BASELINE_MODELS:
            config_class, model_class = load_baseline(args.baseline_src)
        if routed and L % 2:
            raise ValueError(f"hydra_mod_mor needs an even --layers (blocks x 2 recursions), got {L}")
        cfg = config_class(
            vocab_size=V, hidden_size=E, intermediate_size=I, num_attention_heads=H, num_key_value_heads=Hk,
            compression_factor=args.compression, max_position_embeddings=max_pos, tie_word_embeddings=True,
            num_unique_blocks=L // 2 if routed else L, mor_recursions=2 if routed else 1,
            mod_enabled=routed, mor_enabled=routed, attn_implementation="sdpa",
        )
        model, head_dim = model_class(cfg), cfg.latent_head_dim
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = model.to(DTYPES[args.dtype]).eval()
    return model, {"kv_heads": Hk, "head_dim": head_dim, "layers": L}


def load_baseline(src: str | None):
    """HydraConfig and HydraForCausalLM of another checkout of this repository (e.g. `git worktree add /tmp/old
    <commit>`), imported as the package `hydra_baseline` next to the installed `hydra_hf`, for old-vs-new rows in one
    run. Its `__init__` is not run (it would register the model type "hydra" a second time)."""
    import importlib
    import sys
    import types

    if src is None:
        raise ValueError("the *_base models need --baseline_src (a checkout of this repository to compare with)")
    if "hydra_baseline" not in sys.modules:
        package = types.ModuleType("hydra_baseline")
        package.__path__ = [os.path.join(os.path.abspath(src), "hydra_hf")]
        sys.modules["hydra_baseline"] = package
    config = importlib.import_module("hydra_baseline.configuration_hydra").HydraConfig
    model = importlib.import_module("hydra_baseline.modeling_hydra").HydraForCausalLM
    return config, model


def cache_kwarg(model) -> str:
    """The forward argument that takes the cache: `cache` where the forward has it (transformers >= 5.24, where
    `past_key_values` is a deprecated alias), else `past_key_values` (older transformers, older HYDRA code)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out):
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else getattr(out, key, None)
        if value is not None:
            return value
    raise RuntimeError(f"the output ({type(out).__name__}) carries no cache")


def layer_slots(out, batch: int, num_layers: int) -> float | None:
    """Fraction of the layer-token slots a HYDRA forward computed (its routing record); None otherwise."""
    record = getattr(out, "routing", None)
    processed = getattr(record, "tokens_processed", None)
    if not processed:
        return None
    return sum(int(n) for n in processed.values()), batch * num_layers


# ---------------------------------------------------------------------------- cache bytes


def _tensors(obj, prefix: str):
    """(path, tensor) of the tensors an object holds directly, in a dict, list or tuple attribute."""
    for name, value in vars(obj).items():
        if torch.is_tensor(value):
            yield f"{prefix}.{name}", value
        elif isinstance(value, dict):
            for key, item in value.items():
                if torch.is_tensor(item):
                    yield f"{prefix}.{name}[{key}]", item
        elif isinstance(value, (list, tuple)):
            for key, item in enumerate(value):
                if torch.is_tensor(item):
                    yield f"{prefix}.{name}[{key}]", item


def cache_snapshot(cache) -> dict:
    """{"kv": bytes of keys/values, "other": {path: bytes}} of a HYDRA cache or a DynamicCache."""
    layers = getattr(cache, "layers", None) or []
    kv, other = 0, {}
    for i, layer in enumerate(layers):
        for path, t in _tensors(layer, f"layers[{i}]"):
            nbytes = t.numel() * t.element_size()
            if "_buffer" in path:  # the storage behind HYDRA's keys / values (spare columns): not per-token data
                continue
            if path.endswith((".keys", ".values")):
                kv += nbytes
            else:
                other[path] = nbytes
    if hasattr(cache, "kv_bytes"):  # HYDRA's own count of the latent keys and values
        kv = int(cache.kv_bytes())
    return {"kv": kv, "other": other}


def cache_stats(before: dict, after: dict, batch: int, tokens_before: int, tokens_after: int) -> dict:
    grown = {p: b for p, b in after["other"].items() if before["other"].get(p) != b}
    fixed = {p: b for p, b in after["other"].items() if p not in grown}
    return {
        "kv_bytes": after["kv"],
        "kv_bytes_per_token": after["kv"] / (batch * tokens_after),
        "other_growing_bytes_per_token": sum(grown.values()) / (batch * tokens_after),
        "fixed_state_bytes": sum(fixed.values()),
        "tokens_cached": tokens_after,
    }


# ---------------------------------------------------------------------------- measurement


class Run:
    """One model on one case: its prefill times, the decode state and the decode timings."""

    def __init__(self, name, model, theory, batch, prompt, args):
        self.name, self.model, self.theory = name, model, theory
        self.batch, self.prompt, self.args = batch, prompt, args
        self.kwarg = cache_kwarg(model)
        self.prefill_s: list[float] = []
        self.decode_s = 0.0
        self.decode_steps = 0
        self.round_s: list[tuple[int, float]] = []  # (steps, seconds) of each timed round
        self.slots = [0, 0]  # HYDRA: layer-token slots computed / offered during the timed steps
        self.prefill_slots = None
        self.error = None

    def prefill(self, input_ids, mask):
        t0 = time.perf_counter()
        out = self.model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        self.prefill_s.append(time.perf_counter() - t0)
        self.cache = output_cache(out)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length = input_ids.shape[1]
        self.mask = torch.ones(self.batch, self.length + WARMUP_STEPS + self.args.steps + 1, dtype=torch.long)
        self.prefill_slots = layer_slots(out, self.batch * self.length, self.theory["layers"])
        self.snapshot = cache_snapshot(self.cache)
        self.tokens_at_snapshot = self.length

    def step(self):
        out = self.model(
            input_ids=self.next, attention_mask=self.mask[:, : self.length + 1], use_cache=True,
            **{self.kwarg: self.cache},
        )
        self.cache = output_cache(out)
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.length += 1
        return out

    def decode(self, steps: int):
        slots = [0, 0]
        t0 = time.perf_counter()
        for _ in range(steps):
            out = self.step()
            s = layer_slots(out, self.batch, self.theory["layers"])
            if s is not None:
                slots[0] += s[0]
                slots[1] += s[1]
        seconds = time.perf_counter() - t0
        self.decode_s += seconds
        self.decode_steps += steps
        self.round_s.append((steps, seconds))
        self.slots[0] += slots[0]
        self.slots[1] += slots[1]

    def result(self) -> dict:
        res = {"model": self.name, "batch": self.batch, "prompt": self.prompt}
        if self.error:
            res["error"] = self.error
            return res
        res["prefill_ms"] = 1e3 * statistics.median(self.prefill_s)
        res["prefill_ms_best"] = 1e3 * min(self.prefill_s)
        res["prefill_ms_all"] = [1e3 * t for t in self.prefill_s]
        res["decode_steps"] = self.decode_steps
        res["decode_s"] = self.decode_s
        res["decode_tok_s"] = self.batch * self.decode_steps / self.decode_s
        res["ms_per_step"] = 1e3 * self.decode_s / self.decode_steps
        # less sensitive to load bursts from other processes: the median and the fastest round
        res["ms_per_step_median_round"] = 1e3 * statistics.median(s / n for n, s in self.round_s)
        res["ms_per_step_best_round"] = 1e3 * min(s / n for n, s in self.round_s)
        res["decode_tok_s_best_round"] = 1e3 * self.batch / res["ms_per_step_best_round"]
        res["round_s"] = [s for _, s in self.round_s]
        res.update(cache_stats(self.snapshot, cache_snapshot(self.cache), self.batch, self.tokens_at_snapshot,
                               self.length))
        res["theory_kv_bytes_per_token"] = 2 * self.theory["kv_heads"] * self.theory["head_dim"] * \
            self.theory["layers"] * torch.finfo(DTYPES[self.args.dtype]).bits // 8
        if self.slots[1]:
            res["decode_layer_slots_run"] = self.slots[0] / self.slots[1]
        if self.prefill_slots is not None:
            res["prefill_layer_slots_run"] = self.prefill_slots[0] / self.prefill_slots[1]
        return res


def warm_up(model, vocab: int):
    """A short prefill and a few cached steps, so first-call costs stay out of every timed row."""
    x = torch.randint(0, vocab, (1, 16))
    out = model(input_ids=x, attention_mask=torch.ones(1, 16, dtype=torch.long), use_cache=True, logits_to_keep=1)
    cache, tok = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    for i in range(3):
        out = model(input_ids=tok, attention_mask=torch.ones(1, 17 + i, dtype=torch.long), use_cache=True,
                    **{cache_kwarg(model): cache})
        cache, tok = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)


def measure_case(models: dict, batch: int, prompt: int, args) -> list[dict]:
    gen = torch.Generator().manual_seed(batch * 100003 + prompt)
    input_ids = torch.randint(0, args.vocab, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    runs = [Run(name, model, theory, batch, prompt, args) for name, (model, theory) in models.items()]

    def guarded(run, fn, *a):
        if run.error:
            return
        try:
            fn(*a)
        except Exception as e:  # one model failing (API drift) must not stop the others
            run.error = f"{type(e).__name__}: {e}"
            print(f"  {LABELS[run.name]} failed on {batch}x{prompt}: {run.error}")

    for _ in range(args.prefill_repeats):  # round-robin over the models
        for run in runs:
            guarded(run, run.prefill, input_ids, mask)
    for run in runs:  # untimed warm-up steps on the cache of the last prefill
        for _ in range(WARMUP_STEPS):
            guarded(run, run.step)
        if not run.error:
            run.slots = [0, 0]
    rounds = max(1, min(args.rounds, args.steps))
    per_round = [args.steps // rounds + (1 if r < args.steps % rounds else 0) for r in range(rounds)]
    for steps in per_round:  # round-robin over the models
        for run in runs:
            guarded(run, run.decode, steps)
    results = [run.result() for run in runs]
    for run in runs:
        run.cache = None  # free the caches before the next case
    return results


# ---------------------------------------------------------------------------- output


def print_table(results: list[dict], args):
    print("| case | model | prefill ms | decode tok/s | tok/s best round | ms/step | KV B/token | other B/tok | "
          "KV vs Llama | theory | layers run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = []
    for r in results:
        if (r["batch"], r["prompt"]) not in cases:
            cases.append((r["batch"], r["prompt"]))
    for batch, prompt in cases:
        rows = [r for r in results if (r["batch"], r["prompt"]) == (batch, prompt)]
        llama = next((r for r in rows if r["model"] == "llama" and "error" not in r), None)
        case = f"{batch}x{prompt}"
        for r in rows:
            if "error" in r:
                print(f"| {case} | {LABELS[r['model']]} | failed: {r['error'][:80]} | | | | | | | | |")
                continue
            kv_ratio = theory = "-"
            if llama is not None:
                kv_ratio = f"{r['kv_bytes_per_token'] / llama['kv_bytes_per_token']:.3f}"
                theory = f"{r['theory_kv_bytes_per_token'] / llama['theory_kv_bytes_per_token']:.3f}"
            run = r.get("decode_layer_slots_run")
            print(
                f"| {case} | {LABELS[r['model']]} | {r['prefill_ms']:,.1f} | {r['decode_tok_s']:,.1f} | "
                f"{r['decode_tok_s_best_round']:,.1f} | "
                f"{r['ms_per_step']:.2f} | {r['kv_bytes_per_token']:,.0f} | {r['other_growing_bytes_per_token']:,.0f} | "
                f"{kv_ratio} | {theory} | {'-' if run is None else f'{run:.0%}'} |"
            )
        if llama is not None:
            for r in rows:
                if r["model"] == "llama" or "error" in r:
                    continue
                print(
                    f"| {case} | {LABELS[r['model']]} / Llama | {r['prefill_ms'] / llama['prefill_ms']:.2f}x time | "
                    f"{r['decode_tok_s'] / llama['decode_tok_s']:.2f}x | "
                    f"{r['decode_tok_s_best_round'] / llama['decode_tok_s_best_round']:.2f}x | "
                    f"{r['ms_per_step'] / llama['ms_per_step']:.2f}x | "
                    f"{r['kv_bytes_per_token'] / llama['kv_bytes_per_token']:.3f}x | | | | |"
                )


# ---------------------------------------------------------------------------- profiling


def profile_decode(models: dict, batch: int, prompt: int, args):
    """torch.profiler and cProfile over `--steps` decode steps of each model (after a prefill and warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (batch, prompt), generator=gen)
    mask = torch.ones(batch, prompt, dtype=torch.long)
    steps = args.steps
    for name, (model, theory) in models.items():
        run = Run(name, model, theory, batch, prompt, args)
        run.prefill(input_ids, mask)
        for _ in range(WARMUP_STEPS):
            run.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            run.step()
        plain = (time.perf_counter() - t0) / steps
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                run.step()
        profiler = cProfile.Profile()
        profiler.enable()
        t0 = time.perf_counter()
        for _ in range(steps):
            run.step()
        prof_ms = 1e3 * (time.perf_counter() - t0) / steps
        profiler.disable()
        print(f"\n=== {LABELS[name]}: {batch}x{prompt}, {steps} steps; {1e3 * plain:.2f} ms/token unprofiled, "
              f"{prof_ms:.2f} ms/token under cProfile ===")
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_self = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
        n_ops = sum(e.count for e in events) / steps
        gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / 1e3 / steps
        print(f"torch.profiler: {n_ops:.0f} op calls/token, self CPU {total_self:.2f} ms/token, of which GEMMs "
              f"(mm/addmm/bmm) {gemm:.2f} and everything else {total_self - gemm:.2f}; top ops by self CPU:")
        print("| op | calls/token | self ms/token | total ms/token |")
        print("|---|---|---|---|")
        for e in events[: args.profile_top]:
            print(f"| {e.key} | {e.count / steps:.1f} | {e.self_cpu_time_total / 1e3 / steps:.3f} | "
                  f"{e.cpu_time_total / 1e3 / steps:.3f} |")
        stats = pstats.Stats(profiler, stream=io.StringIO())
        rows = []
        for (filename, line, func), (cc, nc, tt, ct, _) in stats.stats.items():
            short = filename.split("/site-packages/")[-1]
            short = short[short.index("hydra_hf/"):] if "hydra_hf/" in short else short
            rows.append((ct, tt, nc, f"{short}:{line}({func})"))
        print("cProfile: model-code functions by cumulative time (module-call and decorator wrappers left out; "
              "'own' = Python time outside the ops it calls):")
        print("| function | calls/token | own ms/token | cumulative ms/token |")
        print("|---|---|---|---|")
        shown = 0
        for ct, tt, nc, where in sorted(rows, reverse=True):
            if not any(s in where for s in ("hydra_hf/", "transformers/")) or any(s in where for s in _WRAPPERS):
                continue
            print(f"| {where} | {nc / steps:.1f} | {1e3 * tt / steps:.3f} | {1e3 * ct / steps:.3f} |")
            shown += 1
            if shown >= args.profile_top:
                break
        own = sum(tt for _, tt, _, where in rows if "hydra_hf/" in where or "transformers/" in where)
        print(f"Python time inside hydra_hf / transformers code itself: {1e3 * own / steps:.2f} ms/token")


_WRAPPERS = ("utils/generic.py", "output_capturing.py", "modeling_layers.py")


# ---------------------------------------------------------------------------- main


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        b, _, t = item.strip().lower().partition("x")
        cases.append((int(b), int(t)))
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x128,1x2048,8x2048", help="batch x prompt list, e.g. 1x128,8x2048")
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per model and case")
    parser.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS + BASELINE_MODELS)}")
    parser.add_argument(
        "--baseline_src", default=None,
        help="a checkout of this repository: adds its HYDRA models (hydra_base, hydra_mod_mor_base) to the run",
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="effective layers")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 * hidden rounded up to 32")
    parser.add_argument("--compression", type=int, default=4, help="HYDRA compression_factor (Zaya head dim too)")
    parser.add_argument("--zaya_router_hidden", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill_repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=16, help="round-robin decode rounds over the models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--profile", action="store_true", help="profile decode on the first case instead")
    parser.add_argument("--profile_top", type=int, default=15)
    args = parser.parse_args()
    if args.intermediate is None:
        args.intermediate = 32 * math.ceil(8 * args.hidden / 3 / 32)
    torch.set_num_threads(args.threads)
    cases = parse_cases(args.cases)
    args.max_positions = max(2048, max(t for _, t in cases) + args.steps + WARMUP_STEPS + 8)

    models = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        torch.manual_seed(args.seed)
        try:
            model, theory = build_model(name, args)
            with torch.no_grad():
                warm_up(model, args.vocab)
        except Exception as e:  # e.g. a transformers without models/zaya, or an API change
            print(f"{LABELS.get(name, name)}: not built ({type(e).__name__}: {e}); continuing without it")
            continue
        models[name] = (model, theory)
        params = sum(p.numel() for p in model.parameters())
        print(f"built {LABELS[name]}: {params / 1e6:.1f}M parameters")

    import transformers

    header = (f"hidden {args.hidden}, {args.layers} effective layers, {args.heads} q / {args.kv_heads} kv heads, "
              f"vocab {args.vocab}, intermediate {args.intermediate}, C={args.compression}, {args.dtype}, "
              f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")
    print(header)
    if args.profile:
        with torch.no_grad():
            profile_decode(models, *cases[0], args)
        return

    results = []
    load_start = os.getloadavg()[0]
    for batch, prompt in cases:
        t0 = time.perf_counter()
        with torch.no_grad():
            results += measure_case(models, batch, prompt, args)
        print(f"case {batch}x{prompt} measured in {time.perf_counter() - t0:.0f} s")
    print(f"\n{header}\nprefill: median of {args.prefill_repeats}; decode: {args.steps} greedy steps after "
          f"{WARMUP_STEPS} warm-up steps, {max(1, min(args.rounds, args.steps))} round-robin rounds; load average at start "
          f"{load_start:.2f}, at end {os.getloadavg()[0]:.2f} (1 min)")
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {k: v for k, v in vars(args).items()}, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
