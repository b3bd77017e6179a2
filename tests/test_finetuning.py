"""Fine-tuning: loss scaling under gradient accumulation, TRL's SFTTrainer, PEFT adapters, 4-bit loading."""

import copy
import json
import re
import string

import pytest
import torch
import torch.nn.functional as F
from conftest import ROUTING_MODES, rel, tiny_model
from datasets import Dataset
from test_training import make_args, make_dataset, make_model
from transformers import AutoModelForCausalLM, Trainer

import hydra_hf  # noqa: F401
from hydra_hf.training import HealthCallback, RoutingCurriculumCallback, RoutingMetricsCallback, add_callbacks
from hydra_hf.training.data import PackedCollator, build_char_tokenizer

# ---------------------------------------------------------------------------- loss scaling


def one_sgd_step(batch_size, accumulation):
    """One SGD step (lr 1) on the same 8 sequences, MoD + MoR on, large aux weights so a mis-scaled aux shows."""
    model = make_model(0, mod_aux_loss_coef=1.0, mor_ponder_loss_coef=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args("unused", max_steps=1, per_device_train_batch_size=batch_size,
                     gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                     lr_scheduler_type="constant", max_grad_norm=0, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(8), data_collator=PackedCollator())
    curriculum = RoutingCurriculumCallback(mod_off_fraction=0.0, mod_force_fraction=0.0, mor_start_fraction=0.0,
                                           mor_full_fraction=0.0, mor_capacity=0.5, mod_loss_gate=100.0)
    add_callbacks(trainer, [curriculum, RoutingMetricsCallback()])
    trainer.train()
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    log = next(e for e in trainer.state.log_history if "loss" in e)
    return update, log, curriculum


def test_accumulation_split_gives_the_same_update_and_logged_losses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    u1, log1, cur1 = one_sgd_step(8, 1)
    u2, log2, cur2 = one_sgd_step(4, 2)
    assert log1["curriculum/mod_enabled"] == 1.0 and log1["routing/mod_fraction/mean"] < 1.0  # routing really on
    biggest = max(u.abs().max().item() for u in u1.values())
    diff = max((u1[n] - u2[n]).abs().max().item() for n in u1)
    # the second micro-batch sees routers' thresholds moved by the first (BCE only); everything else is identical
    assert diff < 1e-3 * biggest, (diff, biggest)
    assert log2["train/ce_loss"] == pytest.approx(log1["train/ce_loss"], rel=1e-5)
    assert log2["train/aux_loss"] == pytest.approx(log1["train/aux_loss"], rel=1e-4)
    assert log2["loss"] == pytest.approx(log1["loss"], rel=1e-5)
    assert log1["train/aux_loss"] > 0.1  # the aux is large here, so a mis-scaled one would move `loss` and the update
    # the curriculum's loss gate reads the true CE
    assert cur1.ce_ema == pytest.approx(log1["train/ce_loss"], rel=1e-6)
    assert cur2.ce_ema == pytest.approx(log1["train/ce_loss"], rel=1e-5)


def test_aux_loss_is_counted_per_item_with_num_items_in_batch():
    model = tiny_model(seed=3, router_threshold_momentum=0.0, **ROUTING_MODES["mod"]).train()
    model.set_routing(mod_enabled=True)
    x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = x.clone()
    labels[0, :5] = -100
    items = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        plain = model(x, labels=labels)
        scaled = model(x, labels=labels, num_items_in_batch=torch.tensor(4 * items))
    assert float(scaled.aux_loss) == pytest.approx(float(plain.aux_loss) / 4, rel=1e-5)
    assert float(scaled.loss) == pytest.approx(float(plain.loss) / 4, rel=1e-5)


def test_backbone_under_an_external_lm_head_still_trains_the_routers():
    """TRL's fused LM head calls `model.model` and computes the CE itself: the routing aux losses are attached to
    the backbone's output gradient, so the gradients equal those of the model's own loss (CE + aux)."""
    def grads(how, attach=None):
        model = tiny_model(seed=2, router_threshold_momentum=0.0, **ROUTING_MODES["all"]).train()
        model.set_routing(mod_enabled=True, mor_enabled=True)
        x = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
        if how == "labels":
            model(x, labels=x).loss.backward()
        else:
            if how == "backbone":
                logits = model.lm_head(model.model(x, attach_routing_loss=attach).last_hidden_state)
            else:  # the causal LM without labels: the caller computes the loss from the logits
                out = model(x)
                assert out.aux_loss is None and out.logits is out[0]
                logits = out.logits
            logits = logits[:, :-1]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    reference, plain = grads("labels"), grads("backbone", attach=False)
    for attached in (grads("backbone"), grads("logits")):
        assert reference.keys() == attached.keys()
        for name, g in reference.items():
            torch.testing.assert_close(attached[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the MoD predictor learns only from its BCE: without the attachment it gets no gradient at all
    assert any("predictor" in n for n in attached) and not any("predictor" in n for n in plain)


# ---------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def char_tokenizer():
    return build_char_tokenizer([string.printable])


def sft_dataset(mode):
    if mode == "prompt_completion":
        return Dataset.from_dict({"prompt": [f"Q{i}: {i}+{i}=" for i in range(8)],
                                  "completion": [f" {2 * i}." for i in range(8)]})
    return Dataset.from_dict({"text": [f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 2) for i in range(8)]})


# routing off, MoD only, MoR only, everything (MoD with predictor + MoR + MoE). HydraConfig defaults to no MoE, and
# TRL's trainers take their MoE path whenever the config *has* `output_router_logits`: without MoE blocks the
# attribute is hidden, so TRL trains HYDRA as a dense model (the routing losses are attached by the backbone).
SFT_ROUTING = {"off": "dense", "mod": "mod", "mor": "mor_expert", "all": "all"}


@pytest.mark.parametrize("routing", list(SFT_ROUTING))
@pytest.mark.parametrize("mode", ["text", "prompt_completion", "packing_padding_free", "lora"])
def test_sft_trainer_trains_with_routing_losses(mode, routing, char_tokenizer, tmp_path):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    overrides = ROUTING_MODES[SFT_ROUTING[routing]]
    model = tiny_model(seed=0, vocab_size=len(char_tokenizer), **overrides)
    has_mod, has_mor, has_moe = (overrides.get(k, False) for k in ("mod_enabled", "mor_enabled", "moe_enabled"))
    model.set_routing(mod_enabled=has_mod, mor_enabled=has_mor)
    predictor = model.model.mod_routers[0].predictor[0].weight.detach().clone() if routing == "all" else None
    q_proj = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    thresholds = [float(r.threshold) for r in model.model.mod_routers]
    extra = dict(packing=True, padding_free=True) if mode == "packing_padding_free" else {}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to="none", use_cpu=True, max_length=48, save_strategy="no",
                         disable_tqdm=True, **extra)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=sft_dataset(mode),
                             processing_class=char_tokenizer,
                             peft_config=LoraConfig(task_type="CAUSAL_LM") if mode == "lora" else None)
    assert trainer.aux_loss_enabled == has_moe  # TRL's MoE load-balancing path only for a model with MoE blocks
    add_callbacks(trainer, [RoutingMetricsCallback(), HealthCallback(frozen_check_steps=0)])
    trainer.train()
    health = json.loads((tmp_path / "health.json").read_text())  # LoRA: the frozen base model is expected
    assert health["peft"] == (mode == "lora") and bool(health["parameters"]["requires_grad_false"]) == (mode == "lora")
    assert not any("requires_grad" in a for a in health["alerts"])
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    for e in logs:  # routing losses logged; the CE our probe reads from TRL's log-probs matches TRL's own loss
        assert ("aux_loss" in e) == has_moe  # TRL's MoE balance loss
        assert (e.get("routing/loss/mod_bce", 0) > 0) == has_mod and (e.get("routing/loss/mor_bce", 0) > 0) == has_mor
        if has_mod or has_mor:
            assert e["train/aux_loss"] > 0
        assert e["train/ce_loss"] == pytest.approx(e["loss"] - 0.01 * e.get("aux_loss", 0.0), rel=1e-3)
    moved = lambda before, after: not torch.equal(before, after.detach())  # noqa: E731
    if mode == "lora":
        assert not moved(q_proj, model.model.layers[0].self_attn.q_proj.base_layer.weight)
        if predictor is not None:
            assert not moved(predictor, model.model.mod_routers[0].predictor[0].weight)
        assert [float(r.threshold) for r in model.model.mod_routers] == thresholds  # frozen routers
        lora_b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
        assert lora_b.abs().max() > 0
    else:
        assert moved(q_proj, model.model.layers[0].self_attn.q_proj.weight)
        if predictor is not None:
            assert moved(predictor, model.model.mod_routers[0].predictor[0].weight)  # the routing aux loss trained it
        if has_mod:
            assert [float(r.threshold) for r in model.model.mod_routers] != thresholds


