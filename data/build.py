"""ImageNet-style folders: ``<DATA_PATH>/train/<class>/*`` and ``<DATA_PATH>/val/<class>/*``.

Training uses timm's ``create_transform`` (random resized crop, flip, RandAugment, colour jitter, random
erasing) and timm's ``Mixup``/CutMix; evaluation resizes by ``1/TEST.CROP_PCT`` and centre-crops (bicubic).
Every problem a user can cause with the folder raises ``DataError`` with one line naming the path and the fix.

Samplers: training shards with a ``DistributedSampler`` that can start mid-epoch (preemption resume);
evaluation shards *without padding* (rank r takes items r, r+W, ...), so summed counts cover every image once.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Union

import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from timm.data import Mixup, create_transform
from timm.data import auto_augment as _timm_aa
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from utils import derive_seed, seed_everything

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, never silently half-grey


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize as Pillow < 11 did: keeping 0 bits gives a black image.

    timm's RandAugment ('...-inc1', the papers' recipe) asks for 0 bits at magnitude 10, which current Pillow
    rejects with a ValueError in the middle of an epoch. Older Pillow (the one the papers trained with) masked
    every bit away, so we reproduce that exactly instead of changing the augmentation distribution."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    _timm_aa.NAME_TO_OP[_name] = _posterize
_DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """A problem with the data set that the user can fix (message is one line)."""


class UnreadableImageError(DataError):
    """An image that cannot be decoded, met by the process whose shard holds it (the others do not see it)."""
    rank_specific = True


def _pil_rgb(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
        return img.convert('RGB')


def _list_classes(split_dir: str) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith('.'))


def check_data_folder(root: str, num_classes: Optional[int] = None, splits: tuple[str, ...] = ('train', 'val')) -> list[str]:
    """Validate the folder layout before any worker starts; returns the class names."""
    if not root:
        raise DataError('no data set given: pass --data-path <folder with train/ and val/>')
    if not os.path.isdir(root):
        raise DataError(f"--data-path '{root}' does not exist or is not a folder")
    classes = None
    for split in splits:
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise DataError(f"'{root}' has no '{split}/' folder; expected {root}/{split}/<class>/<image> "
                            f"(ImageNet layout)")
        names = _list_classes(d)
        if not names:
            raise DataError(f"'{d}' has no class sub-folders; put images in {d}/<class>/")
        for name in names:
            with os.scandir(os.path.join(d, name)) as it:
                if not any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in it):
                    raise DataError(f"class folder '{os.path.join(d, name)}' has no images "
                                    f"(extensions: {', '.join(IMG_EXTENSIONS)}); add images or remove it")
        if classes is None:
            classes = names
        elif names != classes:
            only_a = sorted(set(classes) - set(names))[:3]
            only_b = sorted(set(names) - set(classes))[:3]
            raise DataError(f"train/ and {split}/ hold different classes (only in train: {only_a}, "
                            f"only in {split}: {only_b}); both splits need the same class folders")
    assert classes is not None
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"MODEL.NUM_CLASSES is {num_classes} but '{root}' has {len(classes)} classes; "
                        f"set --opts MODEL.NUM_CLASSES {len(classes)}")
    return classes


class SafeImageFolder(ImageFolder):
    """ImageFolder that, for training, replaces an unreadable image by the next readable one.

    Returns ``(image, target, skipped)`` where ``skipped`` counts the unreadable files passed over, so the
    training loop can log the total per epoch. With ``skip_corrupt=False`` a bad file raises ``DataError``.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_corrupt: bool = False,
                 logger: Optional[logging.Logger] = None) -> None:
        super().__init__(root, transform=transform, loader=_pil_rgb)
        self.skip_corrupt = skip_corrupt
        self.logger = logger

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, int]:
        """``index``, or ``(index, seed)`` from ``ResumableDistributedSampler``: the random transforms of this sample
        then draw from ``seed`` alone, whichever worker (or the main process) loads it."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        skipped = 0
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except _DECODE_ERRORS as e:
                if not self.skip_corrupt:
                    raise UnreadableImageError(f"unreadable image '{path}': {type(e).__name__}: {e} "
                                               f"(remove or replace the file)") from None
                skipped += 1
                msg = f"skipping unreadable training image '{path}': {type(e).__name__}"
                if self.logger is not None:
                    self.logger.warning(msg)
                else:
                    warnings.warn(msg)
                continue
            if self.transform is not None:
                if seed is not None:
                    seed_everything(seed)
                img = self.transform(img)
            return img, target, skipped
        raise DataError(f"no readable image in '{self.root}'")


class ResumableDistributedSampler(DistributedSampler):
    """The training sampler of the official code (``DistributedSampler``, shuffled by (seed, epoch), padded to equal
    shares), which can start after the first ``start_index`` items of this rank's share (mid-epoch resume; same
    order as an uninterrupted epoch; ``start_index`` resets to 0 after use), and hands each index over with the seed
    of its random transforms, derived from (seed, epoch, position in the epoch's global order).

    Positions are global (rank r of W takes positions r, r + W, ...), so a sample's augmentation depends on the
    epoch and the data order only, not on the process count, the batch size or the worker count.
    """

    def __init__(self, dataset: Dataset, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self.start_index = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # this rank's share, in the official order
        for i in range(self.start_index, len(indices)):
            position = i * self.num_replicas + self.rank
            yield indices[i], derive_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes items ``r, r+W, r+2W, ...``: no padding, no duplicates, in order."""

    def __init__(self, num_items: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, num_items, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_transform(config, is_train: bool) -> Callable:
    size = config.DATA.IMG_SIZE
    mean, std = tuple(config.DATA.MEAN), tuple(config.DATA.STD)
    if is_train:
        aa = config.AUG.AUTO_AUGMENT
        return create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=aa if aa and aa.lower() != 'none' else None,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
            mean=mean,
            std=std,
        )
    interp = transforms.InterpolationMode(config.DATA.INTERPOLATION if config.DATA.INTERPOLATION != 'random' else 'bicubic')
    if config.TEST.CROP:
        resize = [transforms.Resize(int(math.floor(size / config.TEST.CROP_PCT)), interpolation=interp),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interp)]
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(mean, std)])


