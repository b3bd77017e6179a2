"""Routing-curriculum schedules as pure ``step -> value`` functions.

Every function here depends only on its arguments (the optimizer step, the run length and
the curriculum's recorded gate step), never on hidden state, so a resumed run that restores
the gate step follows exactly the same curriculum as an uninterrupted one.

Steps are 0-based indices of the optimizer step *about to run*: at ``step`` the Trainer has
finished ``step`` updates (``TrainerState.global_step``).
"""

from __future__ import annotations

import math


def fraction_to_step(fraction: float, max_steps: int) -> int:
    """The first step at or after ``fraction`` of the run (``ceil(fraction * max_steps)``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"schedule fractions must be in [0, 1], got {fraction}")
    return int(math.ceil(fraction * max_steps))


def linear_ramp(step: int, start_step: int, end_step: int, start_value: float, end_value: float) -> float:
    """``start_value`` before ``start_step``, ``end_value`` from ``end_step``, linear in between."""
    if step <= start_step:
        return float(start_value)
    if step >= end_step:
        return float(end_value)
    t = (step - start_step) / max(1, end_step - start_step)
    return float(start_value + t * (end_value - start_value))


def mod_enabled_at(
    step: int,
    max_steps: int,
    off_fraction: float = 0.10,
    force_fraction: float = 0.175,
    gate_open_step: int | None = None,
) -> bool:
    """Mixture-of-Depths switch.

    Off for the first ``off_fraction`` of the run; between that and ``force_fraction`` it is on from the
    step the CE-loss gate opened (``gate_open_step``, recorded by the curriculum callback); from
    ``force_fraction`` on it is on regardless of the gate.
    """
    if force_fraction < off_fraction:
        raise ValueError(f"mod force_fraction ({force_fraction}) must be >= off_fraction ({off_fraction})")
    if step < fraction_to_step(off_fraction, max_steps):
        return False
    if step >= fraction_to_step(force_fraction, max_steps):
        return True
    return gate_open_step is not None and step >= gate_open_step


def mod_capacity_at(
    step: int,
    max_steps: int,
    target: float,
    start_value: float | None = None,
    start_fraction: float = 0.10,
    end_fraction: float = 0.30,
) -> float:
    """MoD capacity schedule: ``start_value`` -> ``target`` linearly over [start_fraction, end_fraction].

    With ``start_value=None`` the capacity is constant at ``target``.
    """
    if start_value is None:
        return float(target)
    return linear_ramp(
        step, fraction_to_step(start_fraction, max_steps), fraction_to_step(end_fraction, max_steps),
        start_value, target,
    )


def mor_setting_at(
    step: int,
    max_steps: int,
    start_fraction: float = 0.20,
    full_fraction: float = 0.30,
    target_capacity: float | list | None = None,
) -> tuple[bool, float | list | None]:
    """Mixture-of-Recursions ``(enabled, capacity)``.

    Before ``start_fraction``: ``(False, 1.0)`` - every token gets full depth. Between ``start_fraction``
    and ``full_fraction`` the router is on and the capacity ramps linearly from 1.0 down to
    ``target_capacity`` (a float, or a per-recursion list, ramped element-wise; ``None`` means the model's
    layer-aware default, which is ramped towards its mean 0.6 and handed over as ``None`` at the end).
    From ``full_fraction`` on: ``(True, target_capacity)``.
    """
    if full_fraction < start_fraction:
        raise ValueError(f"mor full_fraction ({full_fraction}) must be >= start_fraction ({start_fraction})")
    start = fraction_to_step(start_fraction, max_steps)
    end = fraction_to_step(full_fraction, max_steps)
    if step < start:
        return False, 1.0
    if step >= end:
        return True, target_capacity
    if isinstance(target_capacity, list):
        return True, [linear_ramp(step, start, end, 1.0, c) for c in target_capacity]
    goal = 0.6 if target_capacity is None else float(target_capacity)
    return True, linear_ramp(step, start, end, 1.0, goal)


def moe_dense_at(step: int, dense_steps: int = 0) -> bool:
    """MoE dense warmup: every expert sees every token for the first ``dense_steps`` steps."""
    return step < dense_steps


def moe_forced_at(step: int, forced_steps: int = 0, mapping: dict | None = None) -> dict | None:
    """Forced MoE routing (domain label -> expert) for the first ``forced_steps`` steps, then ``None``."""
    if mapping and step < forced_steps:
        return dict(mapping)
    return None


__all__ = [
    "fraction_to_step",
    "linear_ramp",
    "mod_enabled_at",
    "mod_capacity_at",
    "mor_setting_at",
    "moe_dense_at",
    "moe_forced_at",
]
