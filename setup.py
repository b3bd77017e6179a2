"""Packaging for hydra_hf: `pip install -e .` (CPU core), extras `[gpu]`, `[quant]`, `[tensorboard]`, `[export]`,
`[executorch]`, `[dev]`."""

from setuptools import find_packages, setup

GPU = ["triton>=3.0", "liger-kernel>=0.5"]
QUANT = ["bitsandbytes>=0.45"]
TENSORBOARD = ["tensorboard>=2.15"]
# export: hydra-export and hydra_hf.export_hydra to ONNX (transformers' OnnxExporter, ONNX Runtime); executorch: the .pte
# format (it pulls torchao, which logs warnings at every `import transformers` on a CPU-only machine, so it is an extra
# of its own). dev takes both, so that CI runs tests/test_export.py.
EXPORT_REQUIRES = ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.20"]
EXECUTORCH_REQUIRES = ["executorch>=1.0"]

setup(
    name="hydra_hf",
    version="0.1.0",
    description="HYDRA (CCGQA latent attention + Mixture-of-Depths/Recursions/Experts) for Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hydra_hf", "hydra_hf.*"]) + ["hydra_hf.model_cards"],
    # the top-level model_cards/ folder (the card template hydra-train fills, one card per preset) ships as
    # package data so that an installed hydra-train finds the template
    package_dir={"hydra_hf.model_cards": "model_cards"},
    package_data={"hydra_hf.model_cards": ["*.md"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # The Cache API (cache_utils.Cache with layer objects) and the dataclass configs are 5.x. One codebase takes
        # `cache` (5.24+) and `past_key_values` (before); CI runs the suite on 5.25 (the newest release) and on the
        # 5.20 floor (`make test-floor`). The cap is 5.40, where transformers drops the old names' shims.
        "transformers>=5.20,<5.40",
        "accelerate>=1.0",
        "peft>=0.15",
        "datasets>=3.0",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "tqdm>=4.0",
    ],
    # The core install runs everything on CPU (the PyTorch reference ops) and the README's two commands. What a
    # CPU-only machine does not need is an extra; each import of these is guarded (nothing prints when one is
    # missing) and a feature that needs a missing extra stops with a message naming it:
    #   gpu          Triton kernels (kernel_backend "auto"/"triton" on CUDA) and Liger's RMSNorm / SwiGLU / fused
    #                cross-entropy (kernel_backend "liger", hydra-train --liger)
    #   quant        bitsandbytes: 8-bit AdamW (--optimizer adamw8bit) and 4/8-bit loading (BitsAndBytesConfig)
    #   tensorboard  report_to="tensorboard"
    #   dev          all of the above plus the test tools: the Triton kernels are tested on CPU under
    #                TRITON_INTERPRET=1; lm_eval: tests/test_evaluation.py runs the harness's `hf` model on HYDRA
    #                (docs/evaluation.md); trl: tests/test_finetuning.py trains HYDRA with TRL's SFTTrainer (its
    #                fused LM head is 1.x); bitsandbytes: the 4-bit loading / QLoRA test.
    extras_require={
        "gpu": GPU,
        "quant": QUANT,
        "tensorboard": TENSORBOARD,
        "dev": GPU + QUANT + TENSORBOARD + EXPORT_REQUIRES + EXECUTORCH_REQUIRES + ["pytest>=8.0", "lm_eval>=0.4.8", "trl>=1.16,<2"],
        "export": EXPORT_REQUIRES,
        "executorch": EXECUTORCH_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "hydra-train=hydra_hf.cli.train:main",
            "hydra-generate=hydra_hf.cli.generate:main",
            "hydra-report=hydra_hf.cli.report:main",
            "hydra-export=hydra_hf.cli.export:main",
        ]
    },
)
