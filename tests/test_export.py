"""HYDRA through transformers' exporters (docs/deploy.md): prefill and single-token decode on the static cache, exported
with `OnnxExporter` / `DynamoExporter` / `ExecutorchExporter`, run on the exporters' runners (ONNX Runtime, the
`torch.export` module, the ExecuTorch runtime), greedy decode equal to eager `generate()` token for token (fp32).

Shapes: the `tiny` preset as it is (vocab 97; with MoD + MoR, 2 recursions instead of 1: MoR needs a second pass),
and the `debug` preset's layout (2 blocks x 2 recursions, 4 / 2 heads, C = 4) at hidden 128 / intermediate 256 /
vocab 97 instead of 512 / 2048 / 32000, for test speed. Weights are random with std 0.3, so that greedy decoding moves
through many tokens and the routers make mixed decisions (checked).
"""

import copy
import sys

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the export tests need the export extra: pip install hydra_hf[export]")
pytest.importorskip("onnxscript", reason="the export tests need the export extra: pip install hydra_hf[export]")

import hydra_hf  # noqa: E402
from hydra_hf import HydraConfig, HydraForCausalLM, HydraStaticCache  # noqa: E402
from hydra_hf.cli import export as export_cli  # noqa: E402
from hydra_hf.export_hydra import (  # noqa: E402
    HydraExportError,
    check_exportable,
    eager_greedy_decode,
    export_for_decoding,
    export_shapes,
    greedy_decode,
)

from conftest import ROUTING_MODES, tiny_model  # noqa: E402

VOCAB = 97
NEW_TOKENS = 32
ROUTED = dict(mod_enabled=True, mor_enabled=True)  # MoD + MoR (expert choice), causal "logit > 0" at inference
ROUTED_SHAPES = {"tiny": dict(mor_recursions=2), "debug": {}}
SHAPES = {
    "tiny": dict(vocab_size=VOCAB),
    "debug": dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256),  # debug's layout, narrower
}


def make_model(preset: str, routed: bool) -> HydraForCausalLM:
    torch.manual_seed(0)
    routing = {**ROUTED, **ROUTED_SHAPES[preset]} if routed else {}
    config = HydraConfig.from_preset(preset, initializer_range=0.3, **SHAPES[preset], **routing)
    return HydraForCausalLM(config).eval()


