"""Training through the stock `transformers.Trainer`: curriculum, resume, best checkpoint, health, optimisers."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import hydra_hf  # noqa: F401
from hydra_hf import HydraConfig, HydraForCausalLM
from hydra_hf.training import (BestCheckpointCallback, HealthCallback, RoutingCurriculumCallback,
                               RoutingMetricsCallback, add_callbacks, build_optimizer, build_scheduler)
from hydra_hf.training import schedules
from hydra_hf.training.data import PackedCollator

VOCAB, SEQ = 64, 16


def make_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                num_key_value_heads=2, compression_factor=2, num_unique_blocks=2, mor_recursions=2,
                max_position_embeddings=64, mod_enabled=True, mor_enabled=True)
    base.update(kw)
    return HydraConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return HydraForCausalLM(make_config(**kw))


def make_dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB, (1,), generator=g))
        step = int(torch.randint(1, 4, (1,), generator=g))
        ids = [(start + step * i) % VOCAB for i in range(SEQ)]
        rows.append(ids)
    return Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})


def make_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=12, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=3e-3, logging_steps=1, save_strategy="steps", save_steps=4, report_to="none",
                seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, label_names=["labels"],
                use_cpu=True)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Records the routing state each step is run with."""

    def __init__(self):
        self.settings = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        # runs after the curriculum's on_step_begin (callbacks are called in order)
        from dataclasses import asdict

        self.settings[state.global_step] = asdict(model.routing_state)


def curriculum():
    return RoutingCurriculumCallback(mod_off_fraction=0.25, mod_force_fraction=0.9, mod_loss_gate=100.0,
                                     mor_start_fraction=0.4, mor_full_fraction=0.75, mor_capacity=0.5)


def run(out, resume=None, callbacks=(), model_seed=0, **argkw):
    model = make_model(model_seed)
    args = make_args(out, **argkw)
    opt = build_optimizer(model, "adamw", lr=args.learning_rate, weight_decay=0.1)
    sched = build_scheduler(opt, "wsd", args.max_steps, warmup_steps=2, decay_fraction=0.3)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), eval_dataset=make_dataset(16, seed=1),
                      data_collator=PackedCollator(), optimizers=(opt, sched))
    add_callbacks(trainer, list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


# ---------------------------------------------------------------------------- schedules


def test_schedule_transitions_at_the_right_steps():
    m = 100
    assert [schedules.mod_enabled_at(s, m, 0.10, 0.175, None) for s in (0, 9, 10, 17, 18, 99)] == [
        False, False, False, False, True, True]
    assert [schedules.mod_enabled_at(s, m, 0.10, 0.175, 12) for s in (9, 11, 12, 17)] == [False, False, True, True]
    assert schedules.mor_setting_at(19, m, 0.2, 0.3, 0.5) == (False, 1.0)
    assert schedules.mor_setting_at(20, m, 0.2, 0.3, 0.5) == (True, 1.0)
    assert schedules.mor_setting_at(25, m, 0.2, 0.3, 0.5) == (True, pytest.approx(0.75))
    assert schedules.mor_setting_at(30, m, 0.2, 0.3, 0.5) == (True, 0.5)
    enabled, caps = schedules.mor_setting_at(25, m, 0.2, 0.3, [0.5, 0.7])
    assert enabled and caps == [pytest.approx(0.75), pytest.approx(0.85)]
    assert [schedules.moe_dense_at(s, 5) for s in (0, 4, 5)] == [True, True, False]
    assert schedules.moe_forced_at(2, 3, {0: 1}) == {0: 1} and schedules.moe_forced_at(3, 3, {0: 1}) is None
    with pytest.raises(ValueError, match="force_fraction"):
        schedules.mod_enabled_at(0, 10, 0.5, 0.2)


def test_curriculum_callback_applies_schedule_and_gate(tmp_path):
    rec = Recorder()
    cur = curriculum()
    trainer = run(tmp_path / "a", callbacks=[cur, rec, RoutingMetricsCallback()])
    # gate opens after the first eligible step (3 = ceil(0.25 * 12)); MoD on from step 3 on
    assert cur.gate_open_step == 3
    assert [rec.settings[s]["mod_enabled"] for s in range(12)] == [False] * 3 + [True] * 9
    # MoR: off before ceil(0.4*12)=5, ramp to 0.5 by ceil(0.75*12)=9
    assert [rec.settings[s]["mor_enabled"] for s in range(12)] == [False] * 5 + [True] * 7
    assert rec.settings[5]["mor_capacity"] == pytest.approx(1.0)
    assert rec.settings[7]["mor_capacity"] == pytest.approx(0.75)
    assert rec.settings[11]["mor_capacity"] == pytest.approx(0.5)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert "curriculum/mod_enabled" in logged[-1] and "routing/mod_fraction/mean" in logged[-1]
    assert "routing/mor_depth_hist/block_0/depth_1" in logged[-1]
    assert all(isinstance(v, (int, float)) for v in logged[-1].values())
    assert logged[-1]["train/tokens_per_second"] > 0


def test_metrics_callback_logs_eval_mode_routing(tmp_path):
    trainer = run(tmp_path / "e", callbacks=[RoutingMetricsCallback()], max_steps=4, eval_strategy="steps",
                  eval_steps=4)
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evals and 0.0 <= evals[-1]["eval_routing/mod_fraction/mean"] <= 1.0
    assert "eval_routing/mor_mean_depth/mean" in evals[-1]
    assert not any("/loss/" in k for k in evals[-1])
    # the eval statistics follow the causal rule (router logit > 0), not the training capacity (0.75)
    for bias, expected in ((-100.0, 0.0), (100.0, 1.0)):
        with torch.no_grad():
            for router in trainer.model.model.mod_routers:
                router.proj.bias.fill_(bias)
        trainer.evaluate()
        assert trainer.state.log_history[-1]["eval_routing/mod_fraction/mean"] == pytest.approx(expected)


def test_resume_reproduces_losses_and_curriculum(tmp_path):
    rec_full = Recorder()
    full = run(tmp_path / "full", callbacks=[curriculum(), rec_full, HealthCallback(frozen_check_steps=0)])
    ckpt = tmp_path / "full" / "checkpoint-8"
    assert ckpt.is_dir()
    rec_res = Recorder()
    cur_res = curriculum()
    resumed = run(tmp_path / "full", resume=str(ckpt), callbacks=[cur_res, rec_res, HealthCallback(frozen_check_steps=0)])
    assert cur_res.gate_open_step == 3  # restored from the checkpoint, not re-decided after the resume
    for step in range(8, 12):
        assert rec_res.settings[step] == rec_full.settings[step], step
    full_losses, res_losses = losses(full), losses(resumed)
    for step in range(9, 13):
        assert res_losses[step] == pytest.approx(full_losses[step], abs=1e-5), step


def test_curriculum_restored_with_trainer_restore_flag(tmp_path):
    run(tmp_path / "r", callbacks=[curriculum()])
    cur = curriculum()
    trainer = run(tmp_path / "r", resume=str(tmp_path / "r" / "checkpoint-8"), callbacks=[cur],
                  restore_callback_states_from_checkpoint=True)
    restored = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, RoutingCurriculumCallback)]
    assert len(restored) == 1 and restored[0].gate_open_step == 3 and restored[0].mod_off_fraction == 0.25


