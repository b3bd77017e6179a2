"""Train a small HYDRA with the stock `transformers.Trainer` and the hydra_hf callbacks (runs on CPU).

    python examples/train_with_trainer.py --data path/to/text.txt --steps 200
"""

import argparse

import torch
from transformers import Trainer, TrainingArguments

from hydra_hf import HydraConfig, HydraForCausalLM
from hydra_hf.training import (BestCheckpointCallback, HealthCallback, RoutingCurriculumCallback,
                               RoutingMetricsCallback, SampleGenerationCallback, add_callbacks, build_optimizer,
                               build_scheduler, use_compact_progress)
from hydra_hf.training.data import (DataConfig, PackedCollator, build_datasets, load_or_train_tokenizer,
                                   save_tokenizer, special_token_ids)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="*", default=[], help="text/jsonl/parquet files (default: the stdlib corpus)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default="example-run")
    args = p.parse_args()

    data = DataConfig(sources=[{"path": d} for d in args.data] or [{"stdlib": True, "max_bytes": 1_000_000}],
                      block_size=128, eval_fraction=0.02)
    tok = load_or_train_tokenizer("bpe", data, vocab_size=1024, save_dir=f"{args.out}/tokenizer")
    train, val = build_datasets(data, tok)
    # BOS / EOS / PAD from the tokenizer: with the config agreeing, the Trainer has nothing to realign (and does
    # not warn "The tokenizer has new PAD/BOS/EOS tokens that differ from the model config")
    config = HydraConfig.from_preset("debug", vocab_size=len(tok), hidden_size=128, intermediate_size=384,
                                     mod_enabled=True, mor_enabled=True, **special_token_ids(tok))
    model = HydraForCausalLM(config)
    targs = TrainingArguments(args.out, max_steps=args.steps, per_device_train_batch_size=16, learning_rate=3e-3,
                              logging_steps=10, eval_strategy="steps", eval_steps=50, save_steps=50,
                              metric_for_best_model="eval_loss", label_names=["labels"], report_to="none",
                              dataloader_pin_memory=torch.cuda.is_available())  # pinning needs an accelerator
    opt = build_optimizer(model, "adamw", lr=targs.learning_rate)
    sched = build_scheduler(opt, "wsd", args.steps, warmup_steps=20, decay_fraction=0.3)
    trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=val, data_collator=PackedCollator(),
                      processing_class=tok, optimizers=(opt, sched))
    add_callbacks(trainer, [RoutingCurriculumCallback(), RoutingMetricsCallback(), HealthCallback(),
                            SampleGenerationCallback(["def "], every_steps=100), BestCheckpointCallback()])
    # console: a progress bar with loss / lr / tokens/s / MoD / depth instead of a dict of every metric per log
    use_compact_progress(trainer, log_file=f"{args.out}/log_history.jsonl")
    trainer.train()
    trainer.save_model(args.out)
    save_tokenizer(tok, args.out)  # a plain PreTrainedTokenizerFast


if __name__ == "__main__":
    main()
