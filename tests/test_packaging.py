"""Packaging (issue 17, item 7): what a CPU-only machine does not need is an optional extra.

- `setup.py`: triton / liger-kernel (`[gpu]`), bitsandbytes (`[quant]`) and tensorboard (`[tensorboard]`) are
  extras, not core requirements; `[dev]` (what `make test` installs) has them all, since the tests run the Triton
  kernels on CPU (TRITON_INTERPRET=1), 4-bit loading and so on.
- In a fresh interpreter where none of them can be imported (as after `pip install hydra_hf`), importing hydra_hf,
  building, training, saving and reloading a model prints nothing, and each feature that needs a missing extra
  stops with one message naming it (`pip install 'hydra_hf[quant]'`, ...).
"""

import ast
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = {"gpu": {"triton", "liger-kernel"}, "quant": {"bitsandbytes"}, "tensorboard": {"tensorboard"},
            "export": {"onnx", "onnxscript", "onnxruntime"}, "executorch": {"executorch"}}


def _setup_requirements():
    """install_requires and extras_require of setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read())
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            constants[node.targets[0].id] = ast.literal_eval(node.value)

    def value(node):
        if isinstance(node, ast.Name):
            return constants[node.id]
        if isinstance(node, ast.BinOp):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.Dict):
            return {ast.literal_eval(k): value(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)

    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: k.value for k in call.keywords}
    return value(kwargs["install_requires"]), value(kwargs["extras_require"])


def _names(requirements):
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in requirements}


def test_optional_packages_are_extras():
    core, extras = _setup_requirements()
    assert not _names(core) & set().union(*OPTIONAL.values()), core
    for extra, packages in OPTIONAL.items():
        assert _names(extras[extra]) == packages, (extra, extras[extra])
    assert set().union(*OPTIONAL.values()) | {"pytest", "lm_eval", "trl"} <= _names(extras["dev"])
    assert {"torch", "transformers", "datasets", "tokenizers", "accelerate", "matplotlib", "pyyaml"} <= _names(core)


WITHOUT_EXTRAS = r"""
import contextlib, io, json, os, sys, tempfile
# as if not installed: `import x` raises ModuleNotFoundError, importlib.util.find_spec("x") is None
for name in ("triton", "liger_kernel", "bitsandbytes", "tensorboard", "tensorboardX", "torchao"):
    sys.modules[name] = None
os.environ["TRITON_INTERPRET"] = "1"  # the kernel path is asked for on CPU: without Triton the reference runs

import torch
import transformers
import hydra_hf

transformers.utils.logging.disable_progress_bar()  # save / load progress bars: stderr must hold nothing else
from hydra_hf import HydraConfig, HydraForCausalLM
from hydra_hf.cli import train as train_cli
from hydra_hf.training import build_optimizer

results = {}
try:
    build_optimizer(torch.nn.Linear(2, 2), "adamw8bit")
except RuntimeError as exc:
    results["adamw8bit"] = str(exc)


def cli(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train_cli.main(argv)
    return rc, err.getvalue()


out = tempfile.mkdtemp()
results["cli_adamw8bit"] = cli(["--output_dir", out, "--optimizer", "adamw8bit"])
results["cli_tensorboard"] = cli(["--output_dir", out, "--report_to", "tensorboard"])
results["cli_liger"] = cli(["--output_dir", out, "--liger"])

for backend in ("auto", "triton", "liger", "torch"):
    torch.manual_seed(0)
    config = HydraConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                         num_key_value_heads=2, compression_factor=2, num_unique_blocks=2, mor_recursions=2,
                         max_position_embeddings=64, mod_enabled=True, mor_enabled=True, kernel_backend=backend)
    model = HydraForCausalLM(config)
    ids = torch.randint(0, 64, (2, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.save_pretrained(os.path.join(out, backend))
    again = HydraForCausalLM.from_pretrained(os.path.join(out, backend)).eval()
    again.generate(ids[:1, :4], max_new_tokens=3, do_sample=False)
    results[backend] = float(loss.detach())
results["kernels_imported"] = sorted(m for m in sys.modules if m.startswith("hydra_hf.ops.") and m.endswith("triton"))
print("RESULTS " + json.dumps(results))
"""


def test_core_install_without_extras_is_quiet_and_names_the_extra(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_EXTRAS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr == "", proc.stderr  # nothing printed for the missing packages
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    assert "pip install 'hydra_hf[quant]'" in results["adamw8bit"], results["adamw8bit"]
    expected = {"cli_adamw8bit": "--optimizer='adamw8bit' needs bitsandbytes, which is not installed: "
                                 "pip install 'hydra_hf[quant]'",
                "cli_tensorboard": "--report_to='tensorboard' needs tensorboard, which is not installed: "
                                   "pip install 'hydra_hf[tensorboard]'",
                "cli_liger": "--liger (gpu.liger=true) needs liger-kernel, which is not installed: "
                             "pip install 'hydra_hf[gpu]'"}
    for key, text in expected.items():
        rc, err = results[key]
        assert rc == 2 and len(err.strip().splitlines()) == 1 and text in err, (key, err)
    losses = [results[b] for b in ("auto", "triton", "liger", "torch")]
    assert all(abs(x - losses[-1]) < 1e-5 for x in losses), losses  # every backend ran the reference
    assert results["kernels_imported"] == []


def test_explicit_gpu_backend_without_its_package_names_the_extra(monkeypatch):
    """On CUDA, kernel_backend "triton" / "liger" without Triton / Liger installed stops with one message naming
    the [gpu] extra; "auto", "torch" and CPU tensors run the reference quietly (a saved config loads anywhere).
    (The decision is a pure function of the backend, the device and the import result: checked here on CPU.)"""
    from hydra_hf import ops_hydra

    for backend, package in (("triton", "triton"), ("liger", "liger-kernel")):
        error = ops_hydra._missing_package_error(backend, True, None)
        assert isinstance(error, ImportError)
        assert f"kernel_backend={backend!r} needs {package}, which is not installed" in str(error)
        assert "pip install 'hydra_hf[gpu]'" in str(error)
        assert ops_hydra._missing_package_error(backend, False, None) is None  # CPU: the reference runs
        assert ops_hydra._missing_package_error(backend, True, object()) is None  # installed
    for backend in ("auto", "torch"):
        assert ops_hydra._missing_package_error(backend, True, None) is None
    # remote code without the hydra_hf package: no kernel could run anyway, the reference runs quietly
    monkeypatch.setitem(ops_hydra._IMPORTED, ops_hydra._import_kernel_utils, None)
    assert ops_hydra._missing_package_error("triton", True, None) is None