def prompts(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 1: an 8-token prompt; batch 2: the second row left-padded by 3 (pad id 0)."""
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(1, VOCAB, (batch, 8), generator=generator)
    mask = torch.ones_like(ids)
    if batch == 2:
        ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def routing_is_mixed(model, ids, mask) -> bool:
    """Routers process some tokens and skip others (else MoD + MoR equality would prove nothing)."""
    with torch.no_grad():
        record = model(ids, attention_mask=mask).routing
    fractions = [float(f) for f in record.mod_selected_fraction.values()]
    depths = [h for h in record.mor_depth_histogram.values()]
    return any(0 < f < 1 for f in fractions) and any(int((h > 0).sum()) > 1 for h in depths)


# ONNX Runtime: (routing, batch) -> the graphs, static shapes as hydra-export writes them by default. MoD + MoR at
# batch 1 is `test_hydra_export_writes_a_folder_that_loads_back` (through the command, the optimized graph).
ONNX_CASES = [("routing_off", 1), ("routing_off", 2), ("mod+mor", 2)]


@pytest.fixture(scope="module", params=ONNX_CASES, ids=lambda case: f"tiny-{case[0]}-batch{case[1]}")
def onnx_export(request):
    routing, batch = request.param
    model = make_model("tiny", routed=routing == "mod+mor")
    # `optimize=False` (onnxscript's graph optimizer off) only to export faster
    exported = export_for_decoding(model, "onnx", max_cache_len=48, batch_size=batch, prompt_length=8, optimize=False)
    return model, exported, batch


def test_onnx_runtime_greedy_decode_equals_eager(onnx_export):
    model, exported, batch = onnx_export
    ids, mask = prompts(batch)
    if model.config.mod_enabled:
        assert routing_is_mixed(model, ids, mask)
    got, logits = greedy_decode(exported, ids, mask, max_new_tokens=NEW_TOKENS, return_logits=True)
    want = eager_greedy_decode(model, ids, mask, max_new_tokens=NEW_TOKENS)
    assert type(exported.runners["decode"]).__name__ == "OnnxModelRunner"
    assert got.shape == (batch, 8 + NEW_TOKENS)
    assert torch.equal(got, want), (got.tolist(), want.tolist())
    assert len(set(got[0, 8:].tolist())) >= 4  # a sequence that moves (equality on a constant would be weak)
    # the logits themselves, against eager on the same static cache
    with torch.no_grad():
        cache = HydraStaticCache(model.config, max_cache_len=48)
        full_mask = torch.cat([mask, torch.ones(batch, NEW_TOKENS, dtype=mask.dtype)], 1)
        eager = model(want[:, :-1], attention_mask=full_mask[:, :-1], cache=cache).logits[:, 7:]
    torch.testing.assert_close(logits, eager, atol=1e-4, rtol=1e-4)


def test_exported_graphs_refuse_shapes_they_were_not_traced_for(onnx_export):
    model, exported, batch = onnx_export
    assert export_shapes(exported) == {"batch_size": batch, "prompt_length": 8, "max_cache_len": 48,
                                       "dynamic_batch": False, "dynamic_prompt": False}
    with pytest.raises(HydraExportError, match="prefill takes 8"):
        greedy_decode(exported, torch.ones(batch, 9, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(HydraExportError, match="max_cache_len=48"):
        greedy_decode(exported, torch.ones(batch, 8, dtype=torch.long), max_new_tokens=41)
    with pytest.raises(HydraExportError, match=f"traced for {batch}"):
        greedy_decode(exported, torch.ones(batch + 1, 8, dtype=torch.long), max_new_tokens=2)
    # a shorter prompt is left-padded to the graph's 8 tokens: the same tokens as eager on the short prompt
    ids = torch.randint(1, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy_decode(exported, ids, max_new_tokens=6), eager_greedy_decode(model, ids, max_new_tokens=6))


def test_dynamo_export_saves_and_loads_back_with_the_runner(tmp_path):
    """`DynamoExporter` (torch.export) on the debug layout with MoD + MoR, a left-padded batch of 2, saved and loaded
    back with `ExportedModel.from_pretrained` (its `DynamoModelRunner`)."""
    from transformers.exporters.base import ExportedModel

    model = make_model("debug", routed=True)
    exported = export_for_decoding(model, "dynamo", max_cache_len=48, batch_size=2, prompt_length=8)
    exported.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.pt2")) == ["decode.pt2", "prefill.pt2"]
    loaded = ExportedModel.from_pretrained(tmp_path, trust_remote_code=True)  # a .pt2 is a pickle
    assert type(loaded.runners["prefill"]).__name__ == "DynamoModelRunner"
    ids, mask = prompts(2)
    want = eager_greedy_decode(model, ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(greedy_decode(loaded, ids, mask, max_new_tokens=NEW_TOKENS), want)


def test_dynamic_batch_and_prompt_length():
    """`dynamic=True`: one graph pair for any batch and prompt length (3 .. max_cache_len - 1; shorter prompts are
    left-padded to 3), through torch.export; MoD + MoR."""
    model = tiny_model(**ROUTING_MODES["mod"] | ROUTING_MODES["mor_expert"]).eval()
    exported = export_for_decoding(model, "dynamo", max_cache_len=24, batch_size=2, prompt_length=6, dynamic=True)
    assert export_shapes(exported)["dynamic_batch"] and export_shapes(exported)["dynamic_prompt"]
    for batch, length in ((1, 2), (3, 9)):
        ids = torch.randint(1, 97, (batch, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        mask[-1, : length // 2] = 0  # the last row left-padded
        want = eager_greedy_decode(model, ids, mask, max_new_tokens=8)
        assert torch.equal(greedy_decode(exported, ids, mask, max_new_tokens=8), want)


@pytest.mark.parametrize("mode", ["mor_token", "static"])
def test_other_routing_modes_export_one_step(mode):
    """Token-choice MoR and static routing (the middle-cycle layout exports too, docs/deploy.md): prefill and a
    decode step through torch.export give eager's logits (a left-padded batch of 2)."""
    from transformers.exporters.exporter_dynamo import DynamoConfig, DynamoExporter

    model = tiny_model(**ROUTING_MODES[mode]).eval()
    ids, mask = prompts(2)
    full = torch.zeros(2, 16, dtype=torch.long)
    full[:, :8] = mask
    prefill = dict(input_ids=ids, attention_mask=full, cache=HydraStaticCache(model.config, max_cache_len=16))
    with torch.no_grad():
        out = model(**copy.deepcopy(prefill))
    full = full.clone()
    full[:, 8] = 1
    decode = dict(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=full, cache=out.cache)
    for inputs in (prefill, decode):
        program = DynamoExporter().export(model, copy.deepcopy(inputs), DynamoConfig())
        with torch.no_grad():
            torch.testing.assert_close(program(**copy.deepcopy(inputs)).logits, model(**copy.deepcopy(inputs)).logits,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", [m for m in ROUTING_MODES if m not in ("moe", "all")])
def test_static_cache_decodes_like_the_growing_cache(mode):
    """The graphs run the static cache: greedy decoding on it equals `generate()` on the growing HydraCache for every
    exportable routing mode (32 tokens, a left-padded batch of 2, weights that make the sequences and routers move).
    Static routing used to diverge here: a decode step on the static cache skipped the unselected token's conv /
    value-shift state instead of computing it and hiding its key."""
    from transformers import GenerationConfig

    model = tiny_model(**ROUTING_MODES[mode], initializer_range=0.3).eval()
    ids, mask = prompts(2)
    outputs = []
    for implementation in (None, "static"):
        config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                                  cache_implementation=implementation)
        with torch.no_grad():
            outputs.append(model.generate(ids, attention_mask=mask, generation_config=config))
    assert len(set(outputs[0][:, 8:].flatten().tolist())) >= 8
    assert torch.equal(outputs[0], outputs[1]), (outputs[0].tolist(), outputs[1].tolist())


def test_executorch_greedy_decode_equals_eager():
    pytest.importorskip("executorch", reason="ExecuTorch export needs the executorch extra: pip install 'hydra_hf[executorch]'")
    model = make_model("tiny", routed=False)
    exported = export_for_decoding(model, "executorch", max_cache_len=24, batch_size=1, prompt_length=8)
    assert type(exported.runners["decode"]).__name__ == "ExecutorchModelRunner"
    ids, mask = prompts(1)
    want = eager_greedy_decode(model, ids, mask, max_new_tokens=12)
    assert torch.equal(greedy_decode(exported, ids, mask, max_new_tokens=12), want)


# ---------------------------------------------------------------------------- the pytree registration


def test_cache_is_a_pytree_node_registered_at_import():
    """`import hydra_hf` registers the cache (and the routing record) the way the exporters register caches: tensor
    leaves, a JSON context, `module:qualname` as the serialized type; flatten / unflatten round-trips a filled cache."""
    from torch.utils import _pytree as pytree

    for cls in (hydra_hf.HydraCache, hydra_hf.HydraStaticCache, hydra_hf.RoutingRecord):
        assert pytree.SUPPORTED_SERIALIZED_TYPES[cls].serialized_type_name == f"{cls.__module__}:{cls.__qualname__}"
    model = tiny_model().eval()
    cache = HydraStaticCache(model.config, max_cache_len=12)
    with torch.no_grad():
        model(torch.randint(1, 97, (2, 5)), cache=cache)
    leaves, spec = pytree.tree_flatten(cache)
    # no tensor is shared between layers (an aliased input does not export): every leaf is its own tensor
    assert len({id(t) for t in leaves}) == len(leaves)
    assert pytree.treespec_loads(pytree.treespec_dumps(spec)) == spec
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is HydraStaticCache and rebuilt.get_seq_length() == 5
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.rolling, b.rolling)
               for a, b in zip(rebuilt.layers, cache.layers))


