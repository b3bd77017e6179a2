"""Console scripts: `hydra-train` (`train`), `hydra-generate` (`generate`), `hydra-report` (`report`),
`hydra-export` (`export`)."""

import logging

# bitsandbytes (hydra_hf[quant]) is imported by peft, which transformers imports with its Trainer whenever both are
# installed, and on CPUs with AVX512-BF16 that import logs "Failed to load CPU gemm_4bit_forward from
# kernels-community: No module named 'kernels'": an optional kernel for 4-bit matmuls on CPU. The command-line
# tools never run those (no 4-bit loading; 8-bit Adam needs CUDA), so the warning says nothing a user of theirs can
# act on: that one logger is quieted here. A core install (no [quant]) has no bitsandbytes to import at all.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
