"""A loader that feeds the device: workers decode and augment, the device converts, normalises and erases.

Data workers hand over 8-bit images, (B, H, W, C) uint8 (NHWC: each image's pixels as Pillow holds them, one copy);
the layout change to NCHW, the conversion to float, the normalisation and random erasing run on the training device
(the job of timm's ``PrefetchLoader``) (mixup already does, in
``engine.train_one_epoch``). The pixels are exactly those of the all-CPU pipeline (``data.build.build_transform``):

* the worker transform *is* that pipeline with its tensor tail removed (``ToTensor``, ``Normalize``,
  ``RandomErasing``), so every random draw before it is the same;
* the device repeats the tail's arithmetic in the same order (``/255``, ``-mean``, ``/std`` in float32);
* random erasing's rectangles are drawn in the worker by timm's own ``RandomErasing`` (a copy that fills with zeros,
  which draws no random numbers), and its noise is drawn with the worker's CPU generator state of that moment,
  handed over with the sample: the same values, then copied into place on the device.

``persistent_workers``: a loader's workers start once and serve every epoch; ``release_workers`` (data/build.py)
ends them with the run.

``DATA.FAST_DECODE`` replaces the training crop by ``FastResizedCrop``: JPEG draft mode (the decoder scales by 1/2,
1/4 or 1/8 in the DCT domain) when the crop is shrunk by 1.5x or more, and one bilinear resize of the crop box (with a
reducing gap) instead of a crop and a bicubic resize; the auto-augmentation's rotations, shears and translations
resample bilinearly too (``with_fast_resample``). Other pixels, the same random draws; evaluation is never changed.
docs/data.md has the measurements behind these choices.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import weakref
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

from .images import DECODE_ERRORS, to_rgb
from .samples import DecodeFailed
from .transforms import build_transform

# Pillow's resize first reduces by an integer factor (box filter) while the image stays at least this many times the
# output size, then resamples: the reducing_gap of Pillow's docs ("2.0 or 3.0: nearly indistinguishable").
REDUCING_GAP: Optional[float] = 3.0
MAX_DRAFT_REDUCTION = 8  # the JPEG decoder scales by 1/2, 1/4 or 1/8
# A crop shrunk by 1.5x or more is decoded at 1/2 (then at most a 1.33x upscale); by 3x or more at 1/4, and so on.
MIN_DRAFT_SHRINK = 1.5
# The fast path resamples bilinearly (a narrower filter than bicubic's: fewer taps per pixel), in the crop and in
# the auto-augmentation's geometric ops.
FAST_RESAMPLE: Optional[int] = Image.BILINEAR


class Erase(NamedTuple):
    """Random erasing of one image, as drawn in the worker: rectangles (top, left, h, w) in pixels, and the state of
    the worker's CPU generator when the noise would have been drawn."""
    rects: tuple[tuple[int, int, int, int], ...]
    generator_state: torch.Tensor


class _Rectangles:
    """Stands in for the image in ``RandomErasing._erase``: records ``img[:, top:top+h, left:left+w] = ...``."""

    def __init__(self) -> None:
        self.rects: list[tuple[int, int, int, int]] = []

    def __setitem__(self, key, value) -> None:  # noqa: ARG002 - the fill is drawn on the device
        _, rows, cols = key
        self.rects.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start))


class EraseRecorder:
    """timm's ``RandomErasing`` drawing its rectangles in the worker without filling them (``Erase`` per image)."""

    def __init__(self, erasing: RandomErasing) -> None:
        # A copy whose fill is a (C, 1, 1) zero tensor: no noise drawn, no torch random numbers consumed; the
        # rectangles come from Python's random module, as in the original.
        self.erasing = copy.copy(erasing)
        self.erasing.per_pixel = self.erasing.rand_color = False
        self.erasing.device = 'cpu'

    def __call__(self, img: np.ndarray) -> tuple[np.ndarray, Optional[Erase]]:
        """img: (H, W, C) uint8. Returns it with its ``Erase`` (None when this image is not erased)."""
        recorded = _Rectangles()
        height, width, chan = img.shape
        self.erasing._erase(recorded, chan, height, width, torch.float32)
        if not recorded.rects:
            return img, None
        # the zero fill consumed no torch random numbers: the state is the one the noise would have started from
        return img, Erase(tuple(recorded.rects), torch.default_generator.get_state())