def test_sft_trainer_moe_coef_on_a_model_without_moe_is_refused(char_tokenizer, tmp_path):
    """An explicit MoE aux-loss weight on a HYDRA without MoE blocks gets TRL's own "not a Mixture-of-Experts model"
    error at construction (not an AttributeError at the first logged step); 0.0 is accepted."""
    trl = pytest.importorskip("trl")
    model = tiny_model(seed=0, vocab_size=len(char_tokenizer), **ROUTING_MODES["mod"])
    kwargs = dict(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="not a Mixture-of-Experts model"):
        trl.SFTTrainer(model=model, args=trl.SFTConfig(router_aux_loss_coef=0.01, **kwargs),
                       train_dataset=sft_dataset("text"), processing_class=char_tokenizer)
    trainer = trl.SFTTrainer(model=model, args=trl.SFTConfig(router_aux_loss_coef=0.0, **kwargs),
                             train_dataset=sft_dataset("text"), processing_class=char_tokenizer)
    assert not trainer.aux_loss_enabled


# ---------------------------------------------------------------------------- PEFT


ROUTER_MODULES = ["model.mod_routers.0", "model.mod_routers.1", "model.mod_routers.2", "model.mor_routers.0"]


@pytest.mark.parametrize("variant", ["default", "all-linear", "routers_saved"])
def test_adapter_reproduces_the_finetuned_model(variant, tmp_path):
    """default: LoraConfig without target_modules (HYDRA's PEFT defaults), also through AutoPeftModelForCausalLM and
    merge_and_unload. all-linear: LoRA on the routers too (their frozen weights keep the thresholds still).
    routers_saved: routers trained in full through modules_to_save (thresholds move and are saved)."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_model(seed=1, **ROUTING_MODES["middle_cycle"]).save_pretrained(base_dir)

    def load_base():
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        base.set_routing(mod_enabled=True, mor_enabled=True)
        return base

    kwargs = {"all-linear": dict(target_modules="all-linear"), "routers_saved": dict(modules_to_save=ROUTER_MODULES)}
    model = get_peft_model(load_base(), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                                                   **kwargs.get(variant, {})))
    routers = [m for n, m in model.named_modules() if n.endswith(("mod_routers.0", "mor_routers.0"))]
    thresholds = [float(m.threshold) for m in model.modules() if hasattr(m, "threshold")]
    if variant == "default":
        assert model.peft_config["default"].target_modules == {"q_proj", "v_proj"}
        assert all("routers" not in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = thresholds != [float(m.threshold) for m in model.modules() if hasattr(m, "threshold")]
    assert moved == (variant == "routers_saved") and routers
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=x).logits
    model.save_pretrained(adapter_dir)

    reloaded = PeftModel.from_pretrained(load_base(), adapter_dir).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, tuned)
    if variant == "default":
        auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        auto.set_routing(mod_enabled=True, mor_enabled=True)
        with torch.no_grad():
            assert torch.equal(auto(input_ids=x).logits, tuned)
            merged = reloaded.merge_and_unload().eval()
            torch.testing.assert_close(merged(input_ids=x).logits, tuned, rtol=1e-5, atol=1e-5)


def test_shadow_adapters_and_prefix_tuning_name_the_limitation():
    from peft import PrefixTuningConfig, ShadowConfig, get_peft_model

    with pytest.raises(ValueError, match="shadow adapters .* not supported"):
        get_peft_model(tiny_model(seed=0), ShadowConfig(task_type="CAUSAL_LM"))
    prefix = get_peft_model(tiny_model(seed=0), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prefix tuning is not supported"):
        prefix(input_ids=torch.randint(0, 97, (2, 6)))


# ---------------------------------------------------------------------------- quantization


def test_4bit_load_keeps_routers_unquantized_and_qlora_trains(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    tiny_model(seed=1, hidden_size=128, intermediate_size=256, **ROUTING_MODES["all"]).save_pretrained(tmp_path / "m")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config)
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] is bnb.nn.Linear4bit
    assert kinds["model.moe_blocks.0.experts.0.down_proj"] is bnb.nn.Linear4bit
    for name in ("model.mod_routers.0.proj", "model.mod_routers.0.predictor.2", "model.mor_routers.0.proj",
                 "model.moe_blocks.0.gate"):
        assert kinds[name] is torch.nn.Linear, name
    model.set_routing(mod_enabled=True, mor_enabled=True)
    model = get_peft_model(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
                           LoraConfig(task_type="CAUSAL_LM", r=4))
    # training mode, as the Trainer sets it: in eval mode without input gradients bitsandbytes' CPU path repacks the
    # 4-bit weights for its inference kernel, which has no autograd ("an autograd kernel was not registered")
    model.train()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_bnb_4bit_cpu_rule_is_bitsandbytes_own():
    """`bnb_4bit_cpu_supported` is exactly where bitsandbytes' CPU inference repacking of a 4-bit weight works (the
    conversion `Linear4bit.forward` runs in eval / no-grad on CPUs with AVX512-BF16; called here directly, so the
    check does not depend on this machine's CPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    from hydra_hf.modeling_hydra import bnb_4bit_cpu_supported

    for out_features in (8, 16, 24, 32, 48, 64, 96, 97, 128):
        for in_features in (16, 32, 48, 64, 96, 128, 192, 256, 320):
            layer = torch.nn.Linear(in_features, out_features, bias=False)
            weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
            try:
                _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
                packs = True
            except (AssertionError, RuntimeError):
                packs = False
            assert packs == bnb_4bit_cpu_supported(layer), (out_features, in_features)


