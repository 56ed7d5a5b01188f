"""SGD with optional weight-decay exclusion, and a per-step learning-rate schedule with linear warm-up."""
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, wd_on_bn_bias: bool) -> list[dict]:
    """One group with decay; with ``wd_on_bn_bias=False`` a second without it for 1-d tensors (BN affine, biases)."""
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields a shared module's weights once
        if not p.requires_grad:
            continue
        (decay if wd_on_bn_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, t.weight_decay, t.wd_on_bn_bias), lr=t.lr, momentum=t.momentum,
                           nesterov=bool(t.nesterov and t.momentum > 0))


def lr_factor(step: int, steps_per_epoch: int, t) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    total = t.epochs * steps_per_epoch
    warmup = int(round(t.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if t.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if t.schedule == "linear":  # to zero: the best simple schedule for a fixed budget (Li et al., ICLR 2020)
        return 1.0 - progress
    epoch = step // steps_per_epoch
    return t.gamma ** sum(epoch >= m for m in t.milestones)


def build_scheduler(optimizer, t, steps_per_epoch: int):
    """LambdaLR stepped once per optimizer step; its state_dict (the step count) is what resume needs."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, t))
