"""ImageNet-style folders: ``<DATA_PATH>/train/<class>/*`` and ``<DATA_PATH>/val/<class>/*``, and ``build_loader``,
which reads a folder here and a zip or tar shards through ``data/formats.py``.

What a split holds has one definition, used by the folder check and by the data set alike: the classes are its
sub-folders that are not hidden (``list_classes``); a class's images are the regular files (or links to them) with
an image extension in its folder and the folders below it, hidden names skipped, symlinks followed but each real
folder once (``list_images``); what is left out is counted (``ListingReport``). Images are read by
``data.images.load_rgb``. A validation split must not share images with the training split (``check_split_overlap``).

Samplers (``data/samplers.py``): training shards with a ``DistributedSampler`` that can start mid-epoch (preemption
resume); evaluation shards *without padding* (rank r takes items r, r+W, ...), so summed counts cover every image once.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from distributed import any_rank

from .device_loader import worker_transform
from .formats import build_encoded_loader, data_format
from .images import DataError, check_image_headers, load_rgb, open_image_file, special_file_kind
from .loader import Data, begin_run, check_batches, data_loader
from .samplers import ResumableDistributedSampler, ShardSampler
from .samples import FileImages, SkipsUnreadable, describe_split
from .transforms import build_mixup


# ---------------------------------------------------------------------------------------------------------------
# Folders: the classes of a split and the images of a class
# ---------------------------------------------------------------------------------------------------------------
def _hidden(name: str) -> bool:
    """Dot-names (``.cache``, ``.ipynb_checkpoints``, macOS ``._x.jpg``) are left by tools, never data."""
    return name.startswith('.')


def list_classes(split_dir: str) -> list[str]:
    """The classes of a split: its sub-folders that are not hidden, sorted (the label of each is its index)."""
    try:
        with os.scandir(split_dir) as it:
            return sorted(e.name for e in it if not _hidden(e.name) and e.is_dir())
    except OSError as e:
        raise DataError(f"cannot read the folder '{split_dir}': {e.strerror or e}") from None


def _folder_id(path: str) -> tuple[int, int]:
    st = os.stat(path)  # follows symlinks: the real folder
    return st.st_dev, st.st_ino


@dataclass
class ListingReport:
    """What a listing left out: files named like images that are not regular files (``special``: path and kind),
    and files skipped for their extension (count per extension, lower case)."""
    special: list[tuple[str, str]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)

    def ignored_line(self) -> str:
        """'' or e.g. '3 files ignored for their extension (.gif: 2, .jfif: 1)'."""
        if not self.ignored:
            return ''
        counts = sorted(self.ignored.items(), key=lambda kv: (-kv[1], kv[0]))
        kinds = ', '.join(f'{ext}: {n}' for ext, n in counts[:8])
        more = ', ...' if len(self.ignored) > 8 else ''
        return (f'{sum(self.ignored.values())} files ignored for their extension ({kinds}{more}; images are '
                f'{", ".join(IMG_EXTENSIONS)})')


def _walk_images(folder: str, seen: dict[tuple[int, int], str],
                 ancestors: tuple[tuple[int, int], ...] = (),
                 report: Optional[ListingReport] = None) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(folder, its image file names sorted)`` for ``folder`` and each non-hidden folder below it.

    Images are regular files (or links to them) with an image extension; a FIFO, socket or device named like an
    image is never opened (that can block forever) but noted in ``report``, as are files of other extensions.
    Symlinks are followed, as torchvision's ImageFolder does, but each real folder once (``seen`` maps a folder's
    identity to the path it was first listed under, across a split): a link back to an ancestor (a loop, which
    ``os.walk`` follows ~40 levels deep) or to a folder already listed raises DataError naming both paths."""
    try:
        ident = _folder_id(folder)
    except OSError as e:
        raise DataError(f"cannot read the folder '{folder}': {e.strerror or e}") from None
    if ident in ancestors:
        raise DataError(f"symlink loop: '{folder}' leads back to '{seen[ident]}'; remove the link")
    if ident in seen:
        raise DataError(f"'{folder}' is the same folder as '{seen[ident]}': its images would be listed twice; "
                        f"remove one of the two")
    seen[ident] = folder
    try:
        with os.scandir(folder) as it:
            entries = [(e.name, e.path, e.is_dir(), e.is_file()) for e in it if not _hidden(e.name)]
    except OSError as e:
        raise DataError(f"cannot read the folder '{folder}': {e.strerror or e}") from None
    images = []
    for name, path, is_dir, is_file in entries:
        if is_dir:
            continue
        if not name.lower().endswith(IMG_EXTENSIONS):
            if report is not None:
                report.ignored[os.path.splitext(name)[1].lower() or '(none)'] += 1
        elif is_file:
            images.append(name)
        elif report is not None:
            report.special.append((path, special_file_kind(path) or 'not a regular file'))
    yield folder, sorted(images)
    for _, path, _, _ in sorted(e for e in entries if e[2]):
        yield from _walk_images(path, seen, ancestors + (ident,), report)


