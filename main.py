"""Train or evaluate MSG-Transformer / MG-SSAF on ImageNet-style folders.

    torchrun --nproc_per_node 8 main.py --cfg configs/msg_tiny_p4_win7_224.yaml --data-path <imagenet>
    python -m torch.distributed.launch --nproc_per_node 8 main.py --cfg ... --data-path ...   (official form)
    python main.py --cfg ... --data-path ... --eval --resume <ckpt>                            (one process)

This file is the command line and the wiring; the loops are in ``engine.py``. Errors a user can cause
(paths, config keys, checkpoints, sizes) end in one line on stderr and exit code 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from config import ConfigError, get_config
from data import DataError, build_loader
from engine import Precision, TrainingDiverged, TrainState, evaluate, throughput, train_one_epoch
from logger import create_logger
from lr_scheduler import build_scheduler, updates_per_epoch
from models import build_model, model_cost
from optimizer import build_optimizer, scaled_lrs
from checkpoint import (CHECKPOINT_VERSION, CheckpointError, extract_state_dict, find_resume_checkpoint,
                        load_checkpoint_file, load_model_weights, load_pretrained, prune_checkpoints, save_checkpoint)
from distributed import (all_reduce_sum, barrier, get_rank, get_world_size, init_distributed, is_collective_failure,
                         is_dist, resolve_device)
from utils import compile_model, current_rss_mb, keep_freed_memory, seed_everything, unwrap_model

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged)
EPOCH_SEED_STRIDE = 1000  # seeds of consecutive epochs differ by this, of ranks by 1


def parse_option(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('MSG-Transformer / MG-SSAF training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to config file')
    parser.add_argument('--opts', default=None, nargs='+', help="modify config options by adding 'KEY VALUE' pairs")
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--data-path', type=str, help='path to dataset (with train/ and val/)')
    parser.add_argument('--resume', help='resume from (or, with --eval, evaluate) this checkpoint')
    parser.add_argument('--pretrained', help='initialise from these weights for fine-tuning')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true', help='gradient checkpointing to save memory')
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help='apex-era flag, mapped onto native torch.amp: O0 = off, O1/O2 = on')
    parser.add_argument('--disable_amp', '--disable-amp', action='store_true', help='disable mixed precision')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], help='autocast dtype (fp16 uses a GradScaler)')
    parser.add_argument('--device', type=str, help="'cuda', 'cpu' or 'cuda:N' (default: cuda if available)")
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (eager on failure)')
    parser.add_argument('--output', default='output', type=str, metavar='PATH',
                        help='root of output folder, the full path is <output>/<model_name>/<tag>')
    parser.add_argument('--tag', help='tag of experiment')
    parser.add_argument('--eval', action='store_true', help='evaluate only')
    parser.add_argument('--throughput', action='store_true', help='measure throughput only')
    parser.add_argument('--debug', action='store_true', help='show Python tracebacks for user errors')
    # Accepted for the official launch commands; the process's LOCAL_RANK environment variable is used.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_precision(config, device: torch.device, logger) -> Precision:
    """Native AMP from the config; apex opt levels map onto it. CPU autocast is used for bfloat16 only."""
    if config.AMP_OPT_LEVEL:
        logger.info(f'--amp-opt-level {config.AMP_OPT_LEVEL}: apex is not used; native torch.amp is '
                    f'{"off" if not config.AMP_ENABLE else "on (" + config.AMP_DTYPE + ")"}')
    dtype = getattr(torch, config.AMP_DTYPE)
    enabled = bool(config.AMP_ENABLE)
    if enabled and device.type == 'cpu' and dtype == torch.float16:
        logger.info('AMP float16 is a GPU feature: this CPU run uses float32 (use --amp-dtype bfloat16 for CPU AMP)')
        enabled = False
    return Precision(device_type=device.type, enabled=enabled, dtype=dtype)


def build_criterion(config, mixup: bool) -> nn.Module:
    if mixup:
        return SoftTargetCrossEntropy()  # mixup already smooths the targets
    if config.MODEL.LABEL_SMOOTHING > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.MODEL.LABEL_SMOOTHING)
    return nn.CrossEntropyLoss()


class StopRequest:
    """SIGTERM, SIGUSR1 or a first Ctrl-C set a flag: every rank stops at the same update and rank 0 writes a
    checkpoint. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal API
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _maybe_compile(model: nn.Module, enabled: bool, logger) -> nn.Module:
    return compile_model(model, logger) if enabled else model


