"""Timing and FLOP-counting helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_flops_per_step(model, vocab: int, batch: int, block: int) -> float:
    """FLOPs of one training forward + backward with labels (matmuls and attention, counted by
    `torch.utils.flop_counter`; routed layers at the capacity they really ran at)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, vocab, (batch, block), generator=torch.Generator().manual_seed(0))
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=x, labels=x).loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())
