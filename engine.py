"""The training and evaluation loops (one of each), taking explicit arguments and returning metric dicts.

- ``train_one_epoch``: gradient accumulation (DDP ``no_sync`` inside a group), native AMP, clipping, EMA,
  LR stepped per optimiser update, non-finite losses skipped on every rank together, and a cooperative stop
  (SIGTERM) checked at update boundaries so every rank stops at the same step.
- ``evaluate``: top-1/top-5/loss summed over every image exactly once across ranks (no per-batch averaging,
  no padded duplicates), so the figure does not depend on the process count or the batch size.
- ``throughput``: images/s of the forward pass, with AMP as configured.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.utils import AverageMeter

from distributed import all_reduce_sum, get_world_size
from utils import current_rss_mb, unwrap_model


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class TrainState:
    """Where training stands: survives checkpoints so a resumed run continues exactly."""
    epoch: int = 0                 # epoch being (or next to be) trained
    step_in_epoch: int = 0         # batches of ``epoch`` already consumed (per process)
    num_updates: int = 0           # optimiser updates so far (drives the LR schedule)
    max_accuracy: float = 0.0
    nonfinite_in_row: int = 0


@dataclass
class Precision:
    """Autocast settings: ``enabled`` False means plain float32."""
    device_type: str
    enabled: bool
    dtype: torch.dtype

    def autocast(self):
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, enabled=self.enabled)


def _memory_mb(device: torch.device) -> float:
    """Peak CUDA memory of this process, or its resident memory on CPU."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2**20
    return current_rss_mb()


