"""Swin-Transformer's zipped ImageNet (``--zip``), read as the official code reads it.

Layout (Swin's ``get_started.md``): ``<DATA_PATH>/train.zip``, ``train_map.txt``, ``val.zip``, ``val_map.txt``. Each
map line is ``<member>\\t<label>``: a member path inside the zip (e.g. ``n01440764/n01440764_10026.JPEG``, or a bare
``ILSVRC2012_val_00000001.JPEG``) and its integer label. Samples are the map's lines in order; the labels are the
map's, not folder names. Class names come from the first folder of the training members when every label has one
folder of its own (what ``tools/make_zip.py`` writes and ImageNet's ``train_map.txt`` holds), else they are the
labels themselves ('0', '1', ...).

``DATA.CACHE_MODE`` (``--cache-mode``), as the official ``CachedImageFolder``: ``no`` reads every image from the zip
when it is used; ``full`` reads every training image into memory once; ``part`` reads only the images with
``index % world_size == rank`` (this process's share; it then trains on its share alone, as the official
``SubsetRandomSampler`` does, with ``data.samplers.StridedShareSampler``). Validation always caches its ``part``, as
the official code does, and evaluation shards the same way (item ``r, r+W, ...`` on rank ``r``). The cache is one
contiguous byte buffer, so forked data workers share it without copying.
"""
from __future__ import annotations

import io
import logging
import os
import time
import zipfile
from typing import Callable, Optional

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from .images import DECODE_ERRORS, DataError, mode_problem
from .samples import EncodedImages

CACHE_MODES = ('no', 'full', 'part')


def zip_files(root: str, split: str) -> tuple[str, str]:
    """The zip and the map file of ``split`` under ``root``."""
    return os.path.join(root, f'{split}.zip'), os.path.join(root, f'{split}_map.txt')


def read_map(map_path: str, zip_path: str) -> list[tuple[str, int]]:
    """``(member, label)`` per line of a map file, each member checked to be an image in ``zip_path``."""
    if not os.path.isfile(map_path):
        raise DataError(f"'{map_path}' not found: --zip reads {zip_path} with its map file {map_path} (Swin's "
                        f"format: '<member>\\t<label>' per line; tools/make_zip.py writes both)")
    if not os.path.isfile(zip_path):
        raise DataError(f"'{zip_path}' not found: --zip reads it with '{map_path}' (tools/make_zip.py writes both)")
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"'{zip_path}' is not a readable zip file ({e}); write it again (tools/make_zip.py)") from None
    samples = []
    with open(map_path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip('\r\n').split('\t')
            if len(fields) < 2 or not fields[1].strip().isdigit():
                raise DataError(f"'{map_path}' line {number}: expected '<member>\\t<label>', got {line.strip()!r}")
            member = fields[0].strip('/')
            if member not in members:
                raise DataError(f"'{map_path}' line {number} names '{member}', which is not in '{zip_path}'; "
                                f"write the zip and its map again (tools/make_zip.py)")
            if not member.lower().endswith(IMG_EXTENSIONS):
                raise DataError(f"'{map_path}' line {number} names '{member}', which is not an image file "
                                f"(extensions: {', '.join(IMG_EXTENSIONS)})")
            samples.append((member, int(fields[1])))
    if not samples:
        raise DataError(f"'{map_path}' lists no images")
    return samples


def class_names(samples: list[tuple[str, int]]) -> list[str]:
    """One name per label 0..max: each label's folder when every label has exactly one folder of its own, else the
    labels as text."""
    folders: dict[int, set[str]] = {}
    for member, label in samples:
        folders.setdefault(label, set()).add(member.split('/')[0] if '/' in member else '')
    count = max(folders) + 1
    names = {label: next(iter(f)) for label, f in folders.items() if len(f) == 1 and '' not in f}
    if len(names) == count and len(set(names.values())) == count:
        return [names[label] for label in range(count)]
    return [str(label) for label in range(count)]


class ZipImages(EncodedImages):
    """The images of one zip, by its map, with the official cache modes (the module docstring)."""

    def __init__(self, zip_path: str, samples: list[tuple[str, int]], classes: list[str], cache_mode: str,
                 rank: int, world_size: int, transform: Optional[Callable] = None, skip_corrupt: bool = False,
                 lazy: bool = False, logger: Optional[logging.Logger] = None) -> None:
        super().__init__(zip_path, samples, classes, transform=transform, skip_corrupt=skip_corrupt, lazy=lazy,
                         logger=logger)
        self.zip_path, self.cache_mode = zip_path, cache_mode
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid = -1
        n = len(self.samples)
        cached = {'no': [], 'full': range(n), 'part': range(rank, n, world_size)}[cache_mode]
        self.slot = np.full(n, -1, dtype=np.int64)   # sample -> position in the cache, -1 when not cached
        self.cache = np.zeros(0, dtype=np.uint8)     # the cached members' bytes, end to end
        self.offsets = np.zeros(1, dtype=np.int64)   # slot k holds cache[offsets[k]:offsets[k + 1]]
        if len(cached):
            self._fill_cache(list(cached))

    def _fill_cache(self, indices: list[int]) -> None:
        t0 = time.perf_counter()
        zf = self.zipfile()
        sizes = np.array([zf.getinfo(self.samples[i][0]).file_size for i in indices], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.cache = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for k, i in enumerate(indices):
            try:
                data = zf.read(self.samples[i][0])
            except (zipfile.BadZipFile, OSError, EOFError):
                continue  # left out of the cache: read (and reported) when it is used
            if len(data) == sizes[k]:
                self.cache[self.offsets[k]:self.offsets[k + 1]] = np.frombuffer(data, dtype=np.uint8)
                self.slot[i] = k
        if self.logger is not None:
            self.logger.info(f"data: cached {len(indices)} of {len(self.samples)} images of '{self.zip_path}' "
                             f"({self.offsets[-1] / 2**20:.1f} MiB, cache mode {self.cache_mode}) in "
                             f"{time.perf_counter() - t0:.1f} s")

    def zipfile(self) -> zipfile.ZipFile:
        """This process's handle on the zip (forked workers open their own: a shared file offset would mix reads)."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.zip_path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_zip': None, '_zip_pid': -1}

    def read(self, index: int) -> tuple[bytes, int]:
        member, label = self.samples[index]
        k = self.slot[index]
        if k >= 0:
            return self.cache[self.offsets[k]:self.offsets[k + 1]].tobytes(), label
        return self.zipfile().read(member), label

    def describe(self, index: int) -> str:
        return f"'{self.samples[index][0]}' in '{self.zip_path}'"

    def header_problems(self) -> list[tuple[str, str]]:
        """(sample, problem) for every image whose header Pillow cannot read, without decoding pixels."""
        bad = []
        zf = self.zipfile()
        for i, (member, _) in enumerate(self.samples):
            try:
                stream = io.BytesIO(self.read(i)[0]) if self.slot[i] >= 0 else zf.open(member)
                with stream, Image.open(stream) as img:
                    problem = mode_problem(img)
            except DECODE_ERRORS + (zipfile.BadZipFile, EOFError) as e:
                problem = f'{type(e).__name__}: {e}'
            if problem:
                bad.append((self.describe(i), problem))
        return bad


def load_zip_split(root: str, split: str) -> tuple[str, list[tuple[str, int]]]:
    zip_path, map_path = zip_files(root, split)
    return zip_path, read_map(map_path, zip_path)
