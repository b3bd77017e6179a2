"""Quickstart: build a HYDRA model, save it as safetensors, load it back through the Auto
classes and generate. Runs offline on CPU in seconds.

    python examples/quickstart.py [--preset debug] [--out out/quickstart]
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

import hydra_hf
from hydra_hf import HydraConfig, HydraForCausalLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug", choices=hydra_hf.PRESET_NAMES)
    parser.add_argument("--out", default="out/quickstart")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = HydraConfig.from_preset(args.preset, vocab_size=512, mod_enabled=True, mor_enabled=True)
    model = HydraForCausalLM(config)
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{config.num_unique_blocks} blocks x {config.mor_recursions} recursions")
    model.save_pretrained(args.out)
    loaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        same = torch.equal(model.eval()(prompt).logits, loaded(prompt).logits)
        tokens = loaded.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    print(f"saved to {args.out}; reloaded logits identical: {same}")
    print("generated ids:", tokens[0].tolist())
    print("routing:", {k: v for k, v in loaded.routing_summary().items() if "mean" in k})


if __name__ == "__main__":
    main()
