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
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from config import ConfigError, add_opts_argument, config_notes, get_config
from data import Data, DataError, build_loader, release_workers
from engine import Precision, TrainingDiverged, TrainState, evaluate, throughput, train_one_epoch
from logger import create_logger
from lr_scheduler import ScheduleClock, build_scheduler
from models import build_model, cpu, model_cost
from optimizer import build_optimizer, scaled_lrs
from checkpoint import (CheckpointError, check_class_names, complete_epoch_writes, epoch_end_writes,
                        extract_state_dict, find_resume_checkpoint, load_checkpoint_file, load_model_weights,
                        load_pretrained, prune_checkpoints, restore_training, save_checkpoint, training_checkpoint)
from distributed import (agree_on_every_rank, any_rank, barrier, init_distributed, is_collective_failure, is_dist,
                         launched, launcher_env, process_rank, resolve_device, shutdown, slurm_environment)
from output_folder import OutputError, append_metrics, lock_output_folder, release_output_folder, write_text
from utils import compile_model, current_rss_mb, keep_freed_memory, seed_everything, unwrap_model

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged, OutputError)
MAX_MESSAGE_CHARS = 2000  # an error line is cut to this (a message quoting a huge value must stay one readable line)


def parse_option(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('MSG-Transformer / MG-SSAF training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to config file')
    add_opts_argument(parser, "modify config options by adding 'KEY VALUE' pairs")
    parser.add_argument('--batch-size', type=int, help='batch size per process')
    parser.add_argument('--data-path', type=str, help='path to dataset: a folder with train/ and val/ (class folders '
                                                      'or .tar shards), or with --zip the zips and their maps')
    parser.add_argument('--zip', action='store_true', help="Swin's zipped data set: train.zip + train_map.txt, ...")
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'],
                        help='with --zip, keep images in memory: no, full (all), part (each process its own share)')
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
    parser.add_argument('--allow-class-change', action='store_true',
                        help="resume or evaluate a checkpoint although the data's class folders differ from the ones "
                             "it was trained on (renamed, reordered, another data set): labels then mean other classes")
    # The official fused-kernel switches: accepted, with a note in the log (nothing to fuse here).
    parser.add_argument('--fused_window_process', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--fused_layernorm', action='store_true', help=argparse.SUPPRESS)
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
    if enabled and device.type == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ConfigError(f'{torch.cuda.get_device_name(device)} has no bfloat16: use --amp-dtype float16')
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


class StopAwareLoader:
    """A validation loader that ends early once a stop is requested. Ranks may hold different numbers of batches
    (the evaluation shards are not padded), so they agree only at batches every rank has, every
    ``check_every``: one collective each."""

    def __init__(self, loader, should_stop, world_size: int, check_every: int = 10) -> None:
        self.loader, self.should_stop, self.check_every = loader, should_stop, check_every
        per_rank = len(loader.dataset) // world_size  # the fewest items a rank holds (ShardSampler)
        self.common = -(-per_rank // loader.batch_size)
        self.stopped = False

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i % self.check_every == 0 and i < self.common and any_rank(self.should_stop()):
                self.stopped = True
                return
            yield batch


@dataclass
class Run:
    """What every path of a run shares: the frozen config, where this process runs, and its logger."""
    config: object
    device: torch.device
    rank: int
    world_size: int
    precision: Precision
    logger: logging.Logger
    allow_class_change: bool = False  # --allow-class-change


def prepare_output(path: str) -> None:
    """Create the output folder and check that files can be written there, before any work (an unwritable or
    immutable folder, or a file in the way, would otherwise fail at the first log line or checkpoint)."""
    blocker = next((p for p in _parents(path) if os.path.exists(p) and not os.path.isdir(p)), None)
    if blocker is not None:
        raise ConfigError(f"output folder '{path}': '{blocker}' is a file, not a folder; choose another --output")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write-test-{os.getpid()}')
        with open(probe, 'w') as f:
            f.write('ok')
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"output folder '{path}' is not writable ({e.strerror}); choose another --output or fix "
                          f"its permissions") from None


def own_output_folder(path: str, rank: int) -> Optional[str]:
    """Rank 0 takes the output folder's lock (output_folder.py); every rank learns whether it did, so all stop
    together when another run owns the folder. Returns the log line of a stale lock taken over, if any."""
    error, note = None, None
    if rank == 0:
        try:
            note = lock_output_folder(path)
        except OutputError as e:
            error = e
    if any_rank(error is not None):
        raise error or OutputError(f"output folder '{path}' is in use by another run")
    return note


def _parents(path: str) -> list[str]:
    """``path`` and the folders above it, nearest first."""
    out, path = [], os.path.abspath(path)
    while True:
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return out
        path = parent


def setup(args: argparse.Namespace) -> Run:
    """Config, device and process group, output folder and logger, seed, precision."""
    config = get_config(args)
    device = resolve_device(config.DEVICE)
    if device.type == 'cpu':
        keep_freed_memory()  # no page faults for tensors freed and made again every step (utils.keep_freed_memory)
    prepare_output(config.OUTPUT)
    rank, world_size = init_distributed(device)
    config.defrost()
    config.LOCAL_RANK = launcher_env().local_rank  # recorded in config.yaml, as Swin's config has it
    config.freeze()
    lock_note = own_output_folder(config.OUTPUT, rank)  # before the first line is written there
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as both official mains: fixed input sizes, convolutions tuned once
        if config.TRAIN.TF32:  # float32 matmuls and convolutions on tensor cores (float32 runs: --disable_amp)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    logger = create_logger(config.OUTPUT, rank, name=config.MODEL.NAME)
    for note in config_notes() + [launcher_env().note, lock_note]:
        if note:
            logger.info(note)
    if rank == 0:
        name = 'config.yaml' if not (config.EVAL_MODE or config.THROUGHPUT_MODE) else 'config_eval.yaml'
        write_text(os.path.join(config.OUTPUT, name), config.dump(), 'the config')
        logger.info(f'full config saved to {os.path.join(config.OUTPUT, name)}')
    logger.info(f'rank {rank}/{world_size} on {device}')
    seed_everything(config.SEED)  # the same initial weights (and EMA) on every rank
    return Run(config, device, rank, world_size, resolve_precision(config, device, logger), logger,
               allow_class_change=bool(getattr(args, 'allow_class_change', False)))


def create_model(run: Run) -> nn.Module:
    config, logger = run.config, run.logger
    try:
        model = build_model(config)
    except ValueError as e:
        raise ConfigError(f'{config.MODEL.TYPE} cannot be built from this config: {e}') from None
    params, macs = model_cost(model, config.DATA.IMG_SIZE)
    logger.info(f'model {config.MODEL.NAME} ({config.MODEL.TYPE}): {params:,} params, '
                f'{macs / 1e9:.3f} GMACs at {config.DATA.IMG_SIZE}x{config.DATA.IMG_SIZE}')
    model = model.to(run.device)
    if run.device.type == 'cpu':
        try:
            accelerated = cpu.install(model, logger)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if accelerated:
            logger.info(f'CPU accelerators (models/cpu) on {len(accelerated)} modules; MSGSSAF_CPU_KERNELS=plain '
                        f'runs the plain forwards')
    return model


def evaluate_only(run: Run, data: Data, model: nn.Module) -> int:
    """``--eval`` / ``--throughput``: load the weights, then measure."""
    config, logger = run.config, run.logger
    if config.MODEL.RESUME:
        ckpt = load_checkpoint_file(config.MODEL.RESUME)
        check_class_names(ckpt, data.class_names, config.MODEL.RESUME, run.allow_class_change, logger)
        load_model_weights(model, extract_state_dict(ckpt, config.MODEL.RESUME), config.MODEL.RESUME, logger)
        logger.info(f"loaded weights from '{config.MODEL.RESUME}'")
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger)
    elif config.EVAL_MODE:
        raise ConfigError('--eval needs weights: pass --resume <checkpoint>')
    model = compile_model(model, logger) if config.TRAIN.COMPILE else model
    if config.THROUGHPUT_MODE:
        throughput(model, data.loader_val, run.device, run.precision, logger)
    if config.EVAL_MODE:
        stats = evaluate(model, data.loader_val, run.device, run.precision, logger, print_freq=config.PRINT_FREQ)
        logger.info(f'Accuracy of the network on the {stats["num_images"]} test images: {stats["acc1"]:.1f}%')
    _log_cpu_kernels(logger)
    return 0


