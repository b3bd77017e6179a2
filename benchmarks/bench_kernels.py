"""Forward + backward micro-benchmarks of the HYDRA kernels.

For every op, at the shapes of the 100M and 1B presets, prints the forward+backward time and the
achieved bandwidth of: our Triton kernels, the PyTorch reference in eager mode, the reference
under ``torch.compile``, and Liger where Liger has the op (RMSNorm, SwiGLU, fused linear CE).

    python benchmarks/bench_kernels.py                    # both presets, every op, bf16
    python benchmarks/bench_kernels.py --preset 1b --ops causal_conv qk_norm_rope
    python benchmarks/bench_kernels.py --cpu-sanity       # no GPU: tiny interpreter check
    python benchmarks/bench_kernels.py --model            # per-kernel model at the 1B shapes (works without a GPU)

Times come from ``triton.testing.do_bench`` (median, ms). "GB/s" divides a *model* of the bytes
that must move by that time: forward = every input + every output once, backward = every
output gradient + every input + every input gradient once (integer index tensors counted where
they are read). Fused kernels move close to that model; unfused ones move more and show lower
GB/s. Without CUDA the script prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PRESETS = {
    # hidden E, latent width = Hq * h, query / KV heads, head dim, seq, batch
    "100m": dict(hidden=768, latent=192, hq=6, hk=2, head_dim=32, seq=1024, batch=8),
    "1b": dict(hidden=1792, latent=448, hq=8, hk=2, head_dim=56, seq=2048, batch=4),
}
OPS = ("causal_conv", "qk_norm_rope", "gather_tokens", "scatter_gated_add", "moe_permute", "moe_unpermute",
       "rms_norm", "swiglu", "fused_linear_cross_entropy")


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


class Case:
    """One op at one preset: inputs, the differentiable ones, and the implementations to time."""

    def __init__(self, name, inputs, grad_inputs, impls, float_outputs=None):
        self.name = name
        self.inputs = inputs  # positional args
        self.grad_inputs = grad_inputs  # the args that require grad
        self.impls = impls  # label -> callable(*inputs)
        self.float_outputs = float_outputs  # which outputs carry gradients (default: all float ones)

    def step(self, fn):
        """A closure running forward + backward once."""

        def run():
            outs = _as_tuple(fn(*self.inputs))
            if self.float_outputs is not None:
                outs = tuple(outs[i] for i in self.float_outputs)
            outs = tuple(o for o in outs if o.is_floating_point() and o.requires_grad)
            grads = tuple(torch.ones_like(o) if o.dim() == 0 else self._grad_cache(o) for o in outs)
            torch.autograd.grad(outs, self.grad_inputs, grads)

        return run

    _cache: dict = {}

    def _grad_cache(self, o):
        key = (self.name, tuple(o.shape), o.dtype)
        if key not in self._cache:
            self._cache[key] = torch.randn_like(o)
        return self._cache[key]

    def model_bytes(self, fn) -> int:
        with torch.no_grad():
            outs = _as_tuple(fn(*[t.detach() if isinstance(t, torch.Tensor) else t for t in self.inputs]))
        fwd = _nbytes(self.inputs) + _nbytes(outs)
        float_outs = [o for o in outs if o.is_floating_point()]
        if self.float_outputs is not None:
            float_outs = [outs[i] for i in self.float_outputs]
        bwd = _nbytes(float_outs) + _nbytes(self.inputs) + _nbytes(self.grad_inputs)
        return fwd + bwd


def build_cases(preset: dict, dtype: torch.dtype, ops_wanted, vocab: int, compile_ref: bool, device: str = "cuda"):
    from hydra_hf import ops
    from hydra_hf.ops import reference as R
    from hydra_hf.ops.reference import linear_cross_entropy_ref
    from hydra_hf.ops.rms_norm_triton import rms_norm_triton

    dev = device
    B, T, E = preset["batch"], preset["seq"], preset["hidden"]
    Hq, Hk, h, L = preset["hq"], preset["hk"], preset["head_dim"], preset["latent"]
    g = torch.Generator(device=dev).manual_seed(0)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt).requires_grad_()

    def compiled(fn):
        return torch.compile(fn, dynamic=False) if compile_ref else None

    def impls(triton_fn, ref_fn, liger_fn=None):
        out = {"triton": triton_fn, "torch": ref_fn}
        c = compiled(ref_fn)
        if c is not None:
            out["torch.compile"] = c
        if liger_fn is not None:
            out["liger"] = liger_fn
        return out

    cases = []
    if "causal_conv" in ops_wanted:
        for label, C, H in (("q", L, Hq), ("k", Hk * h, Hk)):
            x, ws, wc = leaf(B, T, C), leaf(C, 4, scale=0.5), leaf(C, C // H, 2, scale=0.2)
            cases.append(Case(f"causal_conv[{label}: C={C} H={H} Ks=4 Kc=2]", (x, ws, wc, H), (x, ws, wc), impls(
                lambda *a: ops.causal_conv(*a, backend="triton"), R.causal_conv_ref)))
    if "qk_norm_rope" in ops_wanted:
        q, k, qm, km = leaf(B, T, Hq, h), leaf(B, T, Hk, h), leaf(B, T, Hq, h), leaf(B, T, Hk, h)
        temp = leaf(Hk, dt=torch.float32)
        r = h // 2 if (h // 2) % 2 == 0 else h // 2 + 1
        ang = torch.randn(1, T, r // 2, device=dev, generator=g)
        cos, sin = torch.cat([ang.cos()] * 2, -1).expand(B, T, r), torch.cat([ang.sin()] * 2, -1).expand(B, T, r)
        cases.append(Case(f"qk_norm_rope[Hq={Hq} Hk={Hk} h={h} r={r}]", (q, k, qm, km, temp, cos, sin),
                          (q, k, qm, km, temp), impls(
                              lambda *a: ops.qk_norm_rope(*a, backend="triton"), R.qk_norm_rope_ref)))
    K = T // 2
    idx = torch.stack([torch.randperm(T, device=dev, generator=g)[:K] for _ in range(B)])  # (B, K)
    if "gather_tokens" in ops_wanted:
        x = leaf(B, T, E)
        cases.append(Case(f"gather_tokens[K={K}]", (x, idx), (x,), impls(
            lambda *a: ops.gather_tokens(*a, backend="triton"), R.gather_tokens_ref)))
    if "scatter_gated_add" in ops_wanted:
        res, upd, gate = leaf(B, T, E), leaf(B, K, E), leaf(B, K)
        cases.append(Case(f"scatter_gated_add[K={K}]", (res, upd, idx, gate), (res, upd, gate), impls(
            lambda *a: ops.scatter_gated_add(*a, backend="triton"), R.scatter_gated_add_ref)))
    N, X, topk = B * T, 8, 2
    expert_index = torch.randint(0, X, (N, topk), device=dev, generator=g)
    if "moe_permute" in ops_wanted:
        x = leaf(N, E)
        cases.append(Case(f"moe_permute[N={N} X={X} k={topk}]", (x, expert_index, X), (x,), impls(
            lambda *a: ops.moe_permute(*a, backend="triton"), R.moe_permute_ref), float_outputs=(0,)))
    if "moe_unpermute" in ops_wanted:
        pairs = torch.argsort(expert_index.reshape(-1), stable=True)
        eo, w = leaf(N * topk, E), leaf(N, topk)
        cases.append(Case(f"moe_unpermute[N={N} k={topk}]", (eo, pairs, w), (eo, w), impls(
            lambda *a: ops.moe_unpermute(*a, backend="triton"), R.moe_unpermute_ref)))
    if "rms_norm" in ops_wanted:
        x, w = leaf(B, T, E), leaf(E)
        cases.append(Case(f"rms_norm[E={E}]", (x, w, 1e-6), (x, w), impls(
            rms_norm_triton, R.rms_norm_ref, lambda *a: ops.rms_norm(*a, backend="liger"))))
    if "swiglu" in ops_wanted:
        inter = (8 * E // 3 + 63) // 64 * 64
        a, b = leaf(B, T, inter), leaf(B, T, inter)
        cases.append(Case(f"swiglu[I={inter}]", (a, b), (a, b), {
            "torch": R.swiglu_ref, **({"torch.compile": compiled(R.swiglu_ref)} if compile_ref else {}),
            "liger": lambda *x: ops.swiglu(*x, backend="liger")}))
    if "fused_linear_cross_entropy" in ops_wanted:
        hid, W = leaf(N, E), leaf(vocab, E, scale=0.02)
        labels = torch.randint(0, vocab, (N,), device=dev, generator=g)
        cases.append(Case(f"fused_linear_cross_entropy[N={N} V={vocab}]", (hid, W, labels), (hid, W), {
            "torch": linear_cross_entropy_ref,
            **({"torch.compile": compiled(linear_cross_entropy_ref)} if compile_ref else {}),
            "liger": lambda *x: ops.fused_linear_cross_entropy(*x, backend="liger")}))
    return cases


def run_gpu(args) -> None:
    import triton.testing

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"device: {torch.cuda.get_device_name()}  dtype: {args.dtype}  torch {torch.__version__}")
    header = f"{'op':58s} {'impl':14s} {'fwd+bwd ms':>11s} {'GB/s':>8s}"
    for preset_name in args.preset:
        preset = PRESETS[preset_name]
        print(f"\n== preset {preset_name}: {preset}")
        print(header)
        for case in build_cases(preset, dtype, args.ops, args.vocab, not args.no_compile):
            model_bytes = None
            for label, fn in case.impls.items():
                try:
                    if model_bytes is None:
                        model_bytes = case.model_bytes(fn)
                    ms = triton.testing.do_bench(case.step(fn), warmup=args.warmup, rep=args.rep)
                    gbs = model_bytes / (ms * 1e-3) / 1e9
                    print(f"{case.name:58s} {label:14s} {ms:11.4f} {gbs:8.1f}")
                except Exception as e:  # report and keep going (e.g. a compile failure)
                    print(f"{case.name:58s} {label:14s} {'failed':>11s}  {type(e).__name__}: {str(e)[:80]}")
            torch.cuda.empty_cache()


TINY = dict(hidden=48, latent=24, hq=3, hk=1, head_dim=8, seq=17, batch=2)


def run_cpu_sanity() -> None:
    """Every benchmark case at tiny shapes through the Triton interpreter: forward outputs of each
    implementation vs the eager reference, and one forward+backward step each (no timing)."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()

    for case in build_cases(TINY, torch.float32, OPS, vocab=50, compile_ref=False, device="cpu"):
        with torch.no_grad():
            ref = _as_tuple(case.impls["torch"](*case.inputs))
        for label, fn in case.impls.items():
            with torch.no_grad():
                out = _as_tuple(fn(*case.inputs))
            err = max(rel(a, b) for a, b in zip(out, ref) if a.is_floating_point())
            case.step(fn)()
            print(f"  {case.name:48s} {label:8s} fwd rel err {err:.1e}  fwd+bwd ran  model bytes {case.model_bytes(fn)}")
    print("  (on CPU the 'liger' entries run the reference: Liger kernels need CUDA)")


