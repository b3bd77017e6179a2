"""transformers conventions: `rope_parameters` (and the old top-level RoPE fields), the value-shift / KV-head rule,
the import layout of the config, the dispatcher and the kernel modules, and Liger's public functional API."""

import ast
import copy
import inspect
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hydra_hf import HydraConfig, HydraForCausalLM, PRESET_NAMES, ops_hydra

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")  # the types HYDRA runs (configuration_hydra.ROPE_TYPES)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hydra_hf"

# the keys each scaling type needs (besides rope_type / rope_theta / partial_rotary_factor)
ROPE_SCALING = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}


def small_config(**overrides) -> HydraConfig:
    kwargs = dict(vocab_size=61, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                  compression_factor=2, num_unique_blocks=1, mor_recursions=2, max_position_embeddings=32,
                  kernel_backend="torch")
    kwargs.update(overrides)
    return HydraConfig(**kwargs)


def old_inv_freq(theta: float, h: int, factor: float) -> torch.Tensor:
    """The frequencies of HYDRA's rotary embedding before rope_parameters (rotary dim rounded down to even, >= 2)."""
    r = max(2, int(h * factor) // 2 * 2)
    return 1.0 / (theta ** (torch.arange(0, r, 2, dtype=torch.float) / r))


# ---------------------------------------------------------------------------------------------- rope_parameters
def test_rope_parameters_is_standardized_and_the_old_names_stay_readable():
    config = HydraConfig()
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert (config.rope_theta, config.partial_rotary_factor) == (10000.0, 0.5)
    # the pre-rope_parameters keywords land in the dict (as transformers does for Llama / Phi)
    config = HydraConfig(rope_theta=5e5, partial_rotary_factor=0.25)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}
    assert (config.rope_theta, config.partial_rotary_factor) == (5e5, 0.25)
    assert config.rotary_dim == max(2, int(config.latent_head_dim * 0.25) // 2 * 2)
    # a scaling dict gets HYDRA's defaults; the caller's dict is not modified
    given = {"rope_type": "linear", "factor": 2.0}
    config = HydraConfig(rope_parameters=given)
    assert given == {"rope_type": "linear", "factor": 2.0}
    assert config.rope_parameters == {**given, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    # the old names are writable aliases of the dict entries
    config.rope_theta, config.partial_rotary_factor = 1234.0, 1.0
    assert config.rope_parameters["rope_theta"] == 1234.0 and config.rope_parameters["partial_rotary_factor"] == 1.0
    assert config.rotary_dim == config.latent_head_dim
    # what is saved is transformers' dict, not the old top-level fields
    saved = config.to_dict()
    assert saved["rope_parameters"]["rope_theta"] == 1234.0
    assert "rope_theta" not in saved and "partial_rotary_factor" not in saved


@pytest.mark.parametrize("rope_type", ROPE_TYPES)
def test_each_rope_type_builds_and_runs(rope_type):
    config = small_config(rope_parameters={"rope_type": rope_type, **ROPE_SCALING[rope_type]})
    model = HydraForCausalLM(config).eval()
    rotary = model.model.rotary_emb
    assert rotary.rope_type == rope_type and rotary.inv_freq.shape == (config.rotary_dim // 2,)
    T = config.max_position_embeddings + 8  # past max_position_embeddings: the dynamic type rescales
    ids = torch.randint(0, config.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(T)[None])
    assert logits.shape == (2, T, config.vocab_size) and logits.isfinite().all()
    assert cos.shape == sin.shape == (1, T, config.rotary_dim)
    # cos / sin carry the type's attention scaling, as transformers applies it (yarn's attention factor)
    torch.testing.assert_close(cos[0, 0], torch.full((config.rotary_dim,), float(rotary.attention_scaling)))
    if rope_type == "yarn":
        assert rotary.attention_scaling > 1.0
    if rope_type == "dynamic":  # the sequence grew past max_position_embeddings: the base was rescaled
        assert not torch.equal(rotary.inv_freq, rotary.original_inv_freq)


def test_rope_frequencies_come_from_transformers_over_the_rotary_dim():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = small_config(hidden_size=120, num_attention_heads=2, compression_factor=4, partial_rotary_factor=0.5,
                          rope_parameters={"rope_type": "yarn", **ROPE_SCALING["yarn"]})
    assert config.latent_head_dim == 15 and config.rotary_dim == 6  # int(15 * 0.5) = 7 -> 6 (even)
    rotary = HydraForCausalLM(config).model.rotary_emb
    view = config.rotary_config()
    assert view.head_dim == 6 and view.rope_parameters["partial_rotary_factor"] == 1.0
    expected, scaling = ROPE_INIT_FUNCTIONS["yarn"](view)
    torch.testing.assert_close(rotary.inv_freq, expected, rtol=0, atol=0)
    assert rotary.attention_scaling == scaling


def test_linear_scaling_factor_2_at_position_2p_equals_default_at_p():
    default = HydraForCausalLM(small_config()).model.rotary_emb
    linear = HydraForCausalLM(small_config(rope_parameters={"rope_type": "linear", "factor": 2.0})).model.rotary_emb
    p = torch.arange(0, 20)[None]
    x = torch.zeros(1)
    for a, b in zip(linear(x, 2 * p), default(x, p)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_config_saved_with_top_level_rope_theta_loads_to_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = HydraForCausalLM(small_config(hidden_size=96, compression_factor=3, rope_theta=777.0,
                                          partial_rotary_factor=0.3)).eval()
    model.save_pretrained(tmp_path)
    # rewrite config.json as it was saved before rope_parameters: top-level rope_theta / partial_rotary_factor
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["rope_parameters"]
    saved.update(rope_theta=777.0, partial_rotary_factor=0.3)
    path.write_text(json.dumps(saved))

    loaded = HydraForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == {"rope_type": "default", "rope_theta": 777.0, "partial_rotary_factor": 0.3}
    assert (loaded.config.rope_theta, loaded.config.partial_rotary_factor) == (777.0, 0.3)
    h = loaded.config.latent_head_dim
    for rotary in (model.model.rotary_emb, loaded.model.rotary_emb):
        torch.testing.assert_close(rotary.inv_freq, old_inv_freq(777.0, h, 0.3), rtol=0, atol=0)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_old_config_dicts_and_overrides_load():
    base = small_config().to_dict()
    del base["rope_parameters"]
    # saved with the defaults left out (no RoPE key at all): the old defaults
    config = HydraConfig.from_dict(base)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    # transformers' legacy `rope_scaling` ("type") next to the old top-level theta
    config = HydraConfig.from_dict({**base, "rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
    assert config.rope_theta == 500.0 and config.partial_rotary_factor == 0.5
    # from_pretrained-style overrides of the old names reach the dict
    config = HydraConfig.from_dict(small_config().to_dict(), rope_theta=42.0, partial_rotary_factor=1.0)
    assert config.rope_parameters["rope_theta"] == 42.0 and config.rotary_dim == config.latent_head_dim


@pytest.mark.parametrize("rope_type", ["bogus", "longrope", "proportional"])
def test_a_rope_type_hydra_does_not_run_names_the_field(rope_type):
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\] must be one of \('default', 'linear'"):
        HydraConfig(rope_parameters={"rope_type": rope_type, "factor": 2.0})
    config = HydraConfig()
    config.rope_parameters = {**config.rope_parameters, "rope_type": rope_type}
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]"):
        config.check_hydra_fields()
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]"):
        HydraForCausalLM(config)


def test_transformers_rope_validation_names_missing_keys_and_bad_values():
    with pytest.raises(KeyError, match=r"rope_parameters.*'linear'.*factor"):
        HydraConfig(rope_parameters={"rope_type": "linear"})
    with pytest.raises(KeyError, match=r"rope_parameters.*'llama3'.*low_freq_factor"):
        HydraConfig(rope_parameters={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"partial_rotary_factor.*\(0, 1\]"):
        HydraConfig(rope_parameters={"rope_type": "default", "partial_rotary_factor": 1.5})
    with pytest.raises(ValueError, match=r"rope_theta.*positive"):
        HydraConfig(rope_theta=0.0)
    with pytest.raises(ValueError, match=r"'dynamic' needs a rotary dim >= 4"):
        HydraConfig(hidden_size=32, num_attention_heads=2, compression_factor=4, partial_rotary_factor=0.25,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0})
    # HYDRA rounds the rotary dim down to even: an odd latent head dim with full RoPE is fine (transformers' own
    # even-head-dim check would refuse head_dim 7 with partial_rotary_factor 1)
    config = HydraConfig(hidden_size=56, num_attention_heads=2, compression_factor=4, partial_rotary_factor=1.0)
    assert (config.latent_head_dim, config.rotary_dim) == (7, 6)
    config.validate()


def test_the_rotary_module_copies_and_pickles():
    model = HydraForCausalLM(small_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        rotary = clone.model.rotary_emb
        assert rotary.config.head_dim == model.config.rotary_dim
        torch.testing.assert_close(rotary.inv_freq, model.model.rotary_emb.inv_freq)


def test_meta_init_rebuilds_the_rotary_buffers():
    config = small_config(rope_parameters={"rope_type": "llama3", **ROPE_SCALING["llama3"]})
    reference = HydraForCausalLM(config).model.rotary_emb
    with torch.device("meta"):
        model = HydraForCausalLM(config)
    model.to_empty(device="cpu")
    model.model.rotary_emb.inv_freq.fill_(0)
    model._init_weights(model.model.rotary_emb)
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.inv_freq, rtol=0, atol=0)
    torch.testing.assert_close(model.model.rotary_emb.original_inv_freq, reference.inv_freq, rtol=0, atol=0)


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
        # (an editable install's import hook, `__editable___hydra_hf_..._finder`, is pip's, not a HYDRA module)
        "bad = [m for m in sys.modules if not m.startswith('__editable__')\n"
        "       and ('hydra_hf' in m or 'ops_hydra' in m or 'ops_reference' in m)]\n"
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


def test_hydra_train_accepts_the_rope_keywords():
    from hydra_hf.cli import train as train_cli

    cfg = train_cli.resolve_config(train_cli.build_parser().parse_args([]))
    train_cli.apply_set(cfg, "partial_rotary_factor=0.25")
    train_cli.apply_set(cfg, "rope_theta=500000.0")
    train_cli.apply_set(cfg, "rope_parameters={rope_type: linear, factor: 2.0}")
    train_cli.check_model_section(cfg)
    preset, kwargs = train_cli._model_config_kwargs(cfg, 100)
    config = HydraConfig.from_preset(preset, **kwargs)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0,
                                      "partial_rotary_factor": 0.25}