def build_mixup(config) -> Optional[Mixup]:
    aug = config.AUG
    if aug.MIXUP <= 0 and aug.CUTMIX <= 0 and aug.CUTMIX_MINMAX is None:
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def build_dataset(config, is_train: bool, logger: Optional[logging.Logger] = None) -> SafeImageFolder:
    root = os.path.join(config.DATA.DATA_PATH, 'train' if is_train else 'val')
    return SafeImageFolder(root, transform=build_transform(config, is_train),
                           skip_corrupt=is_train and config.DATA.SKIP_CORRUPT, logger=logger)


PREFETCH_BATCHES = 4  # per worker


class Data(NamedTuple):
    """What ``build_loader`` returns; the training parts are None for evaluation-only runs."""
    dataset_train: Optional[SafeImageFolder]
    dataset_val: SafeImageFolder
    loader_train: Optional[DataLoader]
    loader_val: DataLoader
    mixup_fn: Optional[Mixup]
    class_names: list[str]


def _loader(dataset: Dataset, sampler: Sampler, config, batch_size: int, drop_last: bool, persistent: bool,
            pin_memory: bool) -> DataLoader:
    workers = config.DATA.NUM_WORKERS
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory,
                      drop_last=drop_last, persistent_workers=persistent and workers > 0,
                      prefetch_factor=PREFETCH_BATCHES if workers > 0 else None)


def build_loader(config, rank: int, world_size: int, logger: Optional[logging.Logger] = None, train: bool = True,
                 device: Optional[torch.device] = None) -> Data:
    """The data of a run (evaluation and throughput runs need no training folder contents). Batches are pinned
    when they go to a CUDA ``device`` (``DATA.PIN_MEMORY``), so the loops copy them with ``non_blocking=True``."""
    class_names = check_data_folder(config.DATA.DATA_PATH, config.MODEL.NUM_CLASSES,
                                    splits=('train', 'val') if train else ('val',))
    pin = bool(config.DATA.PIN_MEMORY) and device is not None and device.type == 'cuda'
    dataset_val = build_dataset(config, is_train=False, logger=logger)
    loader_val = _loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size), config,
                         config.DATA.BATCH_SIZE, drop_last=False, persistent=True, pin_memory=pin)
    if not train:
        return Data(None, dataset_val, None, loader_val, None, class_names)
    dataset_train = build_dataset(config, is_train=True, logger=logger)
    sampler = ResumableDistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=config.SEED)
    if len(sampler) < config.DATA.BATCH_SIZE:
        raise DataError(f"the training set gives {len(sampler)} images per process, fewer than one batch of "
                        f"{config.DATA.BATCH_SIZE}; lower --batch-size")
    # Every sample carries its own seed (the sampler's), so workers can persist across epochs.
    loader_train = _loader(dataset_train, sampler, config, config.DATA.BATCH_SIZE, drop_last=True, persistent=True,
                           pin_memory=pin)
    return Data(dataset_train, dataset_val, loader_train, loader_val, build_mixup(config), class_names)
