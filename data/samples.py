"""Data sets of encoded images read as bytes (a zip member, a tar-shard member, a file), one base for all of them.

``EncodedImages`` holds ``(where, label)`` per sample and leaves reading the bytes to its subclass. It keeps the
promises of the folder data set (``data.build.SafeImageFolder``): indices may come as ``(index, seed)`` from the
resumable samplers (the sample's random transforms then draw from that seed alone), every image becomes 8-bit RGB
by ``to_rgb``, and an image that cannot be read or decoded is, in training, replaced by the next readable one and
counted (``(image, target, skipped)``), in evaluation an error naming it.

With ``lazy=True`` the transform gets the image opened but not decoded (``data.device_loader.FastResizedCrop`` then
decodes only what its crop needs); a decode failure in that transform arrives as ``DecodeFailed``.
"""
from __future__ import annotations

import io
import logging
import os
import warnings
import zipfile
from collections import Counter
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import (DECODE_ERRORS, DataError, UnreadableImageError, UnsupportedImageError, image_shape_problem,
                     open_image_file, to_rgb)
from utils import seed_cpu_generators


class DecodeFailed(Exception):
    """Raised by a transform that decodes a lazily opened image, for an image that cannot be decoded."""


# What reading and decoding one sample may raise for a bad sample (not for a bug in the transforms).
READ_ERRORS = DECODE_ERRORS + (zipfile.BadZipFile, DecodeFailed, EOFError)


def open_lazy(data: bytes) -> Image.Image:
    """The image encoded in ``data`` with its header read and its pixels not yet decoded; its shape checked from the
    header as for files (``data.build.image_shape_problem``: a thin image would cost gigapixels when resized)."""
    img = Image.open(io.BytesIO(data))
    problem = image_shape_problem(img)
    if problem:
        raise UnsupportedImageError(problem)
    return img


def decode_rgb(data: bytes) -> Image.Image:
    """The image encoded in ``data``, decoded, as 8-bit RGB (checked as ``open_lazy`` checks it)."""
    img = open_lazy(data)
    img.load()
    return to_rgb(img)


class SkipsUnreadable:
    """``__getitem__`` of every image data set here: ``index``, or ``(index, seed)`` from the resumable samplers (the
    sample's random transforms then draw from ``seed`` alone, whichever worker loads it), gives ``(image, target,
    skipped)``. In training (``skip_corrupt``) an unreadable image is replaced by the next readable one, counted in
    ``skipped`` and warned about by name; otherwise it is an ``UnreadableImageError`` naming it.

    A subclass gives ``decode_sample(index) -> (image, label)`` (raising one of ``READ_ERRORS`` for a bad sample),
    ``describe(index)``, ``transform``, ``skip_corrupt``, ``logger`` and ``root``. An error of the transform is not
    a read error (a bug shows), except ``DecodeFailed``: a transform that decodes a lazily opened image raises it."""

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, int]:
        index, seed = index if isinstance(index, tuple) else (index, None)
        skipped = 0
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            try:
                try:
                    img, label = self.decode_sample(i)
                except READ_ERRORS as e:
                    raise _ReadFailed(e) from None
                if self.transform is not None:
                    if seed is not None:
                        seed_cpu_generators(seed)
                    try:
                        img = self.transform(img)
                    except DecodeFailed as e:
                        raise _ReadFailed(e.__cause__ if e.__cause__ is not None else e) from None
            except _ReadFailed as failed:
                cause = failed.cause
                if not self.skip_corrupt:
                    raise UnreadableImageError(f"unreadable image {self.describe(i)}: {type(cause).__name__}: "
                                               f"{cause} (remove or replace it)") from None
                skipped += 1
                msg = f'skipping unreadable training image {self.describe(i)}: {type(cause).__name__}'
                if self.logger is not None:
                    self.logger.warning(msg)
                else:
                    warnings.warn(msg)
                continue
            return img, label, skipped
        raise DataError(f"no readable image in '{self.root}'")


class _ReadFailed(Exception):
    """A sample could not be read or decoded (``cause``): the one thing ``SkipsUnreadable`` skips."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class EncodedImages(SkipsUnreadable, Dataset):
    """Samples ``(where, label)``; subclasses implement ``read(index) -> (bytes, label)`` and may override
    ``describe``; the label read wins over the listed one (``targets``), which only tar shards do not know before.

    Attributes as torchvision's ``ImageFolder`` has them, for the logging helpers: ``root``, ``classes``,
    ``samples``, ``targets``."""

    def __init__(self, root: str, samples: Optional[Sequence[tuple[str, int]]], classes: Sequence[str],
                 transform: Optional[Callable] = None, skip_corrupt: bool = False, lazy: bool = False,
                 logger: Optional[logging.Logger] = None) -> None:
        self.root = root
        self.samples = list(samples) if samples is not None else None   # None: the subclass knows its length
        self.targets = [label for _, label in self.samples] if samples is not None else None
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt
        self.decode = open_lazy if lazy else decode_rgb
        self.logger = logger

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[bytes, int]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """How a message names sample ``index``."""
        return f"'{os.path.join(self.root, self.samples[index][0])}'"

    def decode_sample(self, index: int) -> tuple[Image.Image, int]:
        """Read and decode sample ``index`` (lazily: the header only): (image, label); raises one of ``READ_ERRORS``
        for a bad sample."""
        data, label = self.read(index)
        return self.decode(data), label


class FileImages(EncodedImages):
    """Image files by path (the samples of a folder data set, read as bytes for the lazy fast decode)."""

    def read(self, index: int) -> tuple[bytes, int]:
        path, label = self.samples[index]
        with open_image_file(path) as f:  # a regular file only (a FIFO swapped in would block an open)
            return f.read(), label

    def describe(self, index: int) -> str:
        return f"'{self.samples[index][0]}'"


def count_images(dataset: Dataset) -> dict[str, int]:
    """Images per class of a built data set, by class name (every class listed, in label order)."""
    counts = Counter(dataset.targets)
    return {name: counts.get(i, 0) for i, name in enumerate(dataset.classes)}


def describe_split(dataset: Dataset) -> str:
    """One log line's worth: how many images a split holds, in how many classes, and the spread per class (an
    odd maximum points at a folder that holds more than it should)."""
    per_class = list(count_images(dataset).values())
    return (f"'{dataset.root}': {len(dataset)} images in {len(per_class)} classes "
            f"({min(per_class)}..{max(per_class)} per class)")