def test_4bit_load_of_a_narrow_model_keeps_the_layers_bnb_cannot_run_unquantized(tmp_path):
    """hidden 128, compression 4: latent projections 16 / 32 wide (k/v: 16 out, o: 32 in), which bitsandbytes' 4-bit
    CPU inference cannot run ("N must be divisible by block_n"); they load unquantized, the wide layers in 4-bit, and
    an eval forward without gradients (the CPU path that crashed) gives the unquantized model's logits closely."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from hydra_hf.modeling_hydra import bnb_4bit_cpu_supported

    reference = tiny_model(seed=1, hidden_size=128, intermediate_size=256, compression_factor=4, **ROUTING_MODES["all"])
    reference.save_pretrained(tmp_path / "m")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config)
    kinds = {n: type(m) for n, m in model.named_modules()}
    for name in ("k_proj", "v_proj", "o_proj"):  # (16, 128), (16, 128), (128, 32)
        assert kinds[f"model.layers.0.self_attn.{name}"] is torch.nn.Linear, name
    for name in ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):  # (32, 128), (256, 128), (128, 256)
        assert kinds[f"model.layers.0.{name}"] is bnb.nn.Linear4bit, name
    assert kinds["model.moe_blocks.0.experts.0.up_proj"] is bnb.nn.Linear4bit
    assert kinds["model.mod_routers.0.proj"] is torch.nn.Linear
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert all(not bnb_4bit_cpu_supported(m) for m in linears if m.in_features == 128 and m.out_features == 16)
    # the same model with the 4-bit weights dequantized: what the quantized model should compute
    dequantized = copy.deepcopy(reference).eval()
    quantized_layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with torch.no_grad():
        for name, module in dequantized.named_modules():
            if name in quantized_layers:
                weight = quantized_layers[name].weight
                module.weight.copy_(bnb.functional.dequantize_4bit(weight.data, weight.quant_state))
    model.eval()
    reference.eval()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        quantized, exact, expected = model(x).logits, reference(x).logits, dequantized(x).logits
        model(x[:, :1])  # a one-token step too
    assert torch.isfinite(quantized).all()
    assert rel(quantized, expected) < 0.01, rel(quantized, expected)  # bf16 compute of the 4-bit weights
    assert rel(quantized, exact) < 0.2, rel(quantized, exact)  # nf4 weights (measured 0.10 here)


def test_float16_load_keeps_narrow_layers_in_float16_and_routers_in_float32(tmp_path):
    """The narrow layers listed for bitsandbytes are ordinary layers: a float16 load does not upcast them (only the
    routers stay in float32), so the forward runs."""
    tiny_model(seed=1, hidden_size=128, intermediate_size=256, compression_factor=4, **ROUTING_MODES["mod"]).save_pretrained(
        tmp_path / "m"
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float16)
    assert model.model.layers[0].self_attn.k_proj.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float16
    assert model.model.mod_routers[0].proj.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 97, (1, 8))).logits.float()).all()
    # transformers' contract (its `test_keep_in_fp32_modules`): what `_keep_in_fp32_modules` names is float32 after a
    # float16 load, everything else float16. The narrow layers are listed only when loading quantized.
    keep = model._keep_in_fp32_modules | model._keep_in_fp32_modules_strict
    assert keep and not any("k_proj" in k for k in keep), keep
    for name, param in model.state_dict().items():
        if param.is_floating_point():
            kept = any(re.search(rf"(?:^|\.){k}(?:\.|$)", name) for k in keep)
            assert param.dtype == (torch.float32 if kept else torch.float16), (name, param.dtype)