class FastResizedCrop(RandomResizedCropAndInterpolation):
    """timm's random resized crop on a lazily opened image: the same crop parameters (the same random draws), then
    a JPEG decoded at 1/2 of its size when the crop shrinks by ``MIN_DRAFT_SHRINK`` or more (1/4 from twice that, down
    to 1/8), and one
    resize of the crop box (no crop copy), bilinear, with a reducing gap. Decode failures are raised as
    ``DecodeFailed``."""

    def __call__(self, img: Image.Image) -> Image.Image:
        i, j, h, w = self.get_params(img, self.scale, self.ratio)
        interpolation = (random.choice(self.interpolation) if isinstance(self.interpolation, (tuple, list))
                         else self.interpolation)
        out_h, out_w = self.size
        full_w, full_h = img.size
        shrink = min(w / out_w, h / out_h)
        try:
            if img.format == 'JPEG' and shrink >= MIN_DRAFT_SHRINK:
                reduction = min(MAX_DRAFT_REDUCTION, 2 ** int(math.log2(2 * shrink / MIN_DRAFT_SHRINK)))
                # Pillow picks the largest 1/2^k scale whose integer division still reaches the requested size
                img.draft('RGB', (full_w // reduction, full_h // reduction))
            img.load()
            img = to_rgb(img)
        except DECODE_ERRORS as e:
            raise DecodeFailed(str(e)) from e
        sx, sy = img.width / full_w, img.height / full_h
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        resample = FAST_RESAMPLE if FAST_RESAMPLE is not None else pil_modes_mapping[interpolation]
        return img.resize((out_w, out_h), resample, box=box, reducing_gap=REDUCING_GAP)


def with_fast_resample(op: Callable) -> Callable:
    """``op`` itself, or for timm's auto-augmentations (RandAugment, AutoAugment, AugMix) a copy whose geometric ops
    (rotate, shear, translate) resample with ``FAST_RESAMPLE``: Pillow's affine transform is its costliest step. A
    random choice of resampling stays a random choice (of as many, all ``FAST_RESAMPLE``): the same random draws."""
    if FAST_RESAMPLE is None or not isinstance(op, (AutoAugment, RandAugment, AugMixAugment)):
        return op
    op = copy.deepcopy(op)
    augment_ops = [a for sub in op.policy for a in sub] if isinstance(op, AutoAugment) else op.ops
    for augment in augment_ops:
        resample = augment.kwargs.get('resample')
        if isinstance(resample, (tuple, list)):
            augment.kwargs['resample'] = (FAST_RESAMPLE,) * len(resample)
        elif resample is not None:
            augment.kwargs['resample'] = FAST_RESAMPLE
    return op


class WorkerTransform(NamedTuple):
    """What the workers run, and the tail the device runs after it."""
    transform: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]
    erasing: Optional[RandomErasing]


def split_transform(full: transforms.Compose, fast: bool = False) -> WorkerTransform:
    """``full`` (``data.build.build_transform``) cut before its tensor tail; the tail's constants for the device.

    The worker part ends with ``ToHWC`` (uint8, no scaling), followed by an ``EraseRecorder`` when the tail
    erases. ``fast`` replaces a leading random resized crop by ``FastResizedCrop`` and resamples the
    auto-augmentation's geometric ops with ``FAST_RESAMPLE`` (``with_fast_resample``)."""
    ops = list(full.transforms)
    cut = next(k for k, op in enumerate(ops) if isinstance(op, (MaybeToTensor, transforms.ToTensor)))
    tail = ops[cut + 1:]
    normalize = next(op for op in tail if isinstance(op, transforms.Normalize))
    erasing = next((op for op in tail if isinstance(op, RandomErasing)), None)
    assert all(isinstance(op, (transforms.Normalize, RandomErasing)) for op in tail), tail
    head = ops[:cut]
    if fast and head and isinstance(head[0], RandomResizedCropAndInterpolation):
        crop = head[0]
        fast_crop = FastResizedCrop(crop.size, scale=crop.scale, ratio=crop.ratio)
        fast_crop.interpolation = crop.interpolation
        head[0] = fast_crop
    if fast:
        head = [with_fast_resample(op) for op in head]
    worker = head + [ToHWC()] + ([EraseRecorder(erasing)] if erasing is not None else [])
    mean = tuple(float(m) for m in torch.as_tensor(normalize.mean).flatten())
    std = tuple(float(s) for s in torch.as_tensor(normalize.std).flatten())
    return WorkerTransform(transforms.Compose(worker), mean, std, erasing)


class ToHWC:
    """A PIL image as its (H, W, C) uint8 array (one copy of the pixels)."""

    def __call__(self, img: Image.Image) -> np.ndarray:
        return np.asarray(img)


def collate(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Optional[Erase]]]:
    """``(image, target, skipped)`` samples, each image an (H, W, C) uint8 array or ``(array, Erase or None)``.

    Returns (B, H, W, C) uint8 images, (B,) int64 targets, (B,) int64 skip counts, B ``Erase`` or None."""
    images, erases = [], []
    for img, _, _ in batch:
        img, erase = img if isinstance(img, tuple) else (img, None)
        images.append(img)
        erases.append(erase)
    return (torch.from_numpy(np.stack(images)), torch.tensor([b[1] for b in batch], dtype=torch.int64),
            torch.tensor([b[2] for b in batch], dtype=torch.int64), erases)


