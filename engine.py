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
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from timm.utils import AverageMeter

from distributed import all_reduce_sum, get_rank, get_world_size
from lr_scheduler import ScheduleClock
from utils import current_rss_mb, derive_seed, seed_everything, unwrap_model


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


class _Lagged:
    """Device values read on the host one update later: each update queues a copy of them into pinned host memory
    behind a CUDA event, and the next update reads it after that event, so the host never waits for the step it
    has just queued (on the CPU the values are read at once)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == 'cuda'
        self.pending: Optional[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = None

    def push(self, values: torch.Tensor) -> None:
        if not self.cuda:
            self.pending = (values, None)
            return
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending = (host, event)

    def pop(self) -> Optional[list[float]]:
        """The values pushed last (None if nothing was), waiting only for the work queued before that push."""
        if self.pending is None:
            return None
        values, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return values.tolist()


def _poison_gradients_if(flag: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Where ``flag`` (a device bool) is set, make one gradient element NaN, so that the GradScaler's ``unscale_``
    finds the gradients non-finite and its step skips the update (and lowers the scale), with no host sync."""
    grad = next(p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None)
    grad.view(-1)[:1].add_(torch.where(flag, float('nan'), 0.).to(grad.dtype))


def _skip_step_if(flag: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
    """Make the coming ``optimizer.step()`` (no GradScaler) a no-op where ``flag`` (a device bool) is set: on the
    device for a fused optimizer (its ``found_inf``, the protocol GradScaler uses; cleared after the step), else by
    dropping the gradients, which needs the host to read the flag (one sync)."""
    if optimizer.defaults.get('fused'):
        optimizer.found_inf = flag.float()
        optimizer.grad_scale = None
    elif flag.item():
        optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
        *,
        config,
        model: nn.Module,
        criterion: Callable,
        loader: Iterable,
        optimizer: torch.optim.Optimizer,
        scheduler,
        scaler: torch.amp.GradScaler,
        precision: Precision,
        device: torch.device,
        state: TrainState,
        clock: Optional[ScheduleClock] = None,
        mixup_fn: Optional[Callable] = None,
        model_ema: Optional[nn.Module] = None,
        should_stop: Callable[[], bool] = lambda: False,
        logger: Optional[logging.Logger] = None,
) -> dict:
    """Train from ``state.step_in_epoch`` to the end of ``state.epoch`` (or until a stop is requested).

    ``loader`` yields ``(images, targets, skipped)`` for the batches of the epoch from ``state.step_in_epoch`` on;
    ``clock`` places the LR schedule and the accumulation groups in the whole epoch (default: ``loader`` is the
    whole epoch). Only full accumulation groups make updates (as in the official loops). Before every batch the
    main process's RNGs are reseeded from (seed, rank, epoch, batch), so mixup and drop path draw the same numbers
    after a resume as in an uninterrupted run.

    No host-device synchronisation per update: whether an update is skipped (a non-finite loss on any rank, or a
    non-finite gradient) is decided on the device; the flags every rank must agree on (stop requested, updates
    skipped in a row) are all-reduced on the device and read on the host one update later (``_Lagged``), so every
    rank stops, or gives up on a diverging run, at the same update. Metrics stay on the device until printed.

    Updates ``state`` in place. Returns ``{'loss', 'lr', 'skipped_images', 'nonfinite_steps', 'stopped',
    'time'}`` where ``loss`` is the mean over every sample seen by every rank (None if no sample had a finite loss).
    """
    model.train()
    accum = config.TRAIN.ACCUMULATION_STEPS
    start = state.step_in_epoch
    if clock is None:
        clock = ScheduleClock(start + len(loader), accum, config.TRAIN.LR_SCHEDULER.T_IN_BATCHES)
    n_batches = clock.batches_per_epoch
    clip = config.TRAIN.CLIP_GRAD or float('inf')
    rank = get_rank()
    batch_time = AverageMeter()
    # On the device: [sum of loss x samples, samples] over the epoch, and the latest / summed finite grad norms.
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    shown = torch.zeros(4, dtype=torch.float64, device=device)  # loss of the last update, grad norm, its sum, count
    # Skipped updates: in a row (as the checkpoint left it) and in this epoch.
    nonfinite = torch.tensor([float(state.nonfinite_in_row), 0.], dtype=torch.float64, device=device)
    skipped_images, stopped = torch.zeros((), dtype=torch.int64), False
    group_nonfinite = torch.zeros((), device=device)
    lagged = _Lagged(device)
    optimizer.zero_grad(set_to_none=True)
    t_epoch = t_batch = time.time()

    def check(flags: Optional[list[float]], at: int) -> bool:
        """The agreed flags of an earlier update: raise if the run diverges; whether to stop."""
        if flags is None:
            return False
        in_row, stop = int(flags[0]), flags[1] > 0
        if in_row >= config.TRAIN.MAX_NONFINITE_STEPS:
            raise TrainingDiverged(f'{in_row} non-finite losses or gradients in a row at epoch {state.epoch} step '
                                   f'{at}; lower TRAIN.BASE_LR or enable TRAIN.CLIP_GRAD (the last good checkpoint '
                                   f'is kept)')
        return stop

    for i, (samples, targets, skipped) in enumerate(loader):
        idx = start + i
        if idx >= clock.batches_used:  # the epoch's last, partial accumulation group makes no update
            break
        seed_everything(derive_seed(config.SEED, rank, state.epoch, idx))
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        skipped_images += skipped.sum().long()  # the loader's CPU tensors: read once, at the end
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        is_update = (idx + 1) % accum == 0
        sync = contextlib.nullcontext() if is_update or not hasattr(model, 'no_sync') else model.no_sync()
        with sync:
            with precision.autocast():
                outputs = model(samples)
            loss = criterion(outputs.float(), targets)
            finite = torch.isfinite(loss)
            group_nonfinite += (~finite).float()
            scaler.scale(loss / accum).backward()

        n = float(samples.shape[0])
        loss_sum += torch.stack([torch.where(finite, loss.detach().double() * n, 0.0), finite.double() * n])
        if not is_update:
            continue

        # One collective per update, on the device: a non-finite loss on any rank, and a stop asked of any rank.
        agreed = all_reduce_sum(torch.stack([group_nonfinite.clamp(max=1),
                                             group_nonfinite.new_full((), float(should_stop()))]))
        group_nonfinite.zero_()
        bad_loss = agreed[0] > 0  # then no rank updates
        if scaler.is_enabled():
            _poison_gradients_if(bad_loss, optimizer)
        # The gradients are all-reduced (DDP): their norm is the same on every rank. float16: unscale first, so an
        # overflow shows as a non-finite norm (the scaler then skips the step and lowers its scale).
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        finite_grad = torch.isfinite(grad_norm)
        # Skipped for a non-finite loss, or (without a scaler, for which an overflow is normal) gradient.
        skipped = bad_loss | (~finite_grad if not scaler.is_enabled() else torch.zeros_like(bad_loss))
        if not scaler.is_enabled():
            _skip_step_if(skipped, optimizer)
        scaler.step(optimizer)
        scaler.update()
        for key in ('found_inf', 'grad_scale'):
            optimizer.__dict__.pop(key, None)
        optimizer.zero_grad(set_to_none=True)
        # Skipped updates in a row (a float16 overflow leaves the count as it is) and in the epoch.
        in_row = torch.where(skipped, nonfinite[0] + 1, torch.where(finite_grad, 0., nonfinite[0]))
        nonfinite.copy_(torch.stack([in_row, nonfinite[1] + skipped.double()]))
        norm = grad_norm.double()
        good = finite_grad & ~skipped
        shown[1:] = torch.where(good, torch.stack([norm, shown[2] + norm, shown[3] + 1]), shown[1:])
        if model_ema is not None:
            # Every update, as timm's train.py does: after a skipped one it moves towards the unchanged weights.
            model_ema.update(unwrap_model(model), step=state.num_updates)
        shown[0] = loss.detach().double()
        state.num_updates += 1
        scheduler.step_update(clock.step_after(state.epoch, idx))
        state.step_in_epoch = idx + 1
        stop_now = check(lagged.pop(), idx)  # the previous update's flags
        lagged.push(torch.stack([nonfinite[0], agreed[1].double()]))

        batch_time.update((time.time() - t_batch) / accum)
        t_batch = time.time()
        if logger and ((idx // accum) % max(1, config.PRINT_FREQ // accum) == 0 or idx + 1 == clock.batches_used):
            loss_now, norm_now, norm_sum, norm_count = shown.tolist()
            epoch_loss, epoch_count = loss_sum.tolist()
            lr = optimizer.param_groups[0]['lr']
            eta = batch_time.avg * (clock.batches_used - idx - 1)
            line = (f'Train: [{state.epoch}/{config.TRAIN.EPOCHS}][{idx + 1}/{n_batches}]\t'
                    f'eta {datetime.timedelta(seconds=int(eta))} lr {lr:.6f}\t'
                    f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                    f'loss {loss_now:.4f} ({epoch_loss / max(epoch_count, 1.0):.4f})\t'
                    f'grad_norm {norm_now:.4f} ({norm_sum / max(norm_count, 1.0):.4f})\t'
                    f'mem {_memory_mb(device):.0f}MB')
            logger.info(line)
        if stop_now:
            stopped = True
            break

    if not stopped:
        # The last update's flags: a stop asked during it stops after the epoch (main.py checks again).
        check(lagged.pop(), state.step_in_epoch - 1)
        state.step_in_epoch = n_batches
    state.nonfinite_in_row = int(nonfinite[0].item())
    nonfinite_steps = int(nonfinite[1].item())
    totals = all_reduce_sum(torch.cat([loss_sum, loss_sum.new_full((1,), float(skipped_images.item()))])).tolist()
    return {
        'loss': totals[0] / totals[1] if totals[1] > 0 else None,
        'lr': optimizer.param_groups[0]['lr'],
        'skipped_images': int(totals[2]),
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
        # Device-side sums (no host synchronisation per batch).
        sums[0] += nn.functional.cross_entropy(output, targets, reduction='sum').double()
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(dim=1).sum()
        sums[3] += targets.numel()
        if logger and (i % print_freq == 0 or i + 1 == len(loader)):
            logger.info(f'{header}: [{i + 1}/{len(loader)}]')
    loss, correct1, correct5, count = all_reduce_sum(sums).tolist()
    n = max(1.0, count)
    stats = {'acc1': 100.0 * correct1 / n, 'acc5': 100.0 * correct5 / n, 'loss': loss / n, 'num_images': int(count),
             'time': time.time() - t0}
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
