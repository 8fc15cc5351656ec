"""AdamW with parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import OptimizerConfig, SchedulerConfig

NO_DECAY_SUFFIXES = ("A_base", "D_base", "dt_bias", "initial_state")
SELECTIVE_SUFFIXES = ("generator.proj.weight", "generator.a_up.weight")


def parameter_groups(model: torch.nn.Module, weight_decay: float, selective_lr_multiplier: float = 1.0) -> list[dict]:
    """Optimizer groups.  No weight decay for norms, biases, embeddings and the SSM's A base,
    D base, dt bias and learned initial state; the selective generators' weights get
    lr * selective_lr_multiplier (the key `lr_multiplier`).  Tied parameters appear once; empty
    groups are dropped."""
    groups = {"decay": [], "no_decay": [], "selective": []}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if name.endswith(SELECTIVE_SUFFIXES):
            groups["selective"].append(p)
        elif p.dim() < 2 or "embed" in name or name.endswith(NO_DECAY_SUFFIXES):
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    out = [{"name": "decay", "params": groups["decay"], "weight_decay": weight_decay, "lr_multiplier": 1.0},
           {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0, "lr_multiplier": 1.0},
           {"name": "selective", "params": groups["selective"], "weight_decay": weight_decay,
            "lr_multiplier": selective_lr_multiplier}]
    return [g for g in out if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW; with use_param_groups the groups above, else one group with weight decay for all."""
    if cfg.use_param_groups:
        groups = parameter_groups(model, cfg.weight_decay, cfg.selective_param_lr_multiplier)
    else:
        groups = [{"name": "all", "params": list({id(p): p for p in model.parameters()}.values()),
                   "weight_decay": cfg.weight_decay, "lr_multiplier": 1.0}]
    for g in groups:
        g["lr"] = cfg.learning_rate * g["lr_multiplier"]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, cfg: SchedulerConfig) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup from 0 over
    warmup_steps, then cosine or linear decay to min_lr_ratio at total_steps, or constant."""
    if step < cfg.warmup_steps:
        return step / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.name == "cosine" else 1.0 - progress
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, total_steps: int, cfg: SchedulerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))


class OptimizerStep:
    """One optimizer step: the gradient scaler (fp16 on CUDA), clipping, AdamW and the schedule.

    opt.backward(loss) per micro-batch, then opt.step(finite) -> the gradient norm, or None when
    the loss or the gradient was not finite (the step is skipped, the gradients dropped)."""

    def __init__(self, model: torch.nn.Module, ocfg: OptimizerConfig, scfg: SchedulerConfig, total_steps: int,
                 max_grad_norm: float, fp16: bool):
        self.model, self.max_grad_norm = model, max_grad_norm or float("inf")
        self.optimizer = build_optimizer(model, ocfg)
        self.scheduler = build_scheduler(self.optimizer, total_steps, scfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        # what the config decides for each group: everything but its parameters and the current lr
        self.configured = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]

    def restore(self, scheduler_state: dict, scaler_state: dict):
        """Continue from a checkpoint, once the optimizer's state (moments, step counts and the
        hyperparameters saved with them) is loaded: the schedule's position and the gradient
        scaler come from the checkpoint; the hyperparameters (learning rate, weight decay, betas,
        eps, multipliers, the schedule itself) are the config's again, so that a value changed on
        resume applies from the first resumed step.  Unchanged values give back exactly what was saved."""
        unknown = set(scheduler_state) - set(self.scheduler.state_dict())
        if unknown:
            raise ValueError(f"unknown scheduler state {sorted(unknown)}")
        for group, configured in zip(self.optimizer.param_groups, self.configured, strict=True):
            group.update(configured)
        base_lrs = [g["initial_lr"] for g in self.configured]
        step = scheduler_state["last_epoch"]
        lrs = [base * factor(step) for base, factor in zip(base_lrs, self.scheduler.lr_lambdas)]
        self.scheduler.load_state_dict({**scheduler_state, "base_lrs": base_lrs, "_last_lr": lrs})
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        if self.scaler.is_enabled() and scaler_state:     # (an fp16 run resumed from a bf16 one starts a new scale)
            self.scaler.load_state_dict(scaler_state)

    def backward(self, loss: torch.Tensor):
        self.scaler.scale(loss).backward()

    def step(self, finite: bool = True) -> float | None:
        norm = None
        if finite:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)   # a DTensor under FSDP
            finite = math.isfinite(norm) or self.scaler.is_enabled()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler.is_enabled():
                self.scaler.update()
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]
