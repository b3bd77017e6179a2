"""Training through the stock `transformers.Trainer`: curriculum, resume, best checkpoint, health, optimisers."""

import json
import logging
import math

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.testing_utils import CaptureLogger

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


def write_history(trainer, out):
    """What hydra-train writes for hydra-report: the log history as JSON lines."""
    with open(out / "log_history.jsonl", "w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")


def test_frozen_norms_are_reported_in_logs_health_file_and_report(tmp_path):
    """The seed project's failure: every RMSNorm frozen with requires_grad=False. Reported by group ("norms",
    trainable: no) in log_history, health.json and the report's Health section, and as a warning."""
    from hydra_hf.cli.report import build_report

    model = make_model()
    norms = [n for n, m in model.named_modules() if type(m).__name__ == "HydraRMSNorm"]
    for name in norms:
        model.get_submodule(name).weight.requires_grad_(False)
    out = tmp_path / "norms"
    trainer = Trainer(model=model, args=make_args(out, max_steps=3, save_strategy="no"), train_dataset=make_dataset(),
                      data_collator=PackedCollator())
    health = HealthCallback(frozen_check_steps=2)
    add_callbacks(trainer, [RoutingMetricsCallback(), health])
    with CaptureLogger(logging.getLogger("hydra_hf.training")) as captured:
        trainer.train()
    assert "requires_grad=False" in captured.out and "norms: 5 of 5" in captured.out
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["health/frozen/norms"] == len(norms) == 5
    assert not any(k.startswith("health/frozen/") and k != "health/frozen/norms" for k in logs[0])

    record = json.loads((out / "health.json").read_text())
    (entry,) = record["parameters"]["requires_grad_false"]
    assert entry["group"] == "norms" and entry["trainable"] is False and entry["count"] == entry["of"] == 5
    assert sorted(entry["names"]) == sorted(f"{n}.weight" for n in norms)
    assert record["parameters"]["not_updating"] == [] and record["parameters"]["not_updating_checked"]
    assert record["alerts"] == ["norms: 5 of 5 parameters have requires_grad=False"]

    write_history(trainer, out)
    report = open(build_report(str(out))).read()
    health_part = report.split("## Health", 1)[1]
    assert "norms: 5 of 5 parameters have requires_grad=False" in health_part
    assert "| norms | no | requires_grad=False | 5 of 5 | `model.layers.0.input_layernorm.weight`, " in health_part
    assert "(+2 more) |" in health_part


def test_parameter_left_out_of_the_optimizer_is_reported_by_group(tmp_path):
    model = make_model()
    params = [p for n, p in model.named_parameters() if n != "model.layers.0.self_attn.q_proj.weight"]
    out = tmp_path / "lr0"
    trainer = Trainer(model=model, args=make_args(out, max_steps=2, save_strategy="no"), train_dataset=make_dataset(),
                      data_collator=PackedCollator(), optimizers=(torch.optim.AdamW(params, lr=1e-3), None))
    add_callbacks(trainer, [HealthCallback(frozen_check_steps=2)])
    trainer.train()
    record = json.loads((out / "health.json").read_text())
    (entry,) = record["parameters"]["not_updating"]
    assert (entry["group"], entry["trainable"], entry["names"]) == (
        "attention", True, ["model.layers.0.self_attn.q_proj.weight"])
    assert record["alerts"] == ["attention: 1 of 18 trainable parameters did not change in 2 steps"]
    assert [e for e in trainer.state.log_history if "loss" in e][-1]["health/not_updating/attention"] == 1.0


