"""Decoding off PyTorch: HYDRA and a same-shape transformers Llama, exported the same way, side by side (one run).

Both models are exported with transformers' `OnnxExporter` as a prefill graph and a single-token decode graph on a
static cache (HYDRA: `hydra_hf.export_hydra.export_for_decoding`, `HydraStaticCache`; Llama: the same two graphs on
transformers' `StaticCache`, `input_ids` / 2D `attention_mask` padded to max_cache_len / `position_ids`), saved with
`save_pretrained`, loaded back with `ExportedModel.from_pretrained` and run on ONNX Runtime through the exporters'
`OnnxModelRunner` (CPU, --threads intra-op threads).

Shapes: the HYDRA preset (--preset, default `debug`: hidden 512, 2 blocks x 2 recursions = 4 effective layers, 4 / 2
heads, C = 4, SwiGLU 2048) with --vocab; the Llama has the same hidden size, effective depth, heads, SwiGLU width,
vocab and embedding tying (so 2x HYDRA's block parameters: HYDRA shares each block over its 2 recursions). Random
weights, fp32, batch 1, routing off.

Per model, decode tokens/s (batch 1, a --prompt token prompt, then --new_tokens greedy steps; only the decode steps
are timed) for:

- eager: the PyTorch model's forward on its default growing cache (what `generate()` uses);
- torch.compile: the forward compiled with `fullgraph=True` (inductor) on the static cache, the mask padded to
  max_cache_len so every step has the same shapes (compile time reported apart, not in tok/s);
- ONNX Runtime: the exported decode graph through the exporters' runner (its IO binding and pytree rebuild of the
  cache included: what `ExportedModel` costs per step).

The steps run in --rounds interleaved rounds (every backend of every model decodes new_tokens / rounds steps per
round); "best" is the fastest round (what a step costs when no other process interferes; this CPU is shared),
"median" the median round. Also: whether ONNX Runtime's greedy tokens equal eager's (token for token), the exported
file sizes (graph + weights of each component) and the static cache's bytes.

With --equality, first: HYDRA at the preset's own shape, routing off and MoD + MoR (weights with std
--equality_std so that greedy sequences move and the routers process some tokens and skip others), exported to ONNX
with a dynamic batch, greedy decode of 32 tokens on ONNX Runtime against eager `generate()` for batch 1 and a
left-padded batch of 2 (tokens equal, distinct tokens, largest logit difference).

    python benchmarks/bench_export.py [--preset debug --vocab 32000 --prompt 32 --new_tokens 64 --threads 2]
    python benchmarks/bench_export.py --equality --no_compile --new_tokens 0   # only the equality table
    python benchmarks/bench_export.py --preset tiny --vocab 97 --new_tokens 16 --no_compile   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import hydra_hf  # noqa: F401  (registers the Auto classes and the pytree nodes)
from hydra_hf import HydraConfig, HydraForCausalLM, HydraStaticCache
from hydra_hf.cache_hydra import storage_bytes
from hydra_hf.export_hydra import export_for_decoding


def padded_mask(prompt: int, max_cache_len: int) -> torch.Tensor:
    mask = torch.zeros(1, max_cache_len, dtype=torch.long)
    mask[:, :prompt] = 1
    return mask


class Hydra:
    name = "HYDRA"

    def __init__(self, config):
        torch.manual_seed(0)
        self.model = HydraForCausalLM(config).eval()

    def static_cache(self, max_cache_len):
        return HydraStaticCache(self.model.config, max_cache_len=max_cache_len)

    def step_inputs(self, token, mask, position):
        return dict(input_ids=token, attention_mask=mask)

    def prefill_inputs(self, ids, mask, cache):
        return dict(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)

    def export(self, max_cache_len, prompt):
        return export_for_decoding(self.model, "onnx", max_cache_len=max_cache_len, batch_size=1, prompt_length=prompt)


class Llama(Hydra):
    name = "Llama"

    def __init__(self, hydra_config):
        c = hydra_config
        self.config = LlamaConfig(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads, tie_word_embeddings=c.tie_word_embeddings,
            max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        )
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(self.config).eval()

    def static_cache(self, max_cache_len):
        return StaticCache(config=self.config, max_cache_len=max_cache_len)

    def step_inputs(self, token, mask, position):
        return dict(input_ids=token, attention_mask=mask, position_ids=torch.tensor([[position]]))

    def prefill_inputs(self, ids, mask, cache):
        return dict(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1])[None], cache=cache,
                    logits_to_keep=1)

    def export(self, max_cache_len, prompt):
        """The same two graphs as HYDRA's, through the same `OnnxExporter`, on transformers' `StaticCache`."""
        from transformers.exporters.base import ExportedModel
        from transformers.exporters.exporter_onnx import OnnxConfig, OnnxExporter

        ids = torch.randint(0, self.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
        mask = padded_mask(prompt, max_cache_len)
        prefill = self.prefill_inputs(ids, mask, self.static_cache(max_cache_len))
        with torch.no_grad():
            out = self.model(**copy.deepcopy(prefill))
        step_mask = mask.clone()
        step_mask[:, prompt] = 1
        decode = dict(self.step_inputs(out.logits[:, -1:].argmax(-1), step_mask, prompt), cache=out.cache)
        exporter = OnnxExporter()
        components = {
            name: exporter.export(self.model, copy.deepcopy(inputs), OnnxConfig()).components["model"]
            for name, inputs in (("prefill", prefill), ("decode", decode))
        }
        return ExportedModel(components, "onnx", config=self.config)


def decode_loop(prefill, step, prompt_ids, mask, steps):
    """Prefill, then one greedy step per `next()`: yields the tokens so far."""
    out = prefill()
    tokens = []
    P = prompt_ids.shape[1]
    for i in range(steps):
        token = out.logits[:, -1:].argmax(-1)
        tokens.append(int(token))
        mask[:, P + i] = 1
        out = step(token, mask, P + i, out)
        yield tokens


def make_backends(wrapper, args, exported_runners):
    """{backend: (prefill(), step(token, mask, position, out))} over fresh caches."""
    model, S = wrapper.model, args.max_cache_len
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    backends = {}

    def eager():
        ones = torch.ones(1, args.prompt, dtype=torch.long)

        def prefill():
            with torch.no_grad():
                return model(prompt_ids, attention_mask=ones, use_cache=True, logits_to_keep=1)

        def step(token, mask, position, out):
            with torch.no_grad():
                return model(token, attention_mask=mask[:, : position + 1], cache=out.cache, use_cache=True)

        return prefill, step, torch.ones(1, S, dtype=torch.long)

    backends["eager"] = eager()
    if not args.no_compile:
        compiled = torch.compile(model, fullgraph=True)

        def prefill():
            with torch.no_grad():
                return model(**wrapper.prefill_inputs(prompt_ids, padded_mask(args.prompt, S), wrapper.static_cache(S)))

        def step(token, mask, position, out):
            with torch.no_grad():
                return compiled(**wrapper.step_inputs(token, mask, position), cache=out.cache)

        backends["torch.compile"] = (prefill, step, padded_mask(args.prompt, S))
    runners = exported_runners

    def ort_prefill():
        return runners["prefill"](**wrapper.prefill_inputs(prompt_ids, padded_mask(args.prompt, S), wrapper.static_cache(S)))

    def ort_step(token, mask, position, out):
        return runners["decode"](**wrapper.step_inputs(token, mask, position), cache=out.cache)

    backends["ONNX Runtime"] = (ort_prefill, ort_step, padded_mask(args.prompt, S))
    return prompt_ids, backends


def file_sizes(directory) -> dict:
    sizes = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(("prefill.onnx", "decode.onnx")):
            sizes[name] = os.path.getsize(os.path.join(directory, name))
    return sizes


def cache_bytes(cache) -> int:
    """Bytes of every storage the cache's layers hold (a broadcast view counts its storage once)."""
    return storage_bytes(t for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t))


