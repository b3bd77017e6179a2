"""A saved HYDRA model loads with `trust_remote_code=True` where hydra_hf is NOT installed.

`save_pretrained` writes `auto_map` into config.json and copies the model's code next to the
weights (transformers follows `from .x import` lines, flat files only). This test saves a model,
then loads it in a fresh interpreter in which every `hydra_hf` import fails, and checks that the
remote-code model gives the same logits and the same cached greedy generation.
"""

import json
import os
import subprocess
import sys

import torch
from conftest import BLOCK_HYDRA_HF, ROUTING_MODES, tiny_model

REMOTE_FILES = {
    "configuration_hydra.py",
    "peft_hydra.py",
    "modeling_hydra.py",
    "routing_hydra.py",
    "cache_hydra.py",
    "ops_hydra.py",
    "ops_reference_hydra.py",
}

LOADER = BLOCK_HYDRA_HF + r"""
import torch
from transformers import AutoConfig, AutoModelForCausalLM

model_dir, out_path = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
ids = torch.load(f"{model_dir}/inputs.pt")
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
# PEFT's default target modules for model_type "hydra" come with the remote code (peft_hydra.py)
from peft import LoraConfig, get_peft_model
lora_targets = sorted(get_peft_model(model, LoraConfig(task_type="CAUSAL_LM")).peft_config["default"].target_modules)
assert not any(m == "hydra_hf" or m.startswith("hydra_hf.") for m in sys.modules), "hydra_hf was imported"
torch.save({"logits": logits, "generated": generated, "module": type(model).__module__,
            "config_class": type(config).__name__, "lora_targets": lora_targets}, out_path)
"""


def test_saved_model_loads_as_remote_code_without_the_package(tmp_path):
    model = tiny_model(seed=5, **ROUTING_MODES["all"]).eval()
    model_dir = tmp_path / "hydra-remote"
    model.save_pretrained(model_dir)
    assert REMOTE_FILES <= set(os.listdir(model_dir))
    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_hydra.HydraForCausalLM"
    assert auto_map["AutoConfig"] == "configuration_hydra.HydraConfig"

    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, model_dir / "inputs.pt")
    with torch.no_grad():
        expected_logits = model(ids).logits
        expected_generated = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)

    out_path = tmp_path / "remote_out.pt"
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules_cache"), HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the package must not be importable from the source tree either
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, str(model_dir), str(out_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    remote = torch.load(out_path)
    assert remote["module"].startswith("transformers_modules.")
    assert remote["config_class"] == "HydraConfig"
    assert torch.allclose(remote["logits"], expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(remote["generated"], expected_generated)
    assert remote["lora_targets"] == ["q_proj", "v_proj"]