def train_one_epoch(
        *,
        config,
        model: nn.Module,
        criterion: Callable,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler: torch.amp.GradScaler,
        precision: Precision,
        device: torch.device,
        state: TrainState,
        mixup_fn: Optional[Callable] = None,
        model_ema: Optional[nn.Module] = None,
        should_stop: Callable[[], bool] = lambda: False,
        logger: Optional[logging.Logger] = None,
) -> dict:
    """Train from ``state.step_in_epoch`` to the end of ``state.epoch`` (or until a stop is requested).

    Updates ``state`` in place. Returns ``{'loss', 'lr', 'skipped_images', 'nonfinite_steps', 'stopped',
    'time'}`` where ``loss`` is the mean over every sample seen by every rank.
    """
    model.train()
    accum = max(1, config.TRAIN.ACCUMULATION_STEPS)
    start = state.step_in_epoch
    n_batches = start + len(loader)             # batches in the whole epoch for this process
    clip = config.TRAIN.CLIP_GRAD or float('inf')
    batch_time, loss_meter, norm_meter = AverageMeter(), AverageMeter(), AverageMeter()
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)  # sum of losses, number of samples
    skipped_images, nonfinite_steps, stopped = 0, 0, False
    group_nonfinite = torch.zeros((), device=device)
    optimizer.zero_grad(set_to_none=True)
    t_epoch = t_batch = time.time()

    for i, (samples, targets, skipped) in enumerate(loader):
        idx = start + i
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        skipped_images += int(skipped.sum())
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        group_start = (idx // accum) * accum
        group_len = min(accum, n_batches - group_start)   # the last group of an epoch may be shorter
        is_update = idx + 1 == group_start + group_len
        sync = contextlib.nullcontext() if is_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with precision.autocast():
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            finite = torch.isfinite(loss)
            group_nonfinite += (~finite).float()
            scaler.scale(loss / group_len).backward()

        n = float(samples.shape[0])
        loss_sum += torch.stack([torch.where(finite, loss.detach().double() * n, 0.0), finite.double() * n])
        if not is_update:
            continue

        # One collective per update: how many ranks saw a non-finite loss, and how many were asked to stop.
        flags = all_reduce_sum(torch.stack([group_nonfinite.clamp(max=1), torch.tensor(float(should_stop()), device=device)]))
        group_nonfinite.zero_()
        if flags[0] > 0:
            optimizer.zero_grad(set_to_none=True)
            nonfinite_steps += 1
            state.nonfinite_in_row += 1
            if logger:
                logger.warning(f'non-finite loss at epoch {state.epoch} step {idx}: update skipped on every rank '
                               f'({state.nonfinite_in_row} in a row)')
            if state.nonfinite_in_row >= config.TRAIN.MAX_NONFINITE_STEPS:
                raise TrainingDiverged(f'{state.nonfinite_in_row} non-finite losses in a row at epoch {state.epoch}; '
                                       f'lower TRAIN.BASE_LR or enable TRAIN.CLIP_GRAD (the last good checkpoint is kept)')
            grad_norm = float('nan')
        else:
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))  # same on every rank
            if scaler.is_enabled():
                # float16: the scaler skips steps with inf/NaN gradients and lowers its scale (normal early on).
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                stepped = scaler.get_scale() >= scale
            elif math.isfinite(grad_norm):
                optimizer.step()
                stepped = True
            else:
                # A finite loss with non-finite gradients: skip, like a non-finite loss (all ranks agree,
                # since the gradients were all-reduced).
                stepped = False
                nonfinite_steps += 1
                state.nonfinite_in_row += 1
                if logger:
                    logger.warning(f'non-finite gradient at epoch {state.epoch} step {idx}: update skipped')
                if state.nonfinite_in_row >= config.TRAIN.MAX_NONFINITE_STEPS:
                    raise TrainingDiverged(f'{state.nonfinite_in_row} non-finite updates in a row at epoch '
                                           f'{state.epoch}; lower TRAIN.BASE_LR (the last good checkpoint is kept)')
            optimizer.zero_grad(set_to_none=True)
            if stepped:
                state.nonfinite_in_row = 0
                if model_ema is not None:
                    model_ema.update(unwrap_model(model), step=state.num_updates)
        state.num_updates += 1
        scheduler.step_update(state.num_updates)
        state.step_in_epoch = idx + 1

        if math.isfinite(loss.item()):
            loss_meter.update(loss.item(), targets.size(0))
        if math.isfinite(grad_norm):
            norm_meter.update(grad_norm)
        batch_time.update((time.time() - t_batch) / group_len)
        t_batch = time.time()

        if logger and ((idx // accum) % max(1, config.PRINT_FREQ // accum) == 0 or idx + 1 == n_batches):
            lr = optimizer.param_groups[0]['lr']
            eta = batch_time.avg * (n_batches - idx - 1)
            line = (f'Train: [{state.epoch}/{config.TRAIN.EPOCHS}][{idx + 1}/{n_batches}]\t'
                    f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t'
                    f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                    f'loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t'
                    f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})\t'
                    f'mem {_memory_mb(device):.0f}MB')
            logger.info(line)
        if flags[1] > 0:
            stopped = True
            break

    if not stopped:
        state.step_in_epoch = n_batches
    all_reduce_sum(loss_sum)
    skipped_t = all_reduce_sum(torch.tensor([skipped_images], device=device))
    return {
        'loss': float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float('nan'),
        'lr': optimizer.param_groups[0]['lr'],
        'skipped_images': int(skipped_t.item()),
        'nonfinite_steps': nonfinite_steps,
        'stopped': stopped,
        'time': time.time() - t_epoch,
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, precision: Precision,
             logger: Optional[logging.Logger] = None, header: str = 'Test', print_freq: int = 100) -> dict:
    """Top-1 / top-5 (percent) and mean cross-entropy over the whole validation set, summed across ranks."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@k, count
    t0 = time.time()
    for i, batch in enumerate(loader):
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with precision.autocast():
            output = model(images)
        output = output.float()
        k = min(5, output.shape[1])
        topk = output.topk(k, dim=1).indices                       # B, k
        hit = topk.eq(targets[:, None])
        sums += torch.stack([
            nn.functional.cross_entropy(output, targets, reduction='sum').double(),
            hit[:, 0].sum().double(),
            hit.any(dim=1).sum().double(),
            torch.tensor(float(targets.numel()), dtype=torch.float64, device=device),
        ])
        if logger and (i % print_freq == 0 or i + 1 == len(loader)):
            logger.info(f'{header}: [{i + 1}/{len(loader)}]')
    all_reduce_sum(sums)
    n = max(1.0, sums[3].item())
    stats = {'acc1': 100.0 * sums[1].item() / n, 'acc5': 100.0 * sums[2].item() / n, 'loss': sums[0].item() / n,
             'num_images': int(sums[3].item()), 'time': time.time() - t0}
    if logger:
        logger.info(f' * Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f}')
    return stats


@torch.no_grad()
def throughput(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device, precision: Precision,
               logger: logging.Logger, warmup: int = 50, repeats: int = 30) -> float:
    """Images per second of the forward pass on one batch (warm-up, then timed repeats, synchronised)."""
    model.eval()
    images = next(iter(loader))[0].to(device, non_blocking=True)
    batch = images.shape[0]
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    with precision.autocast():
        for _ in range(warmup):
            model(images)
        sync()
        logger.info(f'throughput averaged with {repeats} times')
        t0 = time.time()
        for _ in range(repeats):
            model(images)
        sync()
    value = repeats * batch / (time.time() - t0)
    logger.info(f'batch_size {batch} throughput {value:.2f} images/s '
                f'(world size {get_world_size()}, {"AMP " + str(precision.dtype) if precision.enabled else "float32"})')
    return value