def equality(args):
    """Greedy decode on ONNX Runtime vs eager generate() at the preset's shape: routing off and MoD + MoR."""
    from hydra_hf.export_hydra import eager_greedy_decode, greedy_decode

    print(f"\n## ONNX Runtime greedy decode vs eager generate(), {args.preset} (vocab {args.vocab}), 32 tokens\n")
    print("| routing | batch | tokens equal | distinct new tokens | max abs logit diff | routed fraction |")
    print("|---|---|---|---|---|---|")
    results = []
    for routing, extra in (("off", {}), ("MoD + MoR", dict(mod_enabled=True, mor_enabled=True))):
        if routing != "off" and HydraConfig.from_preset(args.preset).mor_recursions < 2:
            extra["mor_recursions"] = 2
        torch.manual_seed(0)
        config = HydraConfig.from_preset(args.preset, vocab_size=args.vocab, kernel_backend="torch",
                                         initializer_range=args.equality_std, **extra)
        model = HydraForCausalLM(config).eval()
        exported = export_for_decoding(model, "onnx", max_cache_len=64, batch_size=2, prompt_length=16,
                                       dynamic_batch=True)
        for batch in (1, 2):
            generator = torch.Generator().manual_seed(batch)
            ids = torch.randint(1, args.vocab, (batch, 16), generator=generator)
            mask = torch.ones_like(ids)
            if batch == 2:
                ids[1, :5], mask[1, :5] = 0, 0
            got, logits = greedy_decode(exported, ids, mask, max_new_tokens=32, return_logits=True)
            want = eager_greedy_decode(model, ids, mask, max_new_tokens=32)
            with torch.no_grad():
                cache = HydraStaticCache(config, max_cache_len=64)
                full = torch.cat([mask, torch.ones(batch, 32, dtype=mask.dtype)], 1)
                eager = model(want[:, :-1], attention_mask=full[:, :-1], cache=cache).logits[:, 15:]
                record = model(ids, attention_mask=mask).routing
            fractions = [round(float(f), 2) for f in record.mod_selected_fraction.values()]
            row = dict(routing=routing, batch=batch, equal=bool(torch.equal(got, want)),
                       distinct=len(set(got[:, 16:].flatten().tolist())), max_diff=float((logits - eager).abs().max()),
                       mod_fractions=fractions)
            results.append(row)
            print(f"| {routing} | {batch} | {row['equal']} | {row['distinct']} | {row['max_diff']:.1e} | "
                  f"{fractions or '-'} |", flush=True)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug", help="HYDRA preset (the Llama copies its shape)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (the prefill graph's length)")
    parser.add_argument("--new_tokens", type=int, default=64, help="greedy decode steps timed per backend")
    parser.add_argument("--max_cache_len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--no_compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--equality", action="store_true", help="first the ONNX Runtime vs eager equality table")
    parser.add_argument("--equality_std", type=float, default=0.1, help="weight std of the equality models")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    assert args.prompt + args.new_tokens <= args.max_cache_len and args.new_tokens % args.rounds == 0
    torch.set_num_threads(args.threads)
    report = {"args": vars(args), "models": {}}
    if args.equality:
        report["equality"] = equality(args)
    if args.new_tokens == 0:
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        return
    import onnxruntime as ort
    from transformers.exporters.base import ExportedModel

    hydra_config = HydraConfig.from_preset(args.preset, vocab_size=args.vocab, kernel_backend="torch")
    wrappers = [Hydra(hydra_config), Llama(hydra_config)]
    loops, compile_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in wrappers:
            t0 = time.perf_counter()
            exported = w.export(args.max_cache_len, args.prompt)
            export_s = time.perf_counter() - t0
            folder = os.path.join(tmp, w.name)
            exported.save_pretrained(folder)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            loaded = ExportedModel.from_pretrained(folder, session_options=options)
            prompt_ids, backends = make_backends(w, args, loaded.runners)
            sizes = file_sizes(folder)
            params = sum(p.numel() for p in w.model.parameters())
            report["models"][w.name] = {"export_s": export_s, "files": sizes, "parameters": params}
            for backend, (prefill, step, mask) in backends.items():
                loop = decode_loop(prefill, step, prompt_ids, mask, args.new_tokens + 2)
                if backend == "torch.compile":  # the first steps compile: timed apart, not in tok/s
                    t0 = time.perf_counter()
                    next(loop)
                    next(loop)
                    compile_s[w.name] = time.perf_counter() - t0
                else:
                    next(loop)
                    next(loop)  # 2 warm-up steps, as for the compiled one
                loops[(w.name, backend)] = loop
        # timed rounds, interleaved over every (model, backend)
        per_round = args.new_tokens // args.rounds
        seconds = {key: [] for key in loops}
        tokens = {}
        for _ in range(args.rounds):
            for key, loop in loops.items():
                t0 = time.perf_counter()
                for _ in range(per_round):
                    tokens[key] = next(loop)
                seconds[key].append(time.perf_counter() - t0)
    load = os.getloadavg()[0]
    rows = []
    for (name, backend), secs in seconds.items():
        best = per_round / min(secs)
        median = per_round / statistics.median(secs)
        rows.append((name, backend, best, median))
        report["models"][name].setdefault("decode_tok_s", {})[backend] = {"best": best, "median": median,
                                                                          "round_s": secs}
    for w in wrappers:
        entry = report["models"][w.name]
        entry["ort_equals_eager"] = tokens[(w.name, "ONNX Runtime")] == tokens[(w.name, "eager")]
        if (w.name, "torch.compile") in tokens:
            entry["compile_equals_eager"] = tokens[(w.name, "torch.compile")] == tokens[(w.name, "eager")]
            entry["compile_s"] = compile_s[w.name]
        cache = w.static_cache(args.max_cache_len)
        with torch.no_grad():
            w.model(**w.prefill_inputs(torch.zeros(1, args.prompt, dtype=torch.long),
                                       padded_mask(args.prompt, args.max_cache_len), cache))
        entry["static_cache_bytes"] = cache_bytes(cache)
    print(f"\n## decode tokens/s, batch 1, {args.prompt}-token prompt, {args.new_tokens} steps, "
          f"{args.threads} threads, load average {load:.1f}\n")
    backends = list(dict.fromkeys(b for _, b, _, _ in rows))
    print("| model | " + " | ".join(f"{b} tok/s (best / median)" for b in backends) + " |")
    print("|---|" + "---|" * len(backends))
    for w in wrappers:
        cells = [f"{b:.1f} / {m:.1f}" for n, _, b, m in rows if n == w.name]
        print(f"| {w.name} | " + " | ".join(cells) + " |")
    print("\n| model | parameters | ONNX files (prefill + decode, graph + weights) | static cache | "
          "ORT tokens = eager | compile tokens = eager | export s | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for w in wrappers:
        e = report["models"][w.name]
        total = sum(e["files"].values())
        print(f"| {w.name} | {e['parameters'] / 1e6:.1f} M | {total / 2**20:.1f} MiB | "
              f"{e['static_cache_bytes'] / 2**10:.0f} KiB | {e['ort_equals_eager']} | "
              f"{e.get('compile_equals_eager', '-')} | {e['export_s']:.0f} | {e.get('compile_s', 0):.0f} |")
    print("\nfiles:", json.dumps({n: e["files"] for n, e in report["models"].items()}))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
