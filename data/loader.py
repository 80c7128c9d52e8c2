"""What every data format hands the run: the ``Data`` of a run, its loaders (workers that hand uint8 images to the
device, ``data/device_loader.py``), the checks of a share's size, and the workers' ends."""
from __future__ import annotations

import multiprocessing
import os
import signal
from typing import NamedTuple, Optional

import torch
from timm.data import Mixup
from torch.utils.data import Dataset, Sampler

from .device_loader import DeviceLoader, close_loaders, make_loader, worker_transform
from .images import DataError


def check_batches(config, per_process: int) -> None:
    """DataError unless a process's share of the training set (``per_process`` images) makes at least one batch and
    one update (an accumulation longer than an epoch would never update)."""
    if per_process < config.DATA.BATCH_SIZE:
        raise DataError(f"the training set gives {per_process} images per process, fewer than one batch of "
                        f"{config.DATA.BATCH_SIZE}; lower --batch-size")
    batches, accum = per_process // config.DATA.BATCH_SIZE, config.TRAIN.ACCUMULATION_STEPS
    if batches < accum:
        raise DataError(f"TRAIN.ACCUMULATION_STEPS (--accumulation-steps) is {accum} but an epoch has {batches} "
                        f"batches per process: no update would ever be made; lower it to at most {batches}")


class Data(NamedTuple):
    """What ``build_loader`` returns; the training parts are None for evaluation-only runs."""
    dataset_train: Optional[Dataset]   # SafeImageFolder, or data/samples.py's for zips, shards, the fast decode
    dataset_val: Dataset
    loader_train: Optional[DeviceLoader]   # data/device_loader.py: batches on the device
    loader_val: DeviceLoader
    mixup_fn: Optional[Mixup]
    class_names: list[str]


# Set by the main process when it is done (``release_workers``); forked workers share it.
_MAIN_DONE = multiprocessing.get_context('fork').Event()


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn API
    """Data workers leave SIGTERM and SIGINT to the main process: a job-wide SIGTERM (torchrun forwards it to each
    worker's whole process group, as cluster schedulers do) or a Ctrl-C would otherwise kill them in mid-step, and
    the main process, whose loader then fails, could not stop at the next update and checkpoint. Once the main
    process is done (``release_workers``), SIGTERM ends them: that is how its exit shuts down a worker left over."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_if_main_is_done)


def _exit_if_main_is_done(signum, frame) -> None:  # noqa: ARG001 - signal handler API
    if _MAIN_DONE.is_set():
        os._exit(0)


def release_workers() -> None:
    """Call when the run ends (normally or not): the loaders' persistent workers are shut down, and any still alive
    then (e.g. of a loader caught in an exception) take the SIGTERM of the interpreter's exit again, so the exit does
    not wait for them forever."""
    _MAIN_DONE.set()
    close_loaders()


def begin_run() -> None:
    """Call when a run builds its loaders: their workers leave SIGTERM to it (``release_workers`` at its end)."""
    _MAIN_DONE.clear()


def data_loader(dataset: Dataset, sampler: Sampler, config, batch_size: int, drop_last: bool, pin_memory: bool,
                device: Optional[torch.device] = None, is_train: bool = False) -> DeviceLoader:
    """Workers hand uint8 images over and the device normalises and erases them (``data/device_loader.py``); they
    persist across epochs and end with the run (``release_workers``). Prefetch as PyTorch's default."""
    return make_loader(dataset, sampler, batch_size=batch_size, num_workers=config.DATA.NUM_WORKERS,
                       drop_last=drop_last, pin_memory=pin_memory, device=device,
                       worker=worker_transform(config, is_train),
                       worker_init_fn=_leave_stop_signals_to_the_main_process)
