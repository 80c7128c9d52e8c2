"""Which format ``DATA.DATA_PATH`` holds, and the loaders of the two that are not class folders.

* ``zip``: Swin's zipped data set, when ``DATA.ZIP_MODE`` (``--zip``) is on (``data/zipped.py``);
* ``shards``: tar shards, when ``train/`` or ``val/`` holds ``.tar`` files or a ``classes.txt`` (``data/shards.py``);
* ``folder``: class folders (``data/build.py``), otherwise.

Both build the same ``Data`` as the folder loader, with the same checks before any work: the classes (and their
count against ``MODEL.NUM_CLASSES``), every validation image's header when training, at least one batch per process.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import torch
from torch.utils.data import Sampler

from .device_loader import worker_transform
from .images import DataError
from .loader import Data, check_batches, data_loader
from .samplers import (ContiguousSampler, ResumableDistributedSampler, ShardSampler, ShardShareSampler,
                       StridedShareSampler)
from .samples import EncodedImages, describe_split
from .transforms import build_mixup
from .shards import ShardImages, check_shard_split, is_shard_folder
from .zipped import ZipImages, class_names, load_zip_split, zip_files


def data_format(config) -> str:
    """'zip', 'shards' or 'folder' (the module docstring)."""
    if config.DATA.ZIP_MODE:
        return 'zip'
    root = config.DATA.DATA_PATH
    return 'shards' if root and os.path.isdir(root) and is_shard_folder(root) else 'folder'


def _check_root(root: str, what: str) -> None:
    if not root:
        raise DataError(f'no data set given: pass --data-path <folder with {what}>')
    if not os.path.isdir(root):
        raise DataError(f"--data-path '{root}' does not exist or is not a folder")


def _check_count(config, classes: list[str], where: str) -> None:
    if config.MODEL.NUM_CLASSES != len(classes):
        raise DataError(f"MODEL.NUM_CLASSES is {config.MODEL.NUM_CLASSES} but '{where}' has {len(classes)} classes; "
                        f"set --opts MODEL.NUM_CLASSES {len(classes)}")


def _zip_classes(root: str, train_samples: Optional[list]) -> tuple[list[str], str]:
    """Class names from the training map (read for its names alone when evaluating), else from the val map."""
    if train_samples is None:
        _, map_path = zip_files(root, 'train')
        if os.path.isfile(map_path):
            with open(map_path, encoding='utf-8') as f:
                rows = [line.rstrip('\r\n').split('\t') for line in f if line.strip()]
            if rows and all(len(r) >= 2 and r[1].strip().isdigit() for r in rows):
                return class_names([(r[0].strip('/'), int(r[1])) for r in rows]), map_path
        return [], ''
    return class_names(train_samples), zip_files(root, 'train')[1]


def _zip_data(config, rank: int, world_size: int, logger, train: bool, lazy: bool):
    root = config.DATA.DATA_PATH
    _check_root(root, 'train.zip, train_map.txt, val.zip and val_map.txt')
    val_zip, val_samples = load_zip_split(root, 'val')
    train_zip, train_samples = load_zip_split(root, 'train') if train else (None, None)
    classes, names_from = _zip_classes(root, train_samples)
    if not classes:
        classes, names_from = class_names(val_samples), zip_files(root, 'val')[1]
    top = max(label for _, label in val_samples)
    if top >= len(classes):
        raise DataError(f"'{zip_files(root, 'val')[1]}' has the label {top}, but '{names_from}' names "
                        f"{len(classes)} classes (labels 0..{len(classes) - 1})")
    _check_count(config, classes, names_from)
    # The official code caches the validation set's part whatever the training set's mode.
    dataset_val = ZipImages(val_zip, val_samples, classes, 'part', rank, world_size,
                            transform=worker_transform(config, False).transform, logger=logger)
    sampler_val = ShardSampler(len(dataset_val), rank, world_size)
    if not train:
        return classes, None, dataset_val, None, sampler_val
    mode = config.DATA.CACHE_MODE
    dataset_train = ZipImages(train_zip, train_samples, classes, mode, rank, world_size,
                              transform=worker_transform(config, True).transform,
                              skip_corrupt=config.DATA.SKIP_CORRUPT, lazy=lazy, logger=logger)
    if mode == 'part':
        sampler: Sampler = StridedShareSampler(len(dataset_train), rank, world_size, config.SEED)
    else:
        sampler = ResumableDistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=config.SEED)
    return classes, dataset_train, dataset_val, sampler, sampler_val


def _shard_data(config, rank: int, world_size: int, logger, train: bool, lazy: bool):
    root = config.DATA.DATA_PATH
    val_shards, val_lengths, classes = check_shard_split(root, 'val', logger)
    if train:
        train_shards, train_lengths, train_classes = check_shard_split(root, 'train', logger)
        if train_classes != classes:
            only_train = [c for c in train_classes if c not in classes][:3]
            only_val = [c for c in classes if c not in train_classes][:3]
            what = (f'only in train: {only_train}, only in val: {only_val}' if only_train or only_val
                    else 'the same names in another order')
            raise DataError(f"the class names of '{os.path.join(root, 'train')}' and '{os.path.join(root, 'val')}' "
                            f"differ ({what}); both splits need the same classes.txt")
    _check_count(config, classes, os.path.join(root, 'val'))
    dataset_val = ShardImages(os.path.join(root, 'val'), val_shards, val_lengths, classes,
                              transform=worker_transform(config, False).transform, logger=logger)
    sampler_val = ContiguousSampler(len(dataset_val), rank, world_size)
    if not train:
        return classes, None, dataset_val, None, sampler_val
    dataset_train = ShardImages(os.path.join(root, 'train'), train_shards, train_lengths, classes,
                                transform=worker_transform(config, True).transform,
                                skip_corrupt=config.DATA.SKIP_CORRUPT, lazy=lazy, logger=logger)
    sampler = ShardShareSampler(train_lengths, rank, world_size, config.SEED)
    return classes, dataset_train, dataset_val, sampler, sampler_val


def _describe(dataset: EncodedImages) -> str:
    if isinstance(dataset, ShardImages):
        return f"'{dataset.root}': {len(dataset)} images in {len(dataset.shards)} shards, {len(dataset.classes)} classes"
    return describe_split(dataset)


def build_encoded_loader(config, rank: int, world_size: int, logger: Optional[logging.Logger] = None,
                         train: bool = True, device: Optional[torch.device] = None) -> Data:
    """``data.build.build_loader`` for a zip (``--zip``) or tar shards; the same ``Data``, the same checks."""
    fmt = data_format(config)
    lazy = bool(config.DATA.FAST_DECODE)
    build = _zip_data if fmt == 'zip' else _shard_data
    classes, dataset_train, dataset_val, sampler, sampler_val = build(config, rank, world_size, logger, train, lazy)
    pin = bool(config.DATA.PIN_MEMORY) and device is not None and device.type == 'cuda'
    loader_val = data_loader(dataset_val, sampler_val, config, config.DATA.BATCH_SIZE, drop_last=False, pin_memory=pin,
                         device=device, is_train=False)
    if not train:
        if logger is not None:
            logger.info(f'data ({fmt}): val {_describe(dataset_val)}')
        return Data(None, dataset_val, None, loader_val, None, classes)
    if logger is not None:
        logger.info(f'data ({fmt}): train {_describe(dataset_train)}; val {_describe(dataset_val)}')
    t0 = time.perf_counter()
    bad = dataset_val.header_problems()
    if bad:
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise DataError(f'unreadable validation image {bad[0][0]}: {bad[0][1]}{more}; remove or replace it '
                        f'(validation never skips images)')
    if logger is not None:
        logger.info(f'data: {len(dataset_val)} validation image headers read in {time.perf_counter() - t0:.1f} s')
    check_batches(config, len(sampler))
    loader_train = data_loader(dataset_train, sampler, config, config.DATA.BATCH_SIZE, drop_last=True, pin_memory=pin,
                           device=device, is_train=True)
    return Data(dataset_train, dataset_val, loader_train, loader_val, build_mixup(config), classes)