def _log_cpu_kernels(logger: logging.Logger, _logged: list = []) -> None:  # noqa: B006 - once per process
    """The CPU kernel choices of this process (models/cpu), once (after the first epoch or evaluation,
    when every shape has been seen); nothing on GPU runs."""
    line = cpu.summary()
    if line and not _logged:
        _logged.append(line)
        logger.info(line)


def train(run: Run, data: Data, model: nn.Module) -> int:
    """Train (or continue training) and evaluate after every epoch; checkpoints in the output folder."""
    config, logger, device, rank, world_size = run.config, run.logger, run.device, run.rank, run.world_size
    if config.TRAIN.USE_CHECKPOINT:
        model.set_grad_checkpointing(True)

    # Optimiser and schedule, placed as the official loops place them (lr_scheduler.py).
    accum = config.TRAIN.ACCUMULATION_STEPS
    base_lr, warmup_lr, min_lr = scaled_lrs(config, world_size)
    total_batch = config.DATA.BATCH_SIZE * world_size * accum
    logger.info(f'effective batch {total_batch} ({config.DATA.BATCH_SIZE} x {world_size} processes x {accum} '
                f'accumulation); LR scaled by {total_batch}/{config.TRAIN.LR_SCALE_BATCH}: base {base_lr:.3e}, '
                f'warm-up {warmup_lr:.3e}, min {min_lr:.3e}')
    optimizer = build_optimizer(config, model, base_lr)
    clock = ScheduleClock(len(data.loader_train), accum, config.TRAIN.LR_SCHEDULER.T_IN_BATCHES)
    scheduler = build_scheduler(config, optimizer, clock, base_lr, warmup_lr, min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=run.precision.enabled and run.precision.dtype == torch.float16)
    model_ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY) if config.TRAIN.EMA.ENABLE else None
    state = TrainState(epoch=config.TRAIN.START_EPOCH)
    if clock.batches_used < clock.batches_per_epoch:
        logger.info(f'accumulation {accum} over {clock.batches_per_epoch} batches: the last '
                    f'{clock.batches_per_epoch - clock.batches_used} of each epoch make no update (as in the '
                    f'official code)')

    # Continue a run (ours or official), or start from pretrained weights.
    resume_path = config.MODEL.RESUME
    found = find_resume_checkpoint(config.OUTPUT, logger) if config.TRAIN.AUTO_RESUME else None
    if found:
        if resume_path and os.path.abspath(resume_path) != os.path.abspath(found[0]):
            logger.warning(f"auto-resume: using '{found[0]}' from the output folder instead of '{resume_path}'")
        resume_path = found[0]
    if resume_path:
        ckpt = found[1] if found else load_checkpoint_file(resume_path)
        found = None  # it holds the whole checkpoint: one more copy of the run in host memory otherwise
        check_class_names(ckpt, data.class_names, resume_path, run.allow_class_change, logger)
        restore_training(ckpt, resume_path, model=model, optimizer=optimizer, scaler=scaler, model_ema=model_ema,
                         state=state, batch_size=config.DATA.BATCH_SIZE, world_size=world_size, accumulation=accum,
                         updates_per_epoch=clock.updates_per_epoch, logger=logger)
        if rank == 0 and os.path.dirname(os.path.abspath(resume_path)) == os.path.abspath(config.OUTPUT):
            complete_epoch_writes(config.OUTPUT, resume_path, ckpt, logger)  # after a kill between the epoch's writes
        del ckpt
    # Every rank takes part, whether or not it found a checkpoint: a collective entered by some ranks only would
    # meet another collective (DDP's first broadcast) on the others and wait out the timeout.
    if not agree_on_every_rank([int(bool(resume_path)), state.epoch, state.step_in_epoch, state.num_updates]):
        here = f'epoch {state.epoch} step {state.step_in_epoch}' if resume_path else 'no checkpoint'
        raise CheckpointError(f"the processes resumed from different places ({here} here): is '{config.OUTPUT}' "
                              f"the same folder on every node, and readable by all?")
    if state.epoch >= config.TRAIN.EPOCHS:
        logger.warning(f"nothing to train: '{resume_path}' has finished all {config.TRAIN.EPOCHS} epochs "
                       f"(TRAIN.EPOCHS); raise TRAIN.EPOCHS to train more, or pass another --output or --tag for a "
                       f"new run")
    if resume_path:
        position = clock.step_before(state.epoch, state.step_in_epoch)
        if position is not None:
            scheduler.step_update(position)
    elif config.MODEL.PRETRAINED:
        load_pretrained(model, config.MODEL.PRETRAINED, logger)
        if model_ema is not None:
            model_ema.set(model)

    # Evaluation runs the plain model: DDP would add collectives (buffer broadcasts) to every eval forward,
    # which hang when ranks hold different numbers of validation batches.
    eval_model = compile_model(model, logger) if config.TRAIN.COMPILE else model
    if is_dist():
        # Buffers are constants (index tables): no broadcast per forward, as in the official code.
        # Gradients as views of DDP's buckets: no copy into the buckets, one gradient-sized buffer less.
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None, find_unused_parameters=False,
            broadcast_buffers=False, gradient_as_bucket_view=True)
    model = compile_model(model, logger) if config.TRAIN.COMPILE else model
    criterion = build_criterion(config, data.mixup_fn is not None)
    stop = StopRequest()
    writer = _tensorboard(config.OUTPUT) if rank == 0 else None

    def save(path: str, epoch_end: Optional[dict] = None) -> None:
        save_checkpoint(path, training_checkpoint(config=config, model=unwrap_model(model), optimizer=optimizer,
                                                  scheduler=scheduler, scaler=scaler, model_ema=model_ema, state=state,
                                                  class_names=data.class_names, world_size=world_size,
                                                  epoch_end=epoch_end))

    def stop_here() -> int:
        """Checkpoint where training stands (only what resume needs: one file) and end the run."""
        if rank == 0:
            save(os.path.join(config.OUTPUT, 'last.pth'))
        barrier()
        logger.info(f'stop requested: checkpoint written at epoch {state.epoch} step {state.step_in_epoch}; '
                    f'rerun the same command to continue')
        return 0

    logger.info(f'start training: epochs {state.epoch}..{config.TRAIN.EPOCHS - 1}, {clock.batches_per_epoch} batches '
                f'per epoch per process, {clock.updates_per_epoch} updates per epoch')
    t_start = time.time()
    sampler = data.loader_train.sampler
    while state.epoch < config.TRAIN.EPOCHS:
        epoch = state.epoch
        sampler.set_epoch(epoch)
        sampler.start_index = state.step_in_epoch * config.DATA.BATCH_SIZE
        stats = train_one_epoch(config=config, model=model, criterion=criterion, loader=data.loader_train,
                                optimizer=optimizer, scheduler=scheduler, scaler=scaler, precision=run.precision,
                                device=device, state=state, clock=clock, mixup_fn=data.mixup_fn,
                                model_ema=model_ema, should_stop=stop, logger=logger)
        sampler.start_index = 0
        if stats['skipped_images'] or stats['nonfinite_steps']:
            logger.warning(f'epoch {epoch}: skipped {stats["skipped_images"]} unreadable images, '
                           f'{stats["nonfinite_steps"]} updates with non-finite loss')
        if not stats['stopped'] and any_rank(stop()):
            # Asked to stop after the epoch's last update: checkpoint that (the whole epoch trained, not yet
            # evaluated), so the rerun evaluates and checkpoints this epoch before it goes on.
            stats['stopped'] = True
        if stats['stopped']:
            return stop_here()

        # A stop during evaluation ends it (every rank at the same batch): the epoch, trained but not evaluated, is
        # checkpointed as above and evaluated by the rerun, instead of the stop waiting for evaluation and saves.
        loader_val = StopAwareLoader(data.loader_val, stop, world_size)
        val = evaluate(eval_model, loader_val, device, run.precision, logger, print_freq=config.PRINT_FREQ)
        ema_acc1 = None
        if model_ema is not None and not loader_val.stopped:
            ema_acc1 = evaluate(model_ema, loader_val, device, run.precision, logger, header='Test EMA')['acc1']
        if loader_val.stopped:
            return stop_here()
        logger.info(f'Accuracy of the network on the {val["num_images"]} test images: {val["acc1"]:.1f}%')
        _log_cpu_kernels(logger)  # after the first epoch and its evaluation: every shape has been seen
        improved = val['acc1'] > state.max_accuracy
        state.max_accuracy = max(state.max_accuracy, val['acc1'])
        logger.info(f'Max accuracy: {state.max_accuracy:.2f}%')
        state.epoch, state.step_in_epoch = epoch + 1, 0
        record = {'epoch': epoch, 'lr': stats['lr'], 'train_loss': stats['loss'], 'val_acc1': val['acc1'],
                  'val_acc5': val['acc5'], 'val_loss': val['loss'], 'ema_acc1': ema_acc1,
                  'skipped_images': stats['skipped_images'], 'nonfinite_steps': stats['nonfinite_steps'],
                  'time': stats['time'] + val['time'], 'rss_mb': round(current_rss_mb(), 1)}

        # The epoch's checkpoint first, recording the writes that belong with it (best.pth, the metrics row): a
        # rerun after a kill between them completes them. After a stop only that checkpoint is written, and a stop
        # that comes while it is written leaves the rest to the rerun too.
        stopping = any_rank(stop())
        saving = epoch % config.SAVE_FREQ == 0 or epoch == config.TRAIN.EPOCHS - 1
        if rank == 0:
            pending = epoch_end_writes(record, improved)
            if saving or stopping:
                path = os.path.join(config.OUTPUT, f'ckpt_epoch_{epoch}.pth' if saving else 'last.pth')
                save(path, pending)
                logger.info(f'{path} saved')
            if not (stopping or (saving and stop())):
                if improved:
                    save(os.path.join(config.OUTPUT, 'best.pth'), pending)
                append_metrics(config.OUTPUT, record)
                if saving:
                    stale = os.path.join(config.OUTPUT, 'last.pth')
                    if os.path.exists(stale):
                        os.remove(stale)
                    prune_checkpoints(config.OUTPUT, config.TRAIN.KEEP_CHECKPOINTS)
                if writer is not None:
                    for k, v in record.items():
                        if k != 'epoch' and v is not None:
                            writer.add_scalar(k, v, epoch)
                    writer.flush()
        barrier()
        if stopping or (saving and any_rank(stop())):
            logger.info(f'stop requested: checkpoint written after epoch {epoch}; rerun the same command to continue')
            return 0
    logger.info(f'training time {time.strftime("%H:%M:%S", time.gmtime(time.time() - t_start))}; '
                f'best top-1 {state.max_accuracy:.3f}')
    return 0


