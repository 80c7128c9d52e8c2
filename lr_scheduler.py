"""Learning-rate schedules, placed and stepped exactly where the official training loops place and step them.

Warm-up from ``WARMUP_LR`` to the (scaled) base LR over ``WARMUP_EPOCHS``, then cosine / linear / step / multistep
decay, with timm's schedulers (``t_in_epochs=False``). Both official loops call ``step_update(t)`` right after the
optimiser update made at batch ``idx`` of ``epoch``, so update ``u + 1`` runs at the schedule's value at ``t(u)`` and
the first update at its value at 0. What ``t`` counts differs (``ScheduleClock``):

* MG-SSAF (and Swin): optimiser updates, ``t = (epoch * batches + idx) // accumulation`` on a schedule of
  ``batches // accumulation`` steps per epoch;
* MSG-Transformer: batches, ``t = epoch * batches + idx`` on a schedule of ``batches`` steps per epoch
  (``TRAIN.LR_SCHEDULER.T_IN_BATCHES``). Without accumulation the two are the same.

Both loops update only after full accumulation groups: the last ``batches % accumulation`` batches of an epoch make
no update (the official loops compute them and drop their gradients; we skip them).

The decay shapes, as in the official ``lr_scheduler.py`` files:

* ``cosine``: over all steps from 0 (MSG-Transformer), or with ``WARMUP_PREFIX`` over the steps after warm-up
  (MG-SSAF);
* ``linear``: from the base LR at the end of warm-up to ``LINEAR_END_RATE`` x base LR at the last step
  (``TRAIN.MIN_LR`` is not used, as in the official code);
* ``step`` / ``multistep``: milestones counted from step 0, warm-up included.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

from config import SCHEDULERS, ConfigError

LINEAR_END_RATE = 0.01  # the official LinearLRScheduler's lr_min_rate


@dataclass(frozen=True)
class ScheduleClock:
    """Where an epoch's batches put the schedule.

    Args:
        batches_per_epoch: batches per process in a full epoch.
        accumulation: batches per optimiser update.
        in_batches: the schedule counts batches (MSG-Transformer's official loop) instead of updates.
    """
    batches_per_epoch: int
    accumulation: int = 1
    in_batches: bool = False

    @property
    def updates_per_epoch(self) -> int:
        """Full accumulation groups only (see the module docstring)."""
        return self.batches_per_epoch // self.accumulation

    @property
    def batches_used(self) -> int:
        """Batches per epoch that take part in an update."""
        return self.updates_per_epoch * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch if self.in_batches else self.updates_per_epoch

    def step_after(self, epoch: int, batch_idx: int) -> int:
        """The schedule position the official loop steps to after the update made at ``batch_idx`` of ``epoch``."""
        t = epoch * self.batches_per_epoch + batch_idx
        return t if self.in_batches else t // self.accumulation

    def position_of_update(self, update: int) -> Optional[int]:
        """The schedule position at which update ``update`` (0-based over the whole run) is made: where the loop
        stepped after the update before it; None for the first update (the schedule's initial value)."""
        if update == 0:
            return None
        epoch, j = divmod(update - 1, self.updates_per_epoch)
        return self.step_after(epoch, (j + 1) * self.accumulation - 1)

    def step_before(self, epoch: int, batches_done: int) -> Optional[int]:
        """The position the schedule stands at when ``batches_done`` batches of ``epoch`` are done (a resume point),
        i.e. ``step_after`` of the last update before it; None before the first update of training."""
        updates_done = min(batches_done, self.batches_used) // self.accumulation
        if updates_done:
            return self.step_after(epoch, updates_done * self.accumulation - 1)
        if epoch == 0:
            return None
        return self.step_after(epoch - 1, self.batches_used - 1)


def build_scheduler(config, optimizer: torch.optim.Optimizer, clock: ScheduleClock,
                    base_lr: float, warmup_lr: float, min_lr: float) -> Scheduler:
    """The configured schedule over ``TRAIN.EPOCHS * clock.steps_per_epoch`` steps; call ``step_update(t)``."""
    sched = config.TRAIN.LR_SCHEDULER
    name = sched.NAME.lower()
    steps = clock.steps_per_epoch
    num_steps = int(config.TRAIN.EPOCHS * steps)
    warmup_steps = int(config.TRAIN.WARMUP_EPOCHS * steps)
    for group in optimizer.param_groups:
        group['lr'] = base_lr
        group['initial_lr'] = base_lr
    common = dict(warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if name == 'cosine':
        return CosineLRScheduler(
            optimizer,
            t_initial=max(1, num_steps - warmup_steps) if sched.WARMUP_PREFIX else num_steps,
            lr_min=min_lr,
            cycle_limit=1,
            warmup_prefix=sched.WARMUP_PREFIX,
            **common,
        )
    if name == 'linear':
        return PolyLRScheduler(
            optimizer,
            t_initial=max(1, num_steps - warmup_steps),
            power=1.0,
            lr_min=LINEAR_END_RATE * base_lr,
            cycle_limit=1,
            warmup_prefix=True,  # the decay starts at the end of warm-up and ends at the last step
            **common,
        )
    if name == 'step':
        return StepLRScheduler(optimizer, decay_t=int(sched.DECAY_EPOCHS * steps), decay_rate=sched.DECAY_RATE,
                               warmup_prefix=False, **common)
    if name == 'multistep':
        milestones = [m * steps for m in sched.MULTISTEPS]
        # timm counts a milestone m as passed at step m - 1 (bisect on t + 1); the official code at step m.
        return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in milestones], decay_rate=sched.GAMMA,
                                    warmup_prefix=False, **common)
    raise ConfigError(f"unknown TRAIN.LR_SCHEDULER.NAME '{sched.NAME}'; choose one of: {', '.join(SCHEDULERS)}")
