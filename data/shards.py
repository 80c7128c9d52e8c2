"""Tar shards in the webdataset layout (``tools/make_shards.py`` writes them; timm's ``wds`` reader reads them too).

Layout: ``<DATA_PATH>/train/*.tar`` and ``<DATA_PATH>/val/*.tar``; a sample is the tar members that share a key:
``<key>.jpg`` (or ``.jpeg``, ``.png``, ``.webp``, ...: the encoded image) and ``<key>.cls`` (its label, as text).
Each split folder also holds ``classes.txt`` (one class name per line; line ``i`` names label ``i``) and, optionally,
``index.json``: wids' shard index (``{"shardlist": [{"url": "<file>.tar", "nsamples": n}, ...]}``) with the sample
count of each shard. Without it the shards are indexed once at start.

Shards are read by index with ``wids`` (``wids.IndexedTarSamples``: each shard memory-mapped and indexed by its tar
headers), so sampling, mid-epoch resume and exact evaluation work as for folders: a sample's global index is its
position in the shards sorted by file name. Each process reads its own shards: training by
``data.samplers.ShardShareSampler`` (a new shard order every epoch, one contiguous run of it per process, shuffled
within windows of a few shards), evaluation by ``data.samplers.ContiguousSampler`` (process ``r`` reads the r-th run of
shards, in order; every image counted once). A sample that cannot be read (a truncated shard, bytes that do not
decode, a missing image or label) is skipped and counted in training, and an error in evaluation, as for folders.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
from collections import OrderedDict
from typing import Callable, Optional

import numpy as np
from PIL import Image

from .images import DECODE_ERRORS, DataError, mode_problem
from .samples import EncodedImages

CLASSES_FILE = 'classes.txt'
INDEX_FILE = 'index.json'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.ppm', '.bmp', '.pgm', '.tif', '.tiff')  # timm reads jpg/png/webp
LABEL_EXTENSION = '.cls'
OPEN_SHARDS = 8  # shards kept open (memory-mapped) per process: more than the sampler's shuffle window
# What opening or indexing a damaged shard raises inside wids.
SHARD_ERRORS = (OSError, ValueError, struct.error, AssertionError, IndexError, KeyError, UnicodeDecodeError)


def list_shards(split_dir: str) -> list[str]:
    """The ``.tar`` files of a split folder, sorted by name."""
    try:
        return sorted(n for n in os.listdir(split_dir) if n.endswith('.tar') and not n.startswith('.'))
    except OSError as e:
        raise DataError(f"cannot read the folder '{split_dir}': {e.strerror or e}") from None


def is_shard_folder(root: str) -> bool:
    """Whether ``root`` holds tar shards: a ``.tar`` file or a ``classes.txt`` at the top of ``train/`` or ``val/``
    (class folders hold images in sub-folders, never there)."""
    for split in ('train', 'val'):
        d = os.path.join(root, split)
        if os.path.isdir(d) and (list_shards(d) or os.path.isfile(os.path.join(d, CLASSES_FILE))):
            return True
    return False


def read_classes(split_dir: str) -> list[str]:
    path = os.path.join(split_dir, CLASSES_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            names = [line.rstrip('\r\n') for line in f if line.strip()]
    except OSError:
        raise DataError(f"'{path}' not found: tar shards need their class names, one per line (label i on line "
                        f"i + 1; tools/make_shards.py writes it)") from None
    if not names:
        raise DataError(f"'{path}' names no classes")
    return names


def _open_shard(path: str):
    from wids.wids import IndexedTarSamples
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # wids prints
        return IndexedTarSamples(path=path)


def shard_lengths(split_dir: str, shards: list[str], logger: Optional[logging.Logger] = None) -> list[int]:
    """Samples per shard: from ``index.json`` when it lists exactly these shards, else by indexing each shard."""
    index_path = os.path.join(split_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding='utf-8') as f:
                listed = {os.path.basename(s['url']): int(s['nsamples']) for s in json.load(f)['shardlist']}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"'{index_path}' is not a wids shard index ({type(e).__name__}: {e}); remove it or "
                            f"write the shards again (tools/make_shards.py)") from None
        if sorted(listed) != shards:
            missing = sorted(set(listed) - set(shards))[:3]
            extra = sorted(set(shards) - set(listed))[:3]
            raise DataError(f"'{index_path}' does not list the shards of '{split_dir}' (listed but missing: "
                            f"{missing}; present but not listed: {extra}); remove it or write the shards again")
        return [listed[s] for s in shards]
    if logger is not None:
        logger.info(f"data: no {INDEX_FILE} in '{split_dir}': indexing its {len(shards)} shards")
    lengths = []
    for name in shards:
        try:
            shard = _open_shard(os.path.join(split_dir, name))
        except SHARD_ERRORS as e:
            raise DataError(f"cannot index the shard '{os.path.join(split_dir, name)}' ({type(e).__name__}: {e}); "
                            f"write it again") from None
        lengths.append(len(shard))
        shard.close()
    return lengths


def check_shard_split(root: str, split: str, logger: Optional[logging.Logger] = None
                      ) -> tuple[list[str], list[int], list[str]]:
    """(shard paths, samples per shard, class names) of a split, or DataError."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(f"'{root}' has no '{split}/' folder; expected {root}/{split}/*.tar (tar shards) or "
                        f"{root}/{split}/<class>/<image> (ImageNet layout)")
    shards = list_shards(split_dir)
    if not shards:
        raise DataError(f"'{split_dir}' holds no .tar shards (but '{root}' holds shards elsewhere); put the "
                        f"{split} shards there (tools/make_shards.py)")
    lengths = shard_lengths(split_dir, shards, logger)
    return [os.path.join(split_dir, s) for s in shards], lengths, read_classes(split_dir)


class ShardImages(EncodedImages):
    """The samples of a split's shards by global index (shards in name order); labels are read with the images."""

    def __init__(self, root: str, shards: list[str], lengths: list[int], classes: list[str],
                 transform: Optional[Callable] = None, skip_corrupt: bool = False, lazy: bool = False,
                 logger: Optional[logging.Logger] = None) -> None:
        super().__init__(root, None, classes, transform=transform, skip_corrupt=skip_corrupt, lazy=lazy, logger=logger)
        self.shards, self.lengths = shards, lengths
        self.ends = np.cumsum(lengths)  # global index -> shard by bisection: no per-sample objects (forked workers)
        self._open: OrderedDict[int, object] = OrderedDict()
        self._pid = -1

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(shard, sample within it) of global sample ``index``."""
        s = int(np.searchsorted(self.ends, index, side='right'))
        return s, index - (int(self.ends[s - 1]) if s else 0)

    def __getstate__(self) -> dict:
        return {**self.__dict__, '_open': OrderedDict(), '_pid': -1}

    def shard(self, s: int):
        """Shard ``s``, opened by this process (the ``OPEN_SHARDS`` most recently used stay open)."""
        if self._pid != os.getpid():
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s]
        try:
            opened = _open_shard(self.shards[s])
        except SHARD_ERRORS as e:
            raise OSError(f'cannot index the shard ({type(e).__name__}: {e})') from None
        self._open[s] = opened
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)[1].close()
        return opened

    def read(self, index: int) -> tuple[bytes, int]:
        s, k = self.locate(index)
        shard = self.shard(s)
        if k >= len(shard):
            raise OSError(f'the shard holds {len(shard)} samples, its index says {self.lengths[s]}')
        try:
            sample = shard[k]
        except SHARD_ERRORS as e:
            raise OSError(f'{type(e).__name__}: {e}') from None
        images = [ext for ext in sample if ext.lower() in IMAGE_EXTENSIONS]
        if not images or LABEL_EXTENSION not in sample:
            raise OSError(f"sample '{sample.get('__key__')}' has no image ({', '.join(IMAGE_EXTENSIONS)}) or no "
                          f"label ({LABEL_EXTENSION})")
        text = sample[LABEL_EXTENSION].getvalue().decode('ascii', 'replace').strip()
        if not text.isdigit() or int(text) >= len(self.classes):
            raise OSError(f"sample '{sample['__key__']}' has the label {text!r}, not one of 0..{len(self.classes) - 1}")
        return sample[images[0]].getvalue(), int(text)

    def describe(self, index: int) -> str:
        s, k = self.locate(index)
        return f"#{k} of the shard '{self.shards[s]}'"

    def header_problems(self) -> list[tuple[str, str]]:
        """(sample, problem) for every sample whose label or image header cannot be read, without decoding pixels."""
        bad = []
        for i in range(len(self)):
            try:
                data, _ = self.read(i)
                with Image.open(io.BytesIO(data)) as img:
                    problem = mode_problem(img)
            except DECODE_ERRORS as e:
                problem = f'{type(e).__name__}: {e}'
            if problem:
                bad.append((self.describe(i), problem))
        for opened in self._open.values():
            opened.close()
        self._open.clear()
        return bad
