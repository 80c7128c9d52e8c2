"""Learning-rate schedules, stepped once per optimiser update (not per batch, not per epoch).

Warm-up from ``WARMUP_LR`` to the (scaled) base LR over ``WARMUP_EPOCHS``, then cosine / linear / step /
multistep decay, all from timm's schedulers with ``t_in_epochs=False``. With gradient accumulation one update
spans ``ACCUMULATION_STEPS`` batches, so ``updates_per_epoch`` counts updates, and the schedule's length is the
same whatever the accumulation.
"""
from __future__ import annotations

import math

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from config import ConfigError

SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')


def updates_per_epoch(batches_per_epoch: int, accumulation_steps: int) -> int:
    """Optimiser updates in one epoch: the last, shorter accumulation group still makes an update."""
    return math.ceil(batches_per_epoch / max(1, accumulation_steps))


def build_scheduler(config, optimizer: torch.optim.Optimizer, n_updates_per_epoch: int,
                    base_lr: float, warmup_lr: float, min_lr: float) -> Scheduler:
    """Scheduler over ``TRAIN.EPOCHS * n_updates_per_epoch`` updates; call ``step_update(num_updates)``."""
    sched = config.TRAIN.LR_SCHEDULER
    name = sched.NAME.lower()
    num_steps = int(config.TRAIN.EPOCHS * n_updates_per_epoch)
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * n_updates_per_epoch)
    for group in optimizer.param_groups:
        group['lr'] = base_lr
        group['initial_lr'] = base_lr
    # With a warm-up prefix the decay spans the updates after warm-up (at least one, so short runs work).
    decay_steps = max(1, num_steps - warmup_steps if sched.WARMUP_PREFIX else num_steps)
    common = dict(warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if name == 'cosine':
        return CosineLRScheduler(
            optimizer,
            t_initial=decay_steps,
            lr_min=min_lr,
            cycle_limit=1,
            warmup_prefix=sched.WARMUP_PREFIX,
            **common,
        )
    if name == 'linear':
        return PolyLRScheduler(
            optimizer,
            t_initial=decay_steps,
            power=1.0,
            lr_min=min_lr,
            cycle_limit=1,
            warmup_prefix=sched.WARMUP_PREFIX,
            **common,
        )
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * n_updates_per_epoch),
                               decay_rate=sched.DECAY_RATE, warmup_prefix=sched.WARMUP_PREFIX, **common)
    if name == 'multistep':
        return MultiStepLRScheduler(optimizer, decay_t=[int(m * n_updates_per_epoch) for m in sched.MULTISTEPS],
                                    decay_rate=sched.GAMMA, warmup_prefix=sched.WARMUP_PREFIX, **common)
    raise ConfigError(f"unknown TRAIN.LR_SCHEDULER.NAME '{sched.NAME}'; choose one of: {', '.join(SCHEDULERS)}")