# ---------------------------------------------------------------------------- what cannot export: named


def test_moe_is_refused_naming_the_field():
    model = tiny_model(**ROUTING_MODES["moe"])
    with pytest.raises(HydraExportError, match="moe_enabled=True"):
        check_exportable(model.config)
    with pytest.raises(HydraExportError, match="moe_enabled=True"):
        export_for_decoding(model, "onnx", max_cache_len=16, prompt_length=4)
    check_exportable(tiny_model(**ROUTING_MODES["all"] | {"moe_enabled": False}).config)  # MoD + MoR + predictor


def test_missing_package_and_old_transformers_are_named(monkeypatch):
    import importlib.util

    import hydra_hf.export_hydra as ex

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "executorch" else real_find_spec(name))
    with pytest.raises(HydraExportError, match=r"pip install executorch \(or pip install 'hydra_hf\[executorch\]'\)"):
        ex.check_environment("executorch")
    monkeypatch.setitem(sys.modules, "transformers.exporters.base", None)  # what transformers 5.20 lacks
    with pytest.raises(HydraExportError, match="transformers >= 5.23"):
        ex.check_environment("onnx")
    with pytest.raises(HydraExportError, match="format='tflite'"):
        ex.check_environment("tflite")


# ---------------------------------------------------------------------------- hydra-export


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    make_model("tiny", routed=True).save_pretrained(path)
    return path