class DeviceLoader:
    """Iterates a ``DataLoader`` of NHWC uint8 batches (``collate``) as ``(images, targets, skipped)`` on ``device``:
    images (B, C, H, W) float32, normalised and erased as the CPU pipeline would have. On CUDA the next batch is
    copied and prepared on a side stream while the current one is used (timm's ``PrefetchLoader``).

    ``sampler``, ``dataset``, ``batch_size`` and ``len()`` are the wrapped loader's."""

    def __init__(self, loader: DataLoader, device: torch.device, mean: Sequence[float], std: Sequence[float],
                 erasing: Optional[RandomErasing] = None) -> None:
        self.loader = loader
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # 1, C, 1, 1
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)    # 1, C, 1, 1
        self.erasing = erasing

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name in ('sampler', 'dataset', 'batch_size', 'num_workers'):
            return getattr(self.loader, name)
        raise AttributeError(name)

    def prepare(self, images: torch.Tensor, erases: Sequence[Optional[Erase]]) -> torch.Tensor:
        """(B, H, W, C) uint8 on any device -> (B, C, H, W) float32 on ``self.device``: ``ToTensor``'s ``/255``,
        ``Normalize``'s ``-mean`` and ``/std``, then the recorded erasing."""
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()  # B, C, H, W
        x = x.float().div_(255).sub_(self.mean).div_(self.std)
        for k, erase in enumerate(erases):
            if erase is not None:
                self._erase(x[k], erase)
        return x

    def _erase(self, img: torch.Tensor, erase: Erase) -> None:
        """Fill ``erase.rects`` of ``img`` (C, H, W) with what timm's ``_get_pixels`` would have drawn."""
        generator = torch.Generator()
        generator.set_state(erase.generator_state)
        chan = img.shape[0]
        for top, left, h, w in erase.rects:
            if self.erasing.per_pixel:
                fill = torch.empty((chan, h, w), dtype=torch.float32).normal_(generator=generator)
            elif self.erasing.rand_color:
                fill = torch.empty((chan, 1, 1), dtype=torch.float32).normal_(generator=generator)
            else:
                fill = torch.zeros((chan, 1, 1), dtype=torch.float32)
            img[:, top:top + h, left:left + w] = fill.to(img.device, non_blocking=True)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.device.type != 'cuda':
            for images, targets, skipped, erases in self.loader:
                yield self.prepare(images, erases), targets, skipped
            return
        stream = torch.cuda.Stream(self.device)
        pending = None
        for images, targets, skipped, erases in self.loader:
            with torch.cuda.stream(stream):
                ready = (self.prepare(images, erases), targets.to(self.device, non_blocking=True), skipped)
            if pending is not None:
                yield pending
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready[:2]:
                t.record_stream(torch.cuda.current_stream(self.device))
            pending = ready
        if pending is not None:
            yield pending


_LOADERS: 'weakref.WeakSet[DataLoader]' = weakref.WeakSet()


def make_loader(dataset: Dataset, sampler: Sampler, *, batch_size: int, num_workers: int, drop_last: bool,
                pin_memory: bool, device: Optional[torch.device], worker: WorkerTransform,
                worker_init_fn: Optional[Callable[[int], None]] = None) -> DeviceLoader:
    """A ``DataLoader`` of ``dataset`` (whose transform is ``worker.transform``) with persistent workers, wrapped
    to hand its batches over on ``device`` (the CPU when None)."""
    loader = DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=drop_last, collate_fn=collate,
                        worker_init_fn=worker_init_fn if num_workers else None,
                        persistent_workers=num_workers > 0)
    _LOADERS.add(loader)
    return DeviceLoader(loader, device or torch.device('cpu'), worker.mean, worker.std, worker.erasing)


def close_loaders() -> None:
    """End the persistent workers of every loader made here (at the end of a run)."""
    for loader in list(_LOADERS):
        iterator = getattr(loader, '_iterator', None)
        loader._iterator = None
        if iterator is not None and hasattr(iterator, '_shutdown_workers'):
            with contextlib.suppress(Exception):
                iterator._shutdown_workers()


def worker_transform(config, is_train: bool) -> WorkerTransform:
    """The workers' part of ``data.build.build_transform(config, is_train)`` (``split_transform``); the fast decode
    only for training with ``DATA.FAST_DECODE``."""
    return split_transform(build_transform(config, is_train), fast=is_train and bool(config.DATA.FAST_DECODE))