# ---------------------------------------------------------------------------- best checkpoint


class Sabotage(TrainerCallback):
    """Adds large noise to every weight after each step: later evaluations get worse."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.5)


def test_global_best_checkpoint_survives_resume(tmp_path):
    out = tmp_path / "best"
    kw = dict(max_steps=8, eval_strategy="steps", eval_steps=4, save_steps=4, save_total_limit=1,
              metric_for_best_model="eval_loss", greater_is_better=False, logging_steps=4)
    first = run(out, callbacks=[BestCheckpointCallback()], **{**kw, "max_steps": 4})
    best_before = first.state.best_metric
    assert first.state.best_model_checkpoint.endswith("checkpoint-4")
    resumed = run(out, resume=str(out / "checkpoint-4"), callbacks=[BestCheckpointCallback(), Sabotage()], **kw)
    evals = [e["eval_loss"] for e in resumed.state.log_history if "eval_loss" in e]
    assert evals[-1] > best_before  # the evaluation after the resume is worse
    assert resumed.state.best_metric == pytest.approx(best_before)
    assert resumed.state.best_model_checkpoint.endswith("checkpoint-4")
    assert (out / "checkpoint-4").is_dir()  # rotation with save_total_limit=1 kept the global best
    import json

    record = json.loads((out / "best_checkpoint.json").read_text())
    assert record["step"] == 4 and record["metric"] == pytest.approx(best_before)


# ---------------------------------------------------------------------------- health


def test_frozen_parameter_is_named(tmp_path):
    model = make_model()
    args = make_args(tmp_path / "frozen", max_steps=3, save_strategy="no")
    frozen_name = "model.norm.weight"
    params = [p for n, p in model.named_parameters() if n != frozen_name]
    opt = torch.optim.AdamW(params, lr=1e-3)
    health = HealthCallback(frozen_check_steps=2, frozen_action="stop")
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), data_collator=PackedCollator(),
                      optimizers=(opt, None))
    add_callbacks(trainer, [health])
    trainer.train()
    assert health.frozen_parameters == [frozen_name]
    assert trainer.state.global_step == 2  # "stop" ended the run at the check


def test_health_all_parameters_move_with_routing(tmp_path):
    health = HealthCallback(frozen_check_steps=4, frozen_action="raise")
    run(tmp_path / "moves", callbacks=[health], max_steps=4, save_strategy="no")
    assert health.frozen_parameters == []


class PostClipNorm(TrainerCallback):
    def __init__(self):
        self.norms = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        total = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))
        self.norms[state.global_step] = (float(total), float(args.max_grad_norm))


def test_dynamic_clipping_changes_trainer_clipping(tmp_path):
    health = HealthCallback(frozen_check_steps=0, dynamic_clip=True, clip_window=4, clip_k=0.0, clip_min=1e-3,
                            clip_max=1e-3)
    probe = PostClipNorm()
    run(tmp_path / "clip", callbacks=[health, probe], max_steps=6, save_strategy="no", max_grad_norm=100.0)
    # until 2 norms are known the initial threshold (100) applies, then the dynamic one (1e-3)
    assert probe.norms[0][1] == 100.0 and probe.norms[0][0] > 1e-2
    for step in (3, 4, 5):
        norm, threshold = probe.norms[step]
        assert threshold == pytest.approx(1e-3)
        assert norm <= 1e-3 * 1.01
    assert len(health.grad_norm_window) == 4 and all(g > 1e-2 for g in health.grad_norm_window)


def test_loss_spike_cooldown():
    health = HealthCallback(frozen_check_steps=0, spike_window=10, spike_k=3.0, spike_lr_factor=0.5,
                            spike_cooldown_steps=2)

    class Probe:
        value = 1.0

        def step_value(self, step):
            return (self.value, 0.0)

    class State:
        global_step = 0

    class Control:
        should_training_stop = False

    class Opt:
        param_groups = [{"lr": 1.0}]

    health._probe = Probe()
    opt = Opt()
    for i in range(10):
        health._probe.value = 1.0 + 0.01 * (i % 3)
        opt.param_groups[0]["lr"] = 1.0
        health.on_step_end(None, State(), Control(), optimizer=opt)
        assert opt.param_groups[0]["lr"] == 1.0
    health._probe.value = 10.0
    opt.param_groups[0]["lr"] = 1.0
    health.on_step_end(None, State(), Control(), optimizer=opt)
    assert opt.param_groups[0]["lr"] == 0.5 and health.spike_steps == [0]
    health._probe.value = 1.0
    opt.param_groups[0]["lr"] = 1.0
    health.on_step_end(None, State(), Control(), optimizer=opt)
    assert opt.param_groups[0]["lr"] == 0.5
    opt.param_groups[0]["lr"] = 1.0
    health.on_step_end(None, State(), Control(), optimizer=opt)
    assert opt.param_groups[0]["lr"] == 1.0  # cooldown over


# ---------------------------------------------------------------------------- optimisers


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_optimisers_train_with_stock_trainer(tmp_path, name):
    model = make_model(moe_enabled=True, moe_num_layers=1)
    args = make_args(tmp_path / name, max_steps=4, save_strategy="no", learning_rate=1e-3)
    opt = build_optimizer(model, name, lr=1e-3, router_lr_scale=2.0, expert_lr_scale=0.5)
    sched = build_scheduler(opt, "cosine", 4, warmup_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), data_collator=PackedCollator(),
                      optimizers=(opt, sched))
    trainer.train()
    moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert len(moved) == len(before)
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_param_groups_no_decay_and_lr_scales():
    model = make_model(moe_enabled=True, moe_num_layers=1)
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1, router_lr_scale=2.0, expert_lr_scale=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if "norm" in n or n.endswith(".bias") or "embed" in n:
                assert group["weight_decay"] == 0.0, n
            if "mod_routers" in n or "moe_blocks.0.gate" in n:
                assert group["lr"] == pytest.approx(2e-3), n
            if ".experts." in n:
                assert group["lr"] == pytest.approx(5e-4), n
    with pytest.raises(RuntimeError, match="CUDA"):
        build_optimizer(model, "adamw8bit")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(model, "sgd")


def test_moe_dense_warmup_and_forced_routing_with_domain_labels(tmp_path):
    model = make_model(moe_enabled=True, moe_num_layers=1, num_local_experts=2)
    ds = make_dataset(32)
    ds = ds.add_column("domain_labels", [i % 2 for i in range(len(ds))])
    args = make_args(tmp_path / "moe", max_steps=5, save_strategy="no")
    opt = build_optimizer(model, "adamw", lr=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator(),
                      optimizers=(opt, build_scheduler(opt, "constant", 5)))
    rec = Recorder()
    cur = RoutingCurriculumCallback(moe_dense_steps=2, moe_forced_steps=3, moe_forced_map={0: 0, 1: 1})
    add_callbacks(trainer, [cur, rec, RoutingMetricsCallback()])
    trainer.train()
    assert [rec.settings[s]["moe_dense"] for s in range(5)] == [True, True, False, False, False]
    assert [rec.settings[s]["moe_forced"] for s in range(5)] == [{0: 0, 1: 1}] * 3 + [None] * 2
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert "routing/moe_utilisation/block_0" in logged[-1]
    assert "routing/moe_tokens/block_0/expert_1" in logged[-1]