def _state_dict_for_save(config, model, optimizer, scheduler, scaler, model_ema, state: TrainState) -> dict:
    return {
        'model': unwrap_model(model).state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'model_ema': model_ema.state_dict() if model_ema is not None else None,
        'epoch': state.epoch,
        'step_in_epoch': state.step_in_epoch,
        'num_updates': state.num_updates,
        'max_accuracy': state.max_accuracy,
        'batch_size': config.DATA.BATCH_SIZE,
        'world_size': get_world_size(),
        'config': config.dump(),
        'version': CHECKPOINT_VERSION,
    }


def _resume(config, ckpt: dict, path: str, model, optimizer, scheduler, scaler, model_ema, state: TrainState,
            logger) -> None:
    load_model_weights(unwrap_model(model), extract_state_dict(ckpt, path), path, logger)
    if 'version' not in ckpt:  # an official checkpoint: weights (and the epoch it reached, if any)
        if 'epoch' in ckpt and isinstance(ckpt['epoch'], int):
            state.epoch = ckpt['epoch'] + 1
        if 'optimizer' in ckpt:
            try:
                optimizer.load_state_dict(ckpt['optimizer'])
            except (ValueError, KeyError, TypeError) as e:
                logger.warning(f"resume: could not restore the official checkpoint's optimizer ({e}); starting it fresh")
        logger.info(f"resume: loaded official-format checkpoint '{path}', continuing at epoch {state.epoch}")
        return
    optimizer.load_state_dict(ckpt['optimizer'])
    if scaler.is_enabled() and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    if model_ema is not None:
        if ckpt.get('model_ema') is not None:
            model_ema.load_state_dict(ckpt['model_ema'])
        else:
            model_ema.set(unwrap_model(model))
    state.epoch = ckpt['epoch']
    state.step_in_epoch = ckpt.get('step_in_epoch', 0)
    if state.step_in_epoch and (ckpt.get('batch_size'), ckpt.get('world_size')) != (config.DATA.BATCH_SIZE,
                                                                                     get_world_size()):
        logger.warning(f"resume: the checkpoint stopped mid-epoch with batch {ckpt.get('batch_size')} x "
                       f"{ckpt.get('world_size')} processes, this run has {config.DATA.BATCH_SIZE} x "
                       f"{get_world_size()}: restarting epoch {state.epoch} from its first batch")
        state.step_in_epoch = 0
    state.num_updates = ckpt.get('num_updates', 0)
    state.max_accuracy = ckpt.get('max_accuracy', 0.0)
    # The schedule is a function of the current config and the update count (not restored from the file), so
    # raising TRAIN.EPOCHS and resuming stretches the cosine over the new length.
    scheduler.step_update(state.num_updates)
    where = f'epoch {state.epoch}' + (f' step {state.step_in_epoch}' if state.step_in_epoch else '')
    logger.info(f"resume: '{path}', continuing at {where} (best top-1 so far {state.max_accuracy:.3f})")