def list_images(class_dir: str, seen: Optional[dict[tuple[int, int], str]] = None,
                report: Optional[ListingReport] = None) -> list[str]:
    """The images of a class, in torchvision's ``make_dataset`` order (by folder path, then file name) so that a
    folder without hidden names or linked folders gives exactly ImageFolder's samples. Pass one ``seen`` for every
    class of a split to refuse a folder reached twice across classes, and a ``report`` to learn what was left out."""
    seen = {} if seen is None else seen
    return [os.path.join(d, n) for d, names in sorted(_walk_images(class_dir, seen, report=report)) for n in names]


def check_data_folder(root: str, num_classes: Optional[int] = None, splits: tuple[str, ...] = ('train', 'val')) -> list[str]:
    """Validate the folder layout before any worker starts; returns the class names (``list_classes``, the same
    definition the data set uses)."""
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
        names = list_classes(d)
        if not names:
            raise DataError(f"'{d}' has no class sub-folders; put images in {d}/<class>/")
        for name in names:
            if not any(files for _, files in _walk_images(os.path.join(d, name), {})):  # stops at the first image
                raise DataError(_no_images(os.path.join(d, name)))
        if classes is None:
            classes = names
        elif names != classes:
            only_a = sorted(set(classes) - set(names))
            only_b = sorted(set(names) - set(classes))
            nfc = {unicodedata.normalize('NFC', n): n for n in only_b}
            twins = [(a, nfc[unicodedata.normalize('NFC', a)]) for a in only_a
                     if unicodedata.normalize('NFC', a) in nfc]
            if twins:
                a, b = twins[0]
                raise DataError(f"train/ and {split}/ write the class {a!r} in different Unicode forms ({ascii(a)} "
                                f"in train, {ascii(b)} in {split}: NFC vs NFD, as macOS or some zip tools write "
                                f"names{f'; {len(twins) - 1} more such classes' if len(twins) > 1 else ''}); "
                                f"rename the folders of one split so both are written alike")
            raise DataError(f"train/ and {split}/ hold different classes (only in train: {only_a[:3]}, "
                            f"only in {split}: {only_b[:3]}); both splits need the same class folders")
    assert classes is not None
    if num_classes is not None and num_classes != len(classes):
        raise DataError(f"MODEL.NUM_CLASSES is {num_classes} but '{root}' has {len(classes)} classes; "
                        f"set --opts MODEL.NUM_CLASSES {len(classes)}")
    return classes


def _no_images(class_dir: str) -> str:
    return (f"class folder '{class_dir}' has no images (extensions: {', '.join(IMG_EXTENSIONS)}; hidden names "
            f"are skipped); add images or remove it")


# ---------------------------------------------------------------------------------------------------------------
# Training and validation must not share images
# ---------------------------------------------------------------------------------------------------------------
_STAT_THREADS = 8  # stats overlap on network file systems; on a local one the threads cost nothing
_SAMPLE_BYTES = 4096