# ---------------------------------------------------------------- --model: bytes / FLOPs / resources per kernel
H100_BW = 3.35e12  # B/s, HBM3
H100_FLOPS = 989e12  # bf16 dense tensor-core FLOP/s
H100_SMS = 132
ROW_KERNELS = ("routing_gather_triton", "moe_permute_triton")  # one program per row: only the rows it is given are touched


def _tensor_bytes(t, rows=None) -> int:
    if rows is not None and t.dim() >= 2:
        per_row = t.numel() // max(1, t.numel() // t.shape[-1])
        return min(t.numel() // t.shape[-1], rows) * per_row * t.element_size()
    return t.numel() * t.element_size()


def launch_bytes(launch) -> int:
    """Bytes a kernel launch moves if every tensor it is given is read or written once (the model).

    Row kernels (gather / scatter / permute) touch one row per program of their larger tensors."""
    module = launch.kernel.fn.__module__.rsplit(".", 1)[-1]
    programs = math.prod(launch.grid)
    rows = programs if module in ROW_KERNELS else None
    seen, total = set(), 0
    for a in launch.args:
        if isinstance(a, torch.Tensor) and id(a) not in seen:
            seen.add(id(a))
            total += _tensor_bytes(a, rows)
    return total


def launch_flops(launch) -> int:
    """Useful FLOPs: the conv kernels' dots and depthwise taps; ~a few per element for the rest."""
    name, m = launch.kernel.__name__, launch.meta
    x = launch.args[0]
    if name.startswith("_causal_conv"):
        B, T, C = x.shape
        h, ks, kc = C // (launch.grid[2] // m["N_DB"]), m["KS"], m["KC"]  # grid axis 2 = heads * N_DB
        mid = 2 * B * T * C * ks * kc  # depthwise taps, recomputed per channel-conv tap
        if name.endswith("fwd_kernel"):
            return 2 * B * T * C * h * kc + mid * m["N_DB"]
        if "dx" in name:
            return 2 * B * T * C * h * kc * ks + 6 * B * T * C * ks
        return 2 * B * T * C * h * kc + mid * m["N_DB"]
    per_elem = {"_rms_norm_fwd_kernel": 4, "_rms_norm_bwd_kernel": 8, "_qk_norm_rope_fwd_kernel": 10,
                "_qk_norm_rope_bwd_kernel": 16, "_scatter_fwd_kernel": 2, "_scatter_bwd_kernel": 3,
                "_unpermute_fwd_kernel": 2, "_unpermute_bwd_kernel": 3, "_permute_bwd_kernel": 1}
    return per_elem.get(name, 0) * max(a.numel() for a in launch.args if isinstance(a, torch.Tensor))


class _AtenBytes:
    """Bytes moved by eager PyTorch ops (a TorchDispatchMode over meta tensors): inputs + outputs of every
    op that computes (views and allocations are free; ``zeros``/``fill`` count their output; index ops
    count the rows they touch, i.e. their output size, for their source)."""

    FREE = ("view", "_unsafe_view", "expand", "permute", "transpose", "t", "slice", "select", "unsqueeze", "squeeze",
            "as_strided", "alias", "detach", "empty", "empty_like", "new_empty", "empty_strided", "split",
            "unbind", "reshape", "_reshape_alias", "lift_fresh", "clone_if_view", "split_with_sizes")
    INDEX = ("gather", "index", "index_select", "index_add", "index_put", "scatter", "scatter_add", "embedding")

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        owner = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                owner._count(func, args, out)
                return out

        self.mode = Mode()
        self.total = 0

    def _count(self, func, args, out):
        name = func.__name__.split(".")[0].rstrip("_")
        if name in self.FREE:
            return
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        out_bytes = sum(o.numel() * o.element_size() for o in outs)
        ins = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        if name in self.INDEX:
            in_bytes = sum(min(a.numel() * a.element_size(), out_bytes) for a in ins)
        elif name in ("zeros", "zeros_like", "fill", "zero", "ones", "full", "new_zeros", "new_full", "ones_like"):
            in_bytes = 0
        else:
            in_bytes = sum(a.numel() * a.element_size() for a in ins)
        self.total += in_bytes + out_bytes


def model_ops(B: int, T: int, dtype):
    """(op label, triton closure, reference closure, leaves) at the 1B preset's shapes, on meta tensors."""
    from hydra_hf import HydraConfig
    from hydra_hf.ops import reference as R

    cfg = HydraConfig.from_preset("1B")
    E, Hq, Hk, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.latent_head_dim
    Ks, Kc, r = cfg.qk_conv_kernel_size, cfg.qk_channel_conv_kernel_size, cfg.rotary_dim
    cc, qk = importlib.import_module("hydra_hf.ops.causal_conv_triton"), importlib.import_module("hydra_hf.ops.qk_norm_rope_triton")
    rn, rg = importlib.import_module("hydra_hf.ops.rms_norm_triton"), importlib.import_module("hydra_hf.ops.routing_gather_triton")
    mp = importlib.import_module("hydra_hf.ops.moe_permute_triton")

    def leaf(*shape, dt=dtype):
        return torch.empty(*shape, device="meta", dtype=dt).requires_grad_()

    ops = []
    x, w = leaf(B, T, E), leaf(E)
    ops.append((f"rms_norm [N={B * T}, E={E}]", lambda: rn.rms_norm_triton(x, w, 1e-6), lambda: R.rms_norm_ref(x, w, 1e-6), (x, w)))
    for label, H in (("q", Hq), ("k", Hk)):
        C = H * h
        xc, ws, wc = leaf(B, T, C), leaf(C, Ks), leaf(C, h, Kc)
        ops.append((f"causal_conv {label} [C={C}, h={h}, Ks={Ks}, Kc={Kc}]",
                    lambda xc=xc, ws=ws, wc=wc, H=H: cc.causal_conv_triton(xc, ws, wc, H),
                    lambda xc=xc, ws=ws, wc=wc, H=H: R.causal_conv_ref(xc, ws, wc, H), (xc, ws, wc)))
    q, k, qm, km = leaf(B, T, Hq, h), leaf(B, T, Hk, h), leaf(B, T, Hq, h), leaf(B, T, Hk, h)
    temp, cos, sin = leaf(Hk, dt=torch.float32), torch.empty(1, T, r, device="meta", dtype=dtype), torch.empty(1, T, r, device="meta", dtype=dtype)
    ops.append((f"qk_norm_rope [Hq={Hq}, Hk={Hk}, h={h}, r={r}]",
                lambda: qk.qk_norm_rope_triton(q, k, qm, km, temp, cos, sin),
                lambda: R.qk_norm_rope_ref(q, k, qm, km, temp, cos, sin), (q, k, qm, km, temp)))
    K = math.ceil(0.75 * T)
    idx = torch.empty(B, K, device="meta", dtype=torch.int64)
    xg, res, upd, gate = leaf(B, T, E), leaf(B, T, E), leaf(B, K, E), leaf(B, K)
    ops.append((f"gather_tokens [K={K}]", lambda: rg.gather_tokens_triton(xg, idx), lambda: R.gather_tokens_ref(xg, idx), (xg,)))
    ops.append((f"scatter_gated_add [K={K}]", lambda: rg.scatter_gated_add_triton(res, upd, idx, gate),
                lambda: R.scatter_gated_add_ref(res, upd, idx, gate), (res, upd, gate)))
    N, topk = B * T, 2
    xt, eo, wts = leaf(N, E), leaf(N * topk, E), leaf(N, topk)
    pairs = torch.empty(N * topk, device="meta", dtype=torch.int64)
    # the row movement only (argsort / bincount of the routing bookkeeping are the same in both and have
    # no meta-tensor implementation): the reference's x[sorted_pairs // k]
    ops.append((f"moe_permute [N={N}, k={topk}]", lambda: mp.MoEPermuteFunction.apply(xt, pairs, topk),
                lambda: xt[pairs // topk], (xt,)))
    ops.append((f"moe_unpermute [N={N}, k={topk}]", lambda: mp.moe_unpermute_triton(eo, pairs, wts),
                lambda: R.moe_unpermute_ref(eo, pairs, wts), (eo, wts)))
    return ops


def _fwd_bwd_meta(fn, leaves):
    outs = fn()
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
    torch.autograd.grad(outs, leaves, [torch.empty_like(o) for o in outs], allow_unused=True)


def run_model(args) -> None:
    """Per kernel at the 1B preset shapes: bytes, FLOPs, H100 bound, compiled resources, occupancy."""
    from hydra_hf.ops import _triton_utils, aot_compile

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    B, T = args.batch, args.seq
    _triton_utils._sm_count_override = H100_SMS  # grids as an H100 launch would size them
    print(f"# Kernel model: 1B preset, batch x seq = {B} x {T}, {args.dtype}, target sm_90 "
          f"(H100 bound: bytes / {H100_BW / 1e12:.2f} TB/s, FLOPs / {H100_FLOPS / 1e12:.0f} TFLOP/s)\n")
    measured = torch.cuda.is_available()
    print("| op / kernel | bytes moved | ref bytes | FLOPs | H100 bound | regs | spill B | smem B | occupancy | measured |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for label, tri, ref, leaves in model_ops(B, T, dtype):
        ref_count = _AtenBytes()
        with ref_count.mode:
            _fwd_bwd_meta(ref, leaves)
        tri_count = _AtenBytes()
        with _triton_utils.record_launches() as launches, tri_count.mode:
            _fwd_bwd_meta(tri, leaves)
        total = tri_count.total + sum(launch_bytes(l) for l in launches)
        flops = sum(launch_flops(l) for l in launches)
        bound = max(total / H100_BW, flops / H100_FLOPS) * 1e6
        note = "not measured (no GPU)" if not measured else "see the timing table"
        print(f"| **{label}** (fwd+bwd, incl. torch glue {tri_count.total / 1e6:.1f} MB) | {total / 1e6:.1f} MB | "
              f"{ref_count.total / 1e6:.1f} MB | {flops / 1e9:.2f} G | {bound:.1f} us | | | | | {note} |")
        for l in launches:
            spec = aot_compile.Spec("model", l.kernel.__name__, "", l, [label])
            res = aot_compile.compile_launch(spec, "sm_90")
            b, f = launch_bytes(l), launch_flops(l)
            kb = max(b / H100_BW, f / H100_FLOPS) * 1e6
            print(f"| {l.kernel.__name__} grid={l.grid} warps={res.num_warps} | {b / 1e6:.1f} MB | | {f / 1e9:.2f} G | "
                  f"{kb:.1f} us | {res.registers} | {res.spill_bytes} | {res.shared} | {res.occupancy:.2f} | "
                  f"{'not measured (no GPU)' if not measured else ''} |" + ("" if res.ok else f" COMPILE ERROR {res.error}"))
    if measured:
        print("\nMeasured times: run without --model (forward+backward per op, triton vs torch vs torch.compile vs Liger).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=["100m", "1b"])
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size for the fused linear CE case")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetitions (ms)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) column")
    p.add_argument("--cpu-sanity", action="store_true", help="without CUDA: run a tiny interpreter correctness check")
    p.add_argument("--model", action="store_true",
                   help="bytes / FLOPs / H100 bound / compiled registers, spills, shared memory per kernel (no GPU needed)")
    p.add_argument("--batch", type=int, default=16, help="--model: batch size")
    p.add_argument("--seq", type=int, default=2048, help="--model: sequence length")
    args = p.parse_args(argv)
    if args.model:
        run_model(args)
        if torch.cuda.is_available():
            run_gpu(args)
        return 0
    if not torch.cuda.is_available():
        print("No CUDA GPU available: the kernel benchmark needs one, nothing was timed.")
        print("On a CUDA machine run: python benchmarks/bench_kernels.py")
        if args.cpu_sanity:
            print("CPU sanity check (Triton interpreter, tiny shapes):")
            run_cpu_sanity()
        return 0
    run_gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