def run(args: argparse.Namespace) -> int:
    config = get_config(args)
    device = resolve_device(config.DEVICE)
    if device.type == 'cpu':
        keep_freed_memory()  # no page faults for tensors freed and made again every step (utils.keep_freed_memory)
    rank, world_size = init_distributed(device)
    os.makedirs(config.OUTPUT, exist_ok=True)
    logger = create_logger(config.OUTPUT, rank, name=config.MODEL.NAME)
    if rank == 0:
        name = 'config.yaml' if not (config.EVAL_MODE or config.THROUGHPUT_MODE) else 'config_eval.yaml'
        with open(os.path.join(config.OUTPUT, name), 'w') as f:
            f.write(config.dump())
        logger.info(f'full config saved to {os.path.join(config.OUTPUT, name)}')
    logger.info(f'rank {rank}/{world_size} on {device}')
    seed_everything(config.SEED)  # the same initial weights (and EMA) on every rank
    precision = resolve_precision(config, device, logger)

    try:
        model = build_model(config)
    except ValueError as e:
        raise ConfigError(f'{config.MODEL.TYPE} cannot be built from this config: {e}') from None
    params, macs = model_cost(model, config.DATA.IMG_SIZE)
    logger.info(f'model {config.MODEL.NAME} ({config.MODEL.TYPE}): {params:,} params, '
                f'{macs / 1e9:.3f} GMACs at {config.DATA.IMG_SIZE}x{config.DATA.IMG_SIZE}')
    model.to(device)

    train = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    _, dataset_val, loader_train, loader_val, mixup_fn = build_loader(config, rank, world_size, logger, train=train)

    if not train:
        if config.MODEL.RESUME:
            ckpt = load_checkpoint_file(config.MODEL.RESUME)
            load_model_weights(model, extract_state_dict(ckpt, config.MODEL.RESUME), config.MODEL.RESUME, logger)
            logger.info(f"loaded weights from '{config.MODEL.RESUME}'")
        elif config.MODEL.PRETRAINED:
            load_pretrained(model, config.MODEL.PRETRAINED, logger)
        elif config.EVAL_MODE:
            raise ConfigError('--eval needs weights: pass --resume <checkpoint>')
        model = _maybe_compile(model, config.TRAIN.COMPILE, logger)
        if config.THROUGHPUT_MODE:
            throughput(model, loader_val, device, precision, logger)
        if config.EVAL_MODE:
            stats = evaluate(model, loader_val, device, precision, logger, print_freq=config.PRINT_FREQ)
            logger.info(f'Accuracy of the network on the {stats["num_images"]} test images: {stats["acc1"]:.1f}%')
        return 0

    if mixup_fn is not None and config.DATA.BATCH_SIZE % 2:
        raise ConfigError(f'mixup/cutmix needs an even batch size per process, got {config.DATA.BATCH_SIZE}')
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)
    base_lr, warmup_lr, min_lr = scaled_lrs(config, world_size)
    total_batch = config.DATA.BATCH_SIZE * world_size * config.TRAIN.ACCUMULATION_STEPS
    logger.info(f'effective batch {total_batch} ({config.DATA.BATCH_SIZE} x {world_size} processes x '
                f'{config.TRAIN.ACCUMULATION_STEPS} accumulation); LR scaled by {total_batch}/'
                f'{config.TRAIN.LR_SCALE_BATCH}: base {base_lr:.3e}, warm-up {warmup_lr:.3e}, min {min_lr:.3e}')
    optimizer = build_optimizer(config, model, base_lr)
    n_updates = updates_per_epoch(len(loader_train), config.TRAIN.ACCUMULATION_STEPS)
    scheduler = build_scheduler(config, optimizer, n_updates, base_lr, warmup_lr, min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.enabled and precision.dtype == torch.float16)
    model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    state = TrainState(epoch=config.TRAIN.START_EPOCH)

    resume_path, ckpt = config.MODEL.RESUME, None
    if config.TRAIN.AUTO_RESUME:
        found = find_resume_checkpoint(config.OUTPUT, logger)
        if found:
            if resume_path and os.path.abspath(resume_path) != os.path.abspath(found[0]):
                logger.warning(f"auto-resume: using '{found[0]}' from the output folder instead of '{resume_path}'")
            resume_path, ckpt = found
    if resume_path:
        ckpt = ckpt if ckpt is not None else load_checkpoint_file(resume_path)
        _resume(config, ckpt, resume_path, model, optimizer, scheduler, scaler, model_ema, state, logger)
        del ckpt
        if state.num_updates == 0 and state.epoch > 0:  # official checkpoints record epochs, not updates
            state.num_updates = state.epoch * n_updates
            scheduler.step_update(state.num_updates)
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger)
        if model_ema is not None:
            model_ema.set(model)

    # Evaluation runs the plain model: DDP would add collectives (buffer broadcasts) to every eval forward,
    # which hang when ranks hold different numbers of validation batches.
    eval_model = _maybe_compile(model, config.TRAIN.COMPILE, logger)
    if is_dist():
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=False)
    model = _maybe_compile(model, config.TRAIN.COMPILE, logger) if config.TRAIN.COMPILE else model
    criterion = build_criterion(config, mixup_fn is not None)
    stop = StopRequest()
    writer = _tensorboard(config.OUTPUT) if rank == 0 else None

    logger.info(f'start training: epochs {state.epoch}..{config.TRAIN.EPOCHS - 1}, {len(loader_train)} batches '
                f'per epoch per process, {n_updates} updates per epoch')
    t_start = time.time()
    sampler = loader_train.sampler
    while state.epoch < config.TRAIN.EPOCHS:
        epoch = state.epoch
        # Augmentation, mixup and drop-path depend only on (seed, rank, epoch): a resumed epoch repeats exactly.
        seed_everything(config.SEED + rank + EPOCH_SEED_STRIDE * epoch)
        sampler.set_epoch(epoch)
        sampler.start_index = state.step_in_epoch * config.DATA.BATCH_SIZE
        stats = train_one_epoch(config=config, model=model, criterion=criterion, loader=loader_train,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=precision,
                                device=device, state=state, mixup_fn=mixup_fn, model_ema=model_ema,
                                should_stop=stop, logger=logger)
        sampler.start_index = 0
        if stats['skipped_images'] or stats['nonfinite_steps']:
            logger.warning(f'epoch {epoch}: skipped {stats["skipped_images"]} unreadable images, '
                           f'{stats["nonfinite_steps"]} updates with non-finite loss')
        if not stats['stopped'] and all_reduce_sum(torch.tensor(float(stop()))).item() > 0:
            # Asked to stop after the epoch's last update: checkpoint at the boundary and skip evaluation.
            state.epoch, state.step_in_epoch = epoch + 1, 0
            stats['stopped'] = True
        if stats['stopped']:
            if rank == 0:
                save_checkpoint(os.path.join(config.OUTPUT, 'last.pth'),
                                _state_dict_for_save(config, model, optimizer, scheduler, scaler, model_ema, state))
            barrier()
            logger.info(f'stop requested: checkpoint written at epoch {state.epoch} step {state.step_in_epoch}; '
                        f'rerun the same command to continue')
            return 0

        val = evaluate(eval_model, loader_val, device, precision, logger, print_freq=config.PRINT_FREQ)
        logger.info(f'Accuracy of the network on the {val["num_images"]} test images: {val["acc1"]:.1f}%')
        ema_acc1 = None
        if model_ema is not None:
            ema_acc1 = evaluate(model_ema, loader_val, device, precision, logger, header='Test EMA')['acc1']
        improved = val['acc1'] > state.max_accuracy
        state.max_accuracy = max(state.max_accuracy, val['acc1'])
        logger.info(f'Max accuracy: {state.max_accuracy:.2f}%')
        state.epoch, state.step_in_epoch = epoch + 1, 0

        if rank == 0:
            ckpt_state = _state_dict_for_save(config, model, optimizer, scheduler, scaler, model_ema, state)
            if epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1:
                path = os.path.join(config.OUTPUT, f'ckpt_epoch_{epoch}.pth')
                save_checkpoint(path, ckpt_state)
                logger.info(f'{path} saved')
                stale = os.path.join(config.OUTPUT, 'last.pth')
                if os.path.exists(stale):
                    os.remove(stale)
                prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS)
            if improved:
                save_checkpoint(os.path.join(config.OUTPUT, 'best.pth'), ckpt_state)
            record = {'epoch': epoch, 'lr': stats['lr'], 'train_loss': stats['loss'], 'val_acc1': val['acc1'],
                      'val_acc5': val['acc5'], 'val_loss': val['loss'], 'ema_acc1': ema_acc1,
                      'skipped_images': stats['skipped_images'], 'nonfinite_steps': stats['nonfinite_steps'],
                      'time': stats['time'] + val['time'], 'rss_mb': round(current_rss_mb(), 1)}
            with open(os.path.join(config.OUTPUT, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            if writer is not None:
                for k, v in record.items():
                    if k != 'epoch' and v is not None:
                        writer.add_scalar(k, v, epoch)
                writer.flush()
        barrier()
    logger.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - t_start))}; '
                f'best top-1 {state.max_accuracy:.3f}')
    return 0


def _tensorboard(output_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'))


def _one_line(e: BaseException) -> str:
    """The message of ``e``; for an error re-raised from a DataLoader worker, only the original message."""
    text = str(e).strip()
    if 'Original Traceback' in text:
        text = text.splitlines()[-1]
        text = re.sub(r'^[\w.]+(Error|Exception): ', '', text)
    return ' '.join(text.split())


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_option(argv)
    prefix = lambda: f'[rank {get_rank()}] ' if is_dist() else ''  # noqa: E731
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f'{prefix()}error: {_one_line(e)}', file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f'{prefix()}interrupted', file=sys.stderr, flush=True)
        return 130
    except (RuntimeError, dist.DistError) as e:
        if args.debug or not is_collective_failure(e):
            raise
        print(f'{prefix()}error: another process of this run failed or was killed (see its log_rank*.txt); '
              f'rerun the command to resume from the last checkpoint', file=sys.stderr, flush=True)
        return 1
    finally:
        if is_dist():
            torch.distributed.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