def run(args: argparse.Namespace) -> int:
    """config -> distributed -> data -> model -> evaluation only, or optimiser / schedule -> checkpoint -> loop."""
    run_ = setup(args)
    config = run_.config
    eval_only = config.EVAL_MODE or config.THROUGHPUT_MODE
    data = build_loader(config, run_.rank, run_.world_size, run_.logger, train=not eval_only, device=run_.device)
    model = create_model(run_)
    return evaluate_only(run_, data, model) if eval_only else train(run_, data, model)


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
    text = ' '.join(text.split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + f' ... ({len(text)} characters)'


def _report(e: BaseException, text: str) -> None:
    """Print a user error once: from rank 0 when every rank hits it alike (config, data folder, checkpoint: all
    ranks read the same files), from the rank that hit it otherwise (an image in its shard of the validation
    set). Under a launcher this line comes before the launcher's own ChildFailedError report."""
    rank = process_rank()
    if getattr(e, 'rank_specific', False):
        print(f'[rank {rank}] {text}' if launched() else text, file=sys.stderr, flush=True)
    elif rank == 0:
        print(text, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_option(argv)
    slurm_environment()  # srun without torchrun: the process's rank from Slurm
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        _report(e, f'error: {_one_line(e)}')
        return 2
    except KeyboardInterrupt:
        _report(KeyboardInterrupt(), 'interrupted')
        return 130
    except (RuntimeError, dist.DistError) as e:
        if args.debug or not is_collective_failure(e):
            raise
        e.rank_specific = True
        _report(e, 'error: another process of this run failed or was killed (see its log_rank*.txt); rerun the '
                   'command to resume from the last checkpoint')
        return 1
    finally:
        release_workers()  # leftover data workers may end at the exit's SIGTERM again (data/build.py)
        release_output_folder()
        shutdown()


if __name__ == '__main__':
    sys.exit(main())