def test_parameter_groups():
    from hydra_hf.training import parameter_group

    model = make_model(moe_enabled=True, moe_num_layers=1, tie_word_embeddings=False)
    modules = dict(model.named_modules())
    groups = {n: parameter_group(n, modules.get(n.rpartition(".")[0])) for n, _ in model.named_parameters()}
    expected = {
        "model.embed_tokens.weight": "embeddings", "lm_head.weight": "embeddings",
        "model.recursion_embedding": "embeddings", "model.layers.0.self_attn.q_seq_conv": "attention",
        "model.layers.0.self_attn.o_proj.weight": "attention", "model.layers.1.mlp.down_proj.weight": "mlp",
        "model.layers.0.input_layernorm.weight": "norms", "model.moe_blocks.0.norm.weight": "norms",
        "model.norm.weight": "norms", "model.mod_routers.0.proj.weight": "routers",
        "model.mor_routers.0.proj.bias": "routers", "model.moe_blocks.0.gate.weight": "routers",
        "model.moe_blocks.0.experts.1.up_proj.weight": "experts",
    }
    assert {n: groups[n] for n in expected} == expected
    assert "other" not in groups.values()
    assert parameter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "adapters"
    assert parameter_group("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == "attention"


def test_collapsed_router_is_reported_in_logs_health_file_and_report(tmp_path):
    """MoD and MoR routers whose inference rule (logit > 0, raw logits with router_threshold_momentum=0) keeps
    every token / sends every token to the last recursion: the evaluation logs count them, health.json and the
    report name them as still collapsed; training's top-k (capacity 0.75 / 0.5) does not collapse."""
    from hydra_hf.cli.report import build_report

    model = make_model(router_threshold_momentum=0.0)
    with torch.no_grad():
        for router in model.model.mod_routers:
            router.proj.bias.fill_(50.0)  # every token selected
        for router in model.model.mor_routers:
            router.proj.bias.fill_(50.0)  # every token continues: all at depth 2
    out = tmp_path / "collapsed"
    args = make_args(out, max_steps=2, save_strategy="no", eval_strategy="steps", eval_steps=2, learning_rate=1e-4)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), eval_dataset=make_dataset(16, seed=1),
                      data_collator=PackedCollator())
    cur = RoutingCurriculumCallback(mod_off_fraction=0.0, mod_force_fraction=0.0, mor_start_fraction=0.0,
                                    mor_full_fraction=0.0, mor_capacity=0.5, mod_loss_gate=100.0)
    add_callbacks(trainer, [cur, RoutingMetricsCallback(), HealthCallback(frozen_check_steps=0)])
    trainer.train()
    (evaluation,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert evaluation["eval_routing/mod_fraction/layer_1"] == 1.0
    assert evaluation["eval_health/collapsed_routers"] == 4.0  # MoD layers 1 and 3, MoR blocks 0 and 1
    assert all(e["health/collapsed_routers"] == 0.0 for e in trainer.state.log_history if "loss" in e)  # top-k

    record = json.loads((out / "health.json").read_text())
    collapsed = {(e["router"], e["mode"]): e for e in record["collapsed_routers"]}
    assert set(collapsed) == {("MoD layer 1", "eval"), ("MoD layer 3", "eval"), ("MoR block 0", "eval"),
                              ("MoR block 1", "eval")}
    assert collapsed[("MoD layer 1", "eval")]["what"] == "selects every token"
    assert collapsed[("MoR block 0", "eval")]["what"] == "sends every token to depth 2"
    assert all(e["collapsed_now"] and e["first_step"] == e["last_step"] == 2 for e in collapsed.values())
    assert len(record["alerts"]) == 4 and all("still at step 2" in a for a in record["alerts"])

    write_history(trainer, out)
    health_part = open(build_report(str(out))).read().split("## Health", 1)[1]
    assert "| MoD layer 1 | eval | selects every token | 1.000 | 2 | 2 | 1 | still collapsed |" in health_part
    assert "| MoR block 1 | eval | sends every token to depth 2 |" in health_part


def test_collapse_rules():
    """Unit check of the all-or-nothing rules on summaries (MoE included), with the switches that make all / none
    legitimate: MoD off or at capacity 1, MoR off or at capacity 1, MoE dense warmup or forced routing."""
    from types import SimpleNamespace

    from hydra_hf.routing_hydra import RoutingState

    health = HealthCallback()
    config = SimpleNamespace(num_experts_per_tok=1)

    def found(summary, **state):
        model = SimpleNamespace(routing_state=RoutingState(**state), config=config)
        return sorted((router, what) for _, router, what, _ in health._collapses(summary, model))

    summary = {"routing/mod_fraction/layer_1": 1.0, "routing/mod_fraction/layer_3": 0.005,
               "routing/mod_fraction/layer_5": 0.5, "routing/mor_depth_hist/block_0": [0.0, 0.995],
               "routing/mor_depth_hist/block_1": [0.3, 0.7], "routing/mor_depth_hist/block_2": [1.0, 0.0],
               "routing/moe_tokens/block_0": [40.0, 0.0, 0.0], "routing/moe_tokens/block_1": [30.0, 9.0, 1.0]}
    moe = ("MoE block 0", "sends every token to expert(s) 0")
    everything = [("MoD layer 1", "selects every token"), ("MoD layer 3", "selects no token"), moe,
                  ("MoR block 0", "sends every token to depth 2"), ("MoR block 2", "sends every token to depth 1")]
    assert found(summary, mod_enabled=True, mor_enabled=True, mor_capacity=0.5) == everything
    assert found(summary, mod_enabled=True, mod_capacity=1.0, mor_enabled=True, mor_capacity=None) == [
        e for e in everything if e[0] != "MoD layer 1"]
    # MoR at capacity 1: every token at full depth (block 0) is expected, every token at depth 1 (block 2) is not
    assert found(summary, mor_enabled=True, mor_capacity=[1.0]) == [moe, ("MoR block 2", "sends every token to depth 1")]
    assert found(summary) == [moe]  # MoD and MoR off
    assert found(summary, moe_dense=True) == found(summary, moe_forced={0: 0}) == []
    config.num_experts_per_tok = 2  # top-2 of 3: the 2 busiest experts get every slot of block 0 and 97.5% of block 1
    assert found(summary) == [("MoE block 0", "sends every token to expert(s) 0, 1")]


class FakeState:
    def __init__(self):
        self.global_step, self.log_history, self.is_world_process_zero, self.stateful_callbacks = 0, [], True, {}


def test_spikes_and_grad_norm_outliers_are_logged_and_recorded(tmp_path):
    """Without the LR cooldown (spike_cooldown_steps=0) a spike is still recorded; a logged grad_norm far above the
    median of the previous ones is an outlier; both counted in the logs and listed in health.json."""
    health = HealthCallback(frozen_check_steps=0, spike_window=10)
    args, state = TrainingArguments(str(tmp_path), report_to="none", use_cpu=True), FakeState()

    class Probe:
        value = 1.0

        def step_value(self, step):
            return (self.value, 0.0)

    health._probe = Probe()
    norms = [1.0, 1.1, 0.9, 1.0, 1.05, 1.0, 12.0, 1.0]
    losses = [1.0, 1.01, 1.02, 1.0, 1.01, 1.02, 1.0, 9.0]
    for step, (norm, loss) in enumerate(zip(norms, losses), start=1):
        state.global_step = step
        health._probe.value = loss
        health.on_step_end(args, state, None, optimizer=None)
        logs = {"loss": loss, "grad_norm": norm, "step": step}
        state.log_history.append(dict(logs))
        health.on_log(args, state, None, logs=logs)
    assert state.log_history[-1]["health/grad_norm_outliers"] == 1.0 and state.log_history[-1]["health/spikes"] == 1.0
    assert state.log_history[-3]["health/grad_norm_outliers"] == 0.0
    record = json.loads((tmp_path / "health.json").read_text())
    assert record["grad_norm_outliers"] == [{"step": 7, "grad_norm": 12.0, "median": 1.0}]
    assert [(s["step"], s["loss"]) for s in record["loss_spikes"]] == [(8, 9.0)]
    assert record["alerts"] == ["1 loss spike(s), steps 8", "1 gradient-norm outlier(s), steps 7"]
    assert health.cooldown_left == 0  # recorded only


def test_healthy_run_reports_nothing_alarming(tmp_path):
    """MoD + MoR + MoE from the first step, evaluations every 4 steps: no frozen or idle parameter, no spike, no
    outlier, no collapsed router (routers' running thresholds follow the top-k boundary of the last batch)."""
    from hydra_hf.cli.report import build_report

    torch.manual_seed(0)
    model = HydraForCausalLM(make_config(moe_enabled=True, moe_num_layers=1, router_threshold_momentum=1.0))
    out = tmp_path / "healthy"
    args = make_args(out, max_steps=12, save_strategy="no", eval_strategy="steps", eval_steps=4)
    trainer = Trainer(model=model, args=args, train_dataset=make_dataset(), eval_dataset=make_dataset(16, seed=1),
                      data_collator=PackedCollator())
    cur = RoutingCurriculumCallback(mod_off_fraction=0.0, mod_force_fraction=0.0, mor_start_fraction=0.0,
                                    mor_full_fraction=0.0, mor_capacity=0.5, mod_loss_gate=100.0)
    health = HealthCallback(frozen_check_steps=4, frozen_action="raise")
    add_callbacks(trainer, [cur, RoutingMetricsCallback(), health])
    trainer.train()
    record = json.loads((out / "health.json").read_text())
    assert record["alerts"] == [], record["alerts"]
    assert record["parameters"]["requires_grad_false"] == record["parameters"]["not_updating"] == []
    assert record["parameters"]["not_updating_checked"]
    assert record["loss_spikes"] == record["grad_norm_outliers"] == record["collapsed_routers"] == []
    for e in trainer.state.log_history:
        assert e.get("health/collapsed_routers", 0.0) == e.get("eval_health/collapsed_routers", 0.0) == 0.0
        assert not any(k.startswith(("health/frozen/", "health/not_updating/")) for k in e)
    assert sum("eval_health/collapsed_routers" in e for e in trainer.state.log_history) == 3
    write_history(trainer, out)
    health_part = open(build_report(str(out))).read().split("## Health", 1)[1]
    assert health_part.strip().startswith("No alerts") and "###" not in health_part.split("## Plots")[0]


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