def _stat_all(paths: Sequence[str]) -> list[Optional[os.stat_result]]:
    """``os.stat`` of every path (None where it fails), in chunks over a few threads."""
    def chunk(part: Sequence[str]) -> list[Optional[os.stat_result]]:
        out = []
        for p in part:
            try:
                out.append(os.stat(p))
            except OSError:
                out.append(None)
        return out
    size = max(1, min(4096, len(paths) // _STAT_THREADS + 1))
    parts = [paths[i:i + size] for i in range(0, len(paths), size)]
    with ThreadPoolExecutor(_STAT_THREADS) as pool:
        return [st for part in pool.map(chunk, parts) for st in part]


def _content_key(path: str, size: int, whole: bool) -> Optional[bytes]:
    """A hash of ``_SAMPLE_BYTES`` from the middle of the file, or of the whole file; None if it cannot be read."""
    try:
        with open_image_file(path) as f:
            if not whole:
                f.seek(max(0, size // 2 - _SAMPLE_BYTES // 2))
                return hashlib.blake2b(f.read(_SAMPLE_BYTES), digest_size=16).digest()
            h = hashlib.blake2b(digest_size=32)
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
            return h.digest()
    except OSError:
        return None


def find_split_overlap(train: Sequence[tuple[str, int]], val: Sequence[tuple[str, int]]) -> list[tuple[str, str, str]]:
    """Validation images that are training images: ``(val path, train path, how)`` for each.

    Found by what is cheap to know: a file's identity (device and inode, so links and hard links to one file) from
    one ``stat`` of every image, and, within a class, the size; only files of equal size in the same class are read,
    4 KB of each first, the whole file when those match. A copy filed under another class is not looked for (that
    would read a large share of a big training set at every start)."""
    val_stats = _stat_all([p for p, _ in val])
    identity: dict[tuple[int, int], str] = {}
    by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for (path, label), st in zip(val, val_stats):
        if st is not None:
            identity[(st.st_dev, st.st_ino)] = path
            by_size[(label, st.st_size)].append(path)
            sizes[path] = st.st_size
    found, candidates = [], []
    for (path, label), st in zip(train, _stat_all([p for p, _ in train])):
        if st is None:
            continue
        same = identity.get((st.st_dev, st.st_ino))
        if same is not None:
            found.append((same, path, 'the same file as'))
        elif (label, st.st_size) in by_size:
            candidates.append((path, st.st_size, by_size[(label, st.st_size)]))
    linked = {v for v, _, _ in found}
    keys: dict[tuple[str, bool], Optional[bytes]] = {}

    def key(path: str, size: int, whole: bool) -> Optional[bytes]:
        if (path, whole) not in keys:
            keys[(path, whole)] = _content_key(path, size, whole)
        return keys[(path, whole)]
    for path, size, val_paths in candidates:
        for v in val_paths:
            if v in linked or key(path, size, False) is None or key(path, size, False) != key(v, size, False):
                continue
            if key(path, size, True) == key(v, size, True):
                found.append((v, path, 'a byte-identical copy of'))
                linked.add(v)
    return found


def check_split_overlap(dataset_train: 'SafeImageFolder', dataset_val: 'SafeImageFolder') -> None:
    """Raise DataError when validation images are training images (``find_split_overlap``), naming one and the
    count; the same folder given as both splits is named as such."""
    train_root, val_root = os.path.realpath(dataset_train.root), os.path.realpath(dataset_val.root)
    if train_root == val_root:
        raise DataError(f"'{dataset_train.root}' and '{dataset_val.root}' are the same folder (a link?): the model "
                        f"would be validated on its training images; give val/ its own images (or set "
                        f"DATA.CHECK_OVERLAP False if you mean it)")
    found = find_split_overlap(dataset_train.samples, dataset_val.samples)
    if found:
        v, t, how = found[0]
        raise DataError(f"{len(found)} of the {len(dataset_val)} validation images are training images: '{v}' is "
                        f"{how} '{t}'; validating on them measures memory, not accuracy. Remove them from one split "
                        f"(or set DATA.CHECK_OVERLAP False if you mean it)")


class SafeImageFolder(SkipsUnreadable, ImageFolder):
    """ImageFolder that, for training, replaces an unreadable image by the next readable one.

    Returns ``(image, target, skipped)`` where ``skipped`` counts the unreadable files passed over, so the
    training loop can log the total per epoch. With ``skip_corrupt=False`` a bad file raises ``DataError``.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_corrupt: bool = False,
                 logger: Optional[logging.Logger] = None) -> None:
        self.listing = ListingReport()  # filled by make_dataset, which ImageFolder's __init__ calls
        super().__init__(root, transform=transform, loader=load_rgb)
        self.skip_corrupt = skip_corrupt
        self.logger = logger

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """``list_classes``: the same classes ``check_data_folder`` sees (torchvision's would count hidden folders)."""
        classes = list_classes(directory)
        if not classes:
            raise DataError(f"'{directory}' has no class sub-folders; put images in {directory}/<class>/")
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions: Optional[tuple[str, ...]] = None,
                     is_valid_file: Optional[Callable[[str], bool]] = None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """``(path, label)`` for every image of every class by ``list_images`` (torchvision's order; image
        extensions, hidden names skipped, each real folder once); ``extensions``/``is_valid_file`` are not used.
        What was left out is in ``self.listing``."""
        seen: dict[tuple[int, int], str] = {}
        samples = []
        for name in sorted(class_to_idx):
            paths = list_images(os.path.join(directory, name), seen, getattr(self, 'listing', None))
            if not paths and not allow_empty:
                raise DataError(_no_images(os.path.join(directory, name)))
            samples.extend((p, class_to_idx[name]) for p in paths)
        return samples

    def decode_sample(self, index: int) -> tuple[object, int]:
        """Sample ``index`` read as 8-bit RGB (``data.images.load_rgb``), before the transform."""
        path, target = self.samples[index]
        return self.loader(path), target

    def describe(self, index: int) -> str:
        return f"'{self.samples[index][0]}'"


def report_listing(dataset: SafeImageFolder, what: str, logger: Optional[logging.Logger] = None) -> None:
    """Say what the listing of a split left out: files of other extensions (a log line with the count per
    extension), and files named like images that are not regular files: skipped with a warning in training, an
    error in validation (which never skips images)."""
    special = dataset.listing.special
    if special and what == 'validation':
        path, kind = special[0]
        more = f' (and {len(special) - 1} more)' if len(special) > 1 else ''
        raise DataError(f"validation file '{path}' is {kind}, not an image file{more}; remove it (validation never "
                        f"skips images)")
    if special:
        path, kind = special[0]
        msg = (f"data: skipping {len(special)} training files named like images that are not regular files (e.g. "
               f"'{path}' is {kind})")
        logger.warning(msg) if logger is not None else warnings.warn(msg)
    line = dataset.listing.ignored_line()
    if line and logger is not None:
        logger.info(f"data: {what} split '{dataset.root}': {line}")


def build_dataset(config, is_train: bool, logger: Optional[logging.Logger] = None) -> Dataset:
    """A split of a folder data set, with the workers' part of ``build_transform`` (``data/device_loader.py``), its
    listing reported (``report_listing``); training with ``DATA.FAST_DECODE`` reads the same files as bytes, for
    the lazy decode."""
    root = os.path.join(config.DATA.DATA_PATH, 'train' if is_train else 'val')
    transform = worker_transform(config, is_train).transform
    skip = is_train and config.DATA.SKIP_CORRUPT
    folder = SafeImageFolder(root, transform=transform, skip_corrupt=skip, logger=logger)
    report_listing(folder, 'training' if is_train else 'validation', logger)
    if is_train and config.DATA.FAST_DECODE:
        return FileImages(root, folder.samples, folder.classes, transform=transform, skip_corrupt=skip, lazy=True,
                          logger=logger)
    return folder


def build_loader(config, rank: int, world_size: int, logger: Optional[logging.Logger] = None, train: bool = True,
                 device: Optional[torch.device] = None) -> Data:
    """The data of a run (evaluation and throughput runs need no training folder contents). Batches are pinned
    when they go to a CUDA ``device`` (``DATA.PIN_MEMORY``), so the loops copy them with ``non_blocking=True``.
    A zip (``--zip``) or tar shards are read by ``data/formats.py``."""
    if data_format(config) != 'folder':
        begin_run()
        return build_encoded_loader(config, rank, world_size, logger, train=train, device=device)
    class_names = check_data_folder(config.DATA.DATA_PATH, config.MODEL.NUM_CLASSES,
                                    splits=('train', 'val') if train else ('val',))
    begin_run()  # a run starts: its workers leave SIGTERM to it
    pin = bool(config.DATA.PIN_MEMORY) and device is not None and device.type == 'cuda'
    dataset_val = build_dataset(config, is_train=False, logger=logger)
    loader_val = data_loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size), config,
                         config.DATA.BATCH_SIZE, drop_last=False, pin_memory=pin, device=device)
    if not train:
        if logger is not None:
            logger.info(f'data: val {describe_split(dataset_val)}')
        return Data(None, dataset_val, None, loader_val, None, class_names)
    dataset_train = build_dataset(config, is_train=True, logger=logger)
    if logger is not None:
        logger.info(f'data: train {describe_split(dataset_train)}; val {describe_split(dataset_val)}')
    if config.DATA.CHECK_OVERLAP:
        # Rank 0 reads the folders; every rank learns the outcome, so all stop together.
        t0, problem = time.perf_counter(), None
        if rank == 0:
            try:
                check_split_overlap(dataset_train, dataset_val)
            except DataError as e:
                problem = e
        if any_rank(problem is not None):
            raise problem or DataError('the validation split shares images with the training split')
        if logger is not None:
            logger.info(f'data: no validation image is a training image (checked in {time.perf_counter() - t0:.1f} s)')
    # Every rank checks every validation file (not its shard), so a bad file stops all ranks alike, before training.
    t0 = time.perf_counter()
    check_image_headers([path for path, _ in dataset_val.samples])
    if logger is not None:
        logger.info(f'data: {len(dataset_val)} validation image headers read in {time.perf_counter() - t0:.1f} s')
    sampler = ResumableDistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                          seed=config.SEED)
    check_batches(config, len(sampler))
    loader_train = data_loader(dataset_train, sampler, config, config.DATA.BATCH_SIZE, drop_last=True, pin_memory=pin,
                           device=device, is_train=True)
    return Data(dataset_train, dataset_val, loader_train, loader_val, build_mixup(config), class_names)