def test_hydra_export_writes_a_folder_that_loads_back(run_dir, tmp_path, capsys):
    from transformers.exporters.base import ExportedModel

    """tiny with MoD + MoR, batch 1, the optimized ONNX graph: exported by the command, loaded back with the
    exporters' runner (ONNX Runtime), 32 greedy tokens equal eager."""
    out = tmp_path / "export"
    rc = export_cli.main([str(run_dir), "--format", "onnx", "--output_dir", str(out), "--prompt_length", "8",
                          "--max_cache_len", "48", "--check", "8"])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "8 greedy tokens equal generate()" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"prefill.onnx", "decode.onnx", "prefill.onnx.data", "export.json", "config.json"} <= names
    loaded = ExportedModel.from_pretrained(out)  # the exporters' runner (ONNX Runtime)
    model = HydraForCausalLM.from_pretrained(run_dir).eval()
    ids, mask = prompts(1)
    assert routing_is_mixed(model, ids, mask)
    want = eager_greedy_decode(model, ids, mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(greedy_decode(loaded, ids, mask, max_new_tokens=NEW_TOKENS), want)


def _user_error(capsys, argv) -> str:
    rc = export_cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err  # one line, exit status 2 (as every hydra-* command)
    assert err[0].startswith("hydra-export: error: ") and "Traceback" not in "\n".join(err)
    return err[0]


def test_hydra_export_bad_input_is_one_clear_line(tmp_path, capsys, run_dir):
    assert "no such folder" in _user_error(capsys, [str(tmp_path / "nope")])
    empty = tmp_path / "empty"
    (empty / "checkpoint-10").mkdir(parents=True)
    assert "no config.json" in (message := _user_error(capsys, [str(empty)])) and "checkpoint-10" in message
    moe, llama = tmp_path / "moe", tmp_path / "llama"
    tiny_model(**ROUTING_MODES["moe"]).save_pretrained(moe)
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32).save_pretrained(llama)
    capsys.readouterr()  # the save's progress bar
    assert "moe_enabled=True cannot export" in _user_error(capsys, [str(moe)])
    assert "not a HYDRA model" in _user_error(capsys, [str(llama)])
    message = _user_error(capsys, [str(run_dir), "--prompt_length", "64", "--max_cache_len", "64"])
    assert "--prompt_length=64 --max_cache_len=64" in message
    assert "--batch_size=0 is not allowed" in _user_error(capsys, [str(run_dir), "--batch_size", "0"])
    with pytest.raises(SystemExit) as exc:  # argparse's own error: one line too, the same exit status
        export_cli.main([str(run_dir), "--format", "tflite"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'tflite'" in err[0]


def test_hydra_export_help_has_one_line_per_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: no wrapping, so each option is exactly one line
    with pytest.raises(SystemExit):
        export_cli.main(["--help"])
    lines = capsys.readouterr().out.split("options:")[1].strip().splitlines()
    options = [line.split()[0].rstrip(",") for line in lines]
    assert options == ["-h", "--format", "--output_dir", "--max_cache_len", "--prompt_length", "--batch_size",
                       "--dynamic", "--check", "--debug"]
    assert all(len(line.split(maxsplit=2)) >= 2 for line in lines)  # every option has its help on its line
