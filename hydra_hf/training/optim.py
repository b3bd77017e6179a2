"""Optimisers, parameter groups and LR schedules for training HYDRA with the stock Trainer.

`build_optimizer(model, name, ...)` returns a `torch.optim.Optimizer` and `build_scheduler(...)` a
transformers LR scheduler; hand both to the Trainer with `Trainer(..., optimizers=(opt, sched))`.

Optimisers (`OPTIMIZERS`):
- ``adamw``: `torch.optim.AdamW`, `fused=True` when every parameter is on CUDA (default).
- ``adamw8bit``: bitsandbytes `AdamW8bit` (CUDA; the `hydra_hf[quant]` extra; fails with a clear message naming
  the extra where bitsandbytes is missing or cannot run).
- ``adafactor``: transformers' `Adafactor` with an explicit LR (no relative step).
- ``lion``: `Lion` below (sign of an interpolated momentum; use ~3-10x smaller LR than AdamW).
- ``muon``: `torch.optim.Muon` for the 2-D weight matrices of the blocks and experts, AdamW for everything
  else (embeddings, norms, routers, convolutions, LM head), combined in one `MultiOptimizer`.

Parameter groups: no weight decay for norms, biases and embeddings (incl. the recursion embedding);
optional LR multipliers for routers (MoD/MoR routers and MoE gates) and experts.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "lion", "muon")
SCHEDULES = ("wsd", "cosine", "linear", "constant")


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    update = sign(beta1 * m + (1 - beta1) * g); p -= lr * (update + wd * p); m = beta2 * m + (1 - beta2) * g.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"Lion lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


class MultiOptimizer(Optimizer):
    """Several optimisers stepped as one (for Muon + AdamW).

    `param_groups` is the concatenation of the inner optimisers' group dicts (the same objects), so LR
    schedulers and callbacks that edit `group["lr"]` reach the inner optimisers. `state_dict()` holds one
    state dict per inner optimiser.
    """

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        first = next(p for o in self.optimizers for g in o.param_groups for p in g["params"])
        super().__init__([first], {})
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        self.defaults = dict(self.optimizers[0].defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict):
        if "optimizers" not in state_dict or len(state_dict["optimizers"]) != len(self.optimizers):
            raise ValueError("MultiOptimizer.load_state_dict: the state dict does not match this optimizer's parts")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"]):
            opt.load_state_dict(sd)
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):
        merged = {}
        for opt in getattr(self, "optimizers", []):
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value):  # set by Optimizer.__init__; the inner optimisers own the real state
        pass


# ---------------------------------------------------------------------------- parameter groups


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm weights, biases, embeddings (token, recursion) and other 1-D tensors get no weight decay."""
    lname = name.lower()
    return (
        param.ndim < 2
        or lname.endswith(".bias")
        or "norm" in lname
        or "embed" in lname
        or "recursion_embedding" in lname
    )


def is_router(name: str) -> bool:
    return "mod_routers" in name or "mor_routers" in name or (".gate." in name and "moe_blocks" in name)


def is_expert(name: str) -> bool:
    return ".experts." in name


def is_muon_matrix(name: str, param: torch.Tensor) -> bool:
    """2-D projection weights of the blocks and experts (not embeddings, LM head, routers, convs)."""
    return (
        param.ndim == 2
        and name.endswith("_proj.weight")
        and ("layers." in name or "experts." in name)
        and not is_router(name)
    )


def param_groups(model, lr: float, weight_decay: float, router_lr_scale: float = 1.0,
                 expert_lr_scale: float = 1.0, select=None) -> list[dict]:
    """Parameter groups keyed by (decay?, kind), each with its own `lr` and `weight_decay`.

    `select(name, param) -> bool` restricts the groups to some parameters. Tied weights appear once.
    """
    buckets: dict = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        if select is not None and not select(name, p):
            continue
        seen.add(id(p))
        kind = "router" if is_router(name) else "expert" if is_expert(name) else "base"
        decay = not is_no_decay(name, p)
        key = (kind, decay)
        if key not in buckets:
            scale = router_lr_scale if kind == "router" else expert_lr_scale if kind == "expert" else 1.0
            buckets[key] = {"params": [], "names": [], "lr": lr * scale,
                            "weight_decay": weight_decay if decay else 0.0, "group_name": f"{kind}_{'decay' if decay else 'no_decay'}"}
        buckets[key]["params"].append(p)
        buckets[key]["names"].append(name)
    return list(buckets.values())


