"""transformers conventions: the value-shift / KV-head rule, the import layout of the config, the dispatcher and the
kernel modules, and Liger's public functional API."""

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_hf import HydraConfig, HydraForCausalLM, PRESET_NAMES, ops_hydra


ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hydra_hf"


def small_config(**overrides) -> HydraConfig:
    kwargs = dict(vocab_size=61, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                  compression_factor=2, num_unique_blocks=1, mor_recursions=2, max_position_embeddings=32,
                  kernel_backend="torch")
    kwargs.update(overrides)
    return HydraConfig(**kwargs)


# ---------------------------------------------------------------------------------------------- value shift
def test_value_shift_needs_two_kv_heads():
    with pytest.raises(ValueError, match=r"use_value_shift=True needs num_key_value_heads >= 2.*use_value_shift=False"):
        HydraConfig(num_attention_heads=4, num_key_value_heads=1)
    config = HydraConfig(num_attention_heads=4, num_key_value_heads=1, use_value_shift=False)
    assert config.num_value_shift_heads == 0
    assert HydraConfig(num_attention_heads=4, num_key_value_heads=2).num_value_shift_heads == 1
    config.use_value_shift = True  # changed after construction: validate() and the model name both fields
    with pytest.raises(ValueError, match=r"use_value_shift.*num_key_value_heads"):
        HydraForCausalLM(config)
    for name in PRESET_NAMES:  # every preset validates
        HydraConfig.from_preset(name).validate()


def test_a_one_kv_head_model_with_value_shift_off_computes_what_it_did_before(tmp_path):
    """Before the rule, use_value_shift=True with one KV head shifted nothing: num_value_shift_heads was 0, exactly
    what use_value_shift=False gives. A saved config of that kind now fails to load, naming the fields."""
    torch.manual_seed(0)
    model = HydraForCausalLM(small_config(num_key_value_heads=1, use_value_shift=False)).eval()
    assert model.model.layers[0].self_attn.num_shift_heads == 0
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_value_shift": True}))
    with pytest.raises(ValueError, match=r"use_value_shift.*num_key_value_heads"):
        HydraForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------- import layout
def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(absolute module name, line, at module level) of every import statement in a hydra_hf file."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    if path.name == "__init__.py":
        module = package
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            names = [base] + [f"{base}.{a.name}" for a in node.names
                              if (ROOT / Path(*f"{base}.{a.name}".split("."))).with_suffix(".py").exists()]
        for name in names:
            out.append((name, node.lineno, id(node) in top))
    return out


def _hydra_modules() -> dict[str, Path]:
    files = [PACKAGE / "configuration_hydra.py", PACKAGE / "ops_hydra.py", PACKAGE / "ops_reference_hydra.py",
             *sorted((PACKAGE / "ops").glob("*.py"))]
    out = {}
    for f in files:
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = f
    return out