def _strip(groups):
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def build_optimizer(
    model,
    name: str = "adamw",
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
    router_lr_scale: float = 1.0,
    expert_lr_scale: float = 1.0,
    fused: bool | None = None,
) -> Optimizer:
    """Build optimiser `name` (one of `OPTIMIZERS`) over `model`'s trainable parameters."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    kw = dict(lr=lr, weight_decay=weight_decay, router_lr_scale=router_lr_scale, expert_lr_scale=expert_lr_scale)
    params = [p for p in model.parameters() if p.requires_grad]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if name == "adamw":
        use_fused = on_cuda if fused is None else fused
        if use_fused and not on_cuda:
            raise ValueError("fused=True AdamW needs every parameter on CUDA; move the model first or leave fused=None")
        return torch.optim.AdamW(_strip(param_groups(model, **kw)), lr=lr, betas=tuple(betas), eps=eps,
                                 fused=use_fused or None)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ModuleNotFoundError as exc:
            raise RuntimeError("optimizer 'adamw8bit' needs bitsandbytes, which is not installed: "
                               "pip install 'hydra_hf[quant]'") from exc
        except Exception as exc:  # noqa: BLE001 - installed but broken: the same remedy, with the reason
            raise RuntimeError(f"optimizer 'adamw8bit' needs bitsandbytes, which failed to import ({exc}): "
                               "pip install 'hydra_hf[quant]'") from exc
        if not on_cuda:
            raise RuntimeError(
                "optimizer 'adamw8bit' (bitsandbytes AdamW8bit) needs the model on a CUDA GPU; on CPU use "
                "'adamw', 'adafactor' or 'lion'"
            )
        return bnb.optim.AdamW8bit(_strip(param_groups(model, **kw)), lr=lr, betas=tuple(betas), eps=eps)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(_strip(param_groups(model, **kw)), lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name == "lion":
        return Lion(_strip(param_groups(model, **kw)), lr=lr, betas=(betas[0], 0.99))
    # muon
    if not hasattr(torch.optim, "Muon"):
        raise RuntimeError(f"optimizer 'muon' needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    muon_groups = _strip(param_groups(model, select=is_muon_matrix, **kw))
    rest_groups = _strip(param_groups(model, select=lambda n, p: not is_muon_matrix(n, p), **kw))
    parts = []
    if muon_groups:
        parts.append(torch.optim.Muon(muon_groups, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"))
    if rest_groups:
        parts.append(torch.optim.AdamW(rest_groups, lr=lr, betas=tuple(betas), eps=eps))
    return MultiOptimizer(parts)


def build_scheduler(optimizer, name: str = "wsd", max_steps: int = 1000, warmup_steps: int = 0,
                    decay_fraction: float = 0.2, min_lr_ratio: float = 0.0):
    """LR schedule from transformers: ``wsd`` (warmup-stable-decay; the last `decay_fraction` of the run decays,
    cosine shape, to `min_lr_ratio` x LR), ``cosine`` (warmup then cosine to `min_lr_ratio` x LR), ``linear``,
    ``constant`` (after warmup)."""
    from transformers import get_scheduler
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule

    if name not in SCHEDULES:
        raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {name!r}")
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0 to build an LR schedule, got {max_steps}")
    if name == "wsd":
        if not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(f"decay_fraction must be in [0, 1], got {decay_fraction}")
        decay = int(round(decay_fraction * max_steps))
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup_steps, num_decay_steps=decay,
                                num_training_steps=max_steps, min_lr_ratio=min_lr_ratio)
    if name == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                                           num_training_steps=max_steps, min_lr_rate=min_lr_ratio)
    kind = "constant_with_warmup" if name == "constant" else name
    return get_scheduler(kind, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


__all__ = ["Lion", "MultiOptimizer", "OPTIMIZERS", "SCHEDULES", "build_optimizer", "build_scheduler",
           "param_groups", "is_no_decay", "is_router", "is_expert", "is_muon_matrix"]