def test_the_config_imports_no_ops_module():
    imported = {name for name, _, _ in _imports(PACKAGE / "configuration_hydra.py")}
    assert not {n for n in imported if n.startswith("hydra_hf")}, imported
    # and at run time: configuration_hydra.py loaded on its own (as remote code loads it) pulls in no HYDRA module
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('standalone_configuration_hydra', {str(PACKAGE / 'configuration_hydra.py')!r})\n"
        "mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "assert mod.KERNEL_BACKENDS == ('auto', 'triton', 'liger', 'torch')\n"
        "bad = [m for m in sys.modules if 'hydra_hf' in m or 'ops_hydra' in m or 'ops_reference' in m]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_no_import_cycle_between_the_dispatcher_and_the_kernel_modules():
    modules = _hydra_modules()
    graph = {name: sorted({n for n, _, _ in _imports(path) if n in modules and n != name})
             for name, path in modules.items()}
    # no kernel module imports the dispatcher, directly or through another kernel module
    kernels = [n for n in modules if n.startswith("hydra_hf.ops.") and n != "hydra_hf.ops.aot_compile"]
    for start in kernels:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        assert "hydra_hf.ops_hydra" not in seen and "hydra_hf.ops" not in seen, (start, sorted(seen))
    # the dispatcher imports the kernel modules only inside functions, with import statements (no importlib)
    source = (PACKAGE / "ops_hydra.py").read_text()
    assert "importlib" not in source
    dispatcher = _imports(PACKAGE / "ops_hydra.py")
    assert {n for n, _, top in dispatcher if top and n.startswith("hydra_hf")} == {
        "hydra_hf.configuration_hydra", "hydra_hf.ops_reference_hydra"}
    assert {n for n, _, top in dispatcher if not top} >= {f"hydra_hf.ops.{k}" for k in (
        "causal_conv_triton", "qk_norm_rope_triton", "rms_norm_triton", "routing_gather_triton",
        "moe_permute_triton", "cross_entropy_liger", "_triton_utils")}
    # and the whole graph (module- and function-level imports) has no cycle
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_kernel_modules_import_without_the_dispatcher():
    """At run time too: with hydra_hf's and hydra_hf.ops' __init__ skipped and ops_hydra blocked, every kernel module
    imports (the dispatcher is above them, never below)."""
    code = (
        "import sys, types, importlib\n"
        f"root = {str(PACKAGE)!r}\n"
        "for name, path in (('hydra_hf', root), ('hydra_hf.ops', root + '/ops')):\n"
        "    pkg = types.ModuleType(name); pkg.__path__ = [path]; sys.modules[name] = pkg\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hydra_hf.ops_hydra':\n"
        "            raise ImportError('the dispatcher is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "for m in ('_triton_utils', 'causal_conv_triton', 'qk_norm_rope_triton', 'rms_norm_triton',\n"
        "          'routing_gather_triton', 'moe_permute_triton', 'cross_entropy_liger'):\n"
        "    importlib.import_module('hydra_hf.ops.' + m)\n"
        "assert 'hydra_hf.ops_hydra' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- Liger
def test_liger_is_reached_through_its_public_functional_api_only():
    for path in [PACKAGE / "ops_hydra.py", *(PACKAGE / "ops").glob("*.py")]:
        text = path.read_text()
        assert "liger_kernel.ops" not in text, path
        assert not any("Liger" in line and ".apply(" in line for line in text.splitlines()), path


def test_liger_calls_bind_to_the_installed_signatures_by_keyword(monkeypatch):
    """The dispatcher's Liger calls, recorded on CPU (Liger itself needs CUDA): keyword arguments only, and they
    bind to the installed liger-kernel's functional signatures."""
    functional = pytest.importorskip("liger_kernel.transformers.functional")
    from hydra_hf.ops import reference as R

    calls = {}

    def recorder(name, result):
        real = getattr(functional, name)

        def fake(*args, **kwargs):
            assert not args, f"{name} called with positional arguments"
            inspect.signature(real).bind(**kwargs)
            calls[name] = kwargs
            return result(**kwargs)
        return fake

    fake_liger = type("FakeLiger", (), {
        "liger_rms_norm": staticmethod(recorder("liger_rms_norm", lambda X, W, eps, **_: R.rms_norm_ref(X, W, eps))),
        "liger_swiglu": staticmethod(recorder("liger_swiglu", lambda a, b: R.swiglu_ref(a, b))),
    })
    monkeypatch.setattr(ops_hydra, "_liger", lambda backend, *tensors: fake_liger)
    monkeypatch.setattr(functional, "liger_fused_linear_cross_entropy", recorder(
        "liger_fused_linear_cross_entropy",
        lambda input, weight, target, ignore_index, reduction, **_: R.linear_cross_entropy_ref(
            input, weight, target, ignore_index, reduction)))
    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    torch.testing.assert_close(ops_hydra.rms_norm(x, w, 1e-6, backend="liger"), R.rms_norm_ref(x, w, 1e-6))
    assert calls["liger_rms_norm"]["in_place"] is False
    g, u = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ops_hydra.swiglu(g, u, backend="liger"), R.swiglu_ref(g, u))
    hidden, weight, labels = torch.randn(5, 8), torch.randn(11, 8), torch.tensor([1, 2, -100, 4, 10])
    loss = ops_hydra.fused_linear_cross_entropy(hidden, weight, labels, backend="liger", reduction="sum")
    torch.testing.assert_close(loss, R.linear_cross_entropy_ref(hidden, weight, labels, -100, "sum"))
    assert calls["liger_fused_linear_cross_entropy"]["reduction"] == "sum"
    assert set(calls) == {"liger_rms_norm", "liger_swiglu", "liger_fused_linear_cross_entropy"}


def test_the_lazy_kernel_imports_compile_without_a_graph_break(monkeypatch):
    """The dispatcher's lazy imports run inside compiled forwards (a non-torch backend asks whether a kernel may
    run): torch.compile traces them with fullgraph=True (importlib.import_module, used before, is a hard break)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU without the interpreter: the reference runs
    from hydra_hf.ops import reference as R

    x, w = torch.randn(3, 8), torch.rand(8) + 0.5
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda a, b: ops_hydra.rms_norm(a, b, 1e-6, backend="triton"), fullgraph=True)
        torch.testing.assert_close(compiled(x, w), R.rms_norm_ref(x, w, 1e-6))
    finally:
        torch._dynamo.reset()
