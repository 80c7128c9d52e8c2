"""ImageNet-style folders: ``<DATA_PATH>/train/<class>/*`` and ``<DATA_PATH>/val/<class>/*``.

Training uses timm's ``create_transform`` (random resized crop, flip, RandAugment, colour jitter, random
erasing) and timm's ``Mixup``/CutMix; evaluation resizes by ``1/TEST.CROP_PCT`` and centre-crops (bicubic).
Every problem a user can cause with the folder raises ``DataError`` with one line naming the path and the fix.

What a split holds has one definition, used by the folder check and by the data set alike: the classes are its
sub-folders that are not hidden (``list_classes``); a class's images are the regular files (or links to them) with
an image extension in its folder and the folders below it, hidden names skipped, symlinks followed but each real
folder once (``list_images``); what is left out is counted (``ListingReport``). Every image is read as 8-bit RGB by
``to_rgb``: 16-bit images are scaled, transparent ones composited, and modes with no defined meaning refused by name;
its width and height are checked from the header first (``MAX_ASPECT_RATIO``). A validation split must not share
images with the training split (``check_split_overlap``). EXIF orientation is not applied, as in torchvision and timm.

Samplers: training shards with a ``DistributedSampler`` that can start mid-epoch (preemption resume);
evaluation shards *without padding* (rank r takes items r, r+W, ...), so summed counts cover every image once.
"""
from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
import signal
import stat
import time
import unicodedata
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from timm.data import Mixup, create_transform
from timm.data import auto_augment as _timm_aa
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from config import uses_mixup
from distributed import any_rank
from utils import derive_seed, seed_cpu_generators

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
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


class DataError(ValueError):
    """A problem with the data set that the user can fix (message is one line)."""


class UnreadableImageError(DataError):
    """An image that cannot be decoded, met by the process whose shard holds it (the others do not see it)."""
    rank_specific = True


class UnsupportedImageError(ValueError):
    """An image Pillow reads but whose pixels have no defined 8-bit RGB meaning (the message names the mode)."""


# ---------------------------------------------------------------------------------------------------------------
# Pixels: every image as 8-bit RGB
# ---------------------------------------------------------------------------------------------------------------
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown over white, as image viewers and browsers do
_TO_RGB = ('1', 'L', 'P', 'RGB', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')  # Pillow's convert('RGB') is right for these
_WITH_ALPHA = ('LA', 'PA', 'RGBA', 'RGBa')
_UINT16 = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_UINT16_AS_I = ('PNG', 'PPM')  # formats Pillow (some versions) reads as 32-bit 'I' although the file is 16-bit
UINT16_MAX = 65535


def _mode_problem(img: Image.Image) -> Optional[str]:
    """Why ``img`` cannot become RGB, as far as its header tells (mode, format); None when it can."""
    mode = img.mode
    if mode in _TO_RGB or mode in _WITH_ALPHA or mode in _UINT16 or mode == 'F':
        return None
    if mode == 'I':
        if img.format in _UINT16_AS_I:
            return None
        return (f"32-bit integer image (mode 'I', {img.format}) has no defined range of values; "
                f"save it as 8- or 16-bit")
    return f"image mode {mode!r} is not supported; save it as 8-bit RGB, grey or 16-bit grey"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB for any image Pillow can open, or ``UnsupportedImageError`` naming what it is.

    ``convert('RGB')`` alone is wrong for three kinds: it clips 16-bit values at 255 (a 16-bit PNG turns white),
    drops alpha (the colour stored under transparent pixels is arbitrary: black, or leftovers of an edit) and
    reads float images as 0..255. Here 16-bit grey (``I;16*``, and ``I`` from PNG/PPM) is scaled by 255/65535,
    transparency (an alpha band or a PNG/GIF ``transparency`` entry) is composited over ``ALPHA_BACKGROUND``, and
    float images (``F``) are taken as 0..1, the usual range of float images, and refused outside it. ``img`` must be
    loaded (``img.load()``): an RGB image is returned as it is."""
    problem = _mode_problem(img)
    if problem:
        raise UnsupportedImageError(problem)
    mode = img.mode
    if mode in _WITH_ALPHA or (mode in _TO_RGB and 'transparency' in img.info):
        background = Image.new('RGBA', img.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, img.convert('RGBA')).convert('RGB')
    if mode == 'RGB':
        return img  # loaded by the caller: a copy would change nothing
    if mode in _TO_RGB:
        return img.convert('RGB')
    values = np.asarray(img)
    if mode == 'F':
        if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise UnsupportedImageError(f"float image (mode 'F') with values {values.min():g}..{values.max():g}: "
                                        f"only 0..1 has a defined meaning; save it as 8- or 16-bit")
        grey = np.rint(values * 255.0)
    else:  # 16-bit grey
        if values.min() < 0 or values.max() > UINT16_MAX:
            raise UnsupportedImageError(f"integer image (mode {mode!r}) with values {values.min()}..{values.max()} "
                                        f"outside the 16-bit range 0..{UINT16_MAX}")
        grey = (values.astype(np.int64) * 255 + UINT16_MAX // 2) // UINT16_MAX  # rounded
    return Image.fromarray(grey.astype(np.uint8)).convert('RGB')


class NotRegularFileError(OSError):
    """A path named like an image that is a FIFO, socket or device: opening it could block forever."""


def special_file_kind(path: str) -> Optional[str]:
    """What ``path`` is when it is not a regular file (following symlinks): 'a FIFO', 'a socket', 'a device',
    'a broken link', ...; None for a regular file. A stat, never an open (an open of a FIFO blocks)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return 'a broken link' if os.path.islink(path) else 'missing'
    except OSError as e:
        return f'unreadable ({e.strerror})'
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISFIFO(mode):
        return 'a FIFO'
    if stat.S_ISSOCK(mode):
        return 'a socket'
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return 'a device'
    return 'a folder' if stat.S_ISDIR(mode) else 'not a regular file'


def open_image_file(path: str):
    """``open(path, 'rb')`` for regular files (and links to them) only: anything else raises
    ``NotRegularFileError`` at once (the open itself does not wait: ``O_NONBLOCK``, which regular files ignore)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFileError(f'not a regular file ({special_file_kind(path) or "changed while opened"})')
    return os.fdopen(fd, 'rb')


# Pillow's decompression-bomb limit bounds the pixels; the shape needs a bound too: the evaluation resize scales the
# shorter side to IMG_SIZE / CROP_PCT, so a 1 x 200,000 image (a few hundred bytes) would become gigapixels.
MAX_ASPECT_RATIO = 100


def image_shape_problem(img: Image.Image) -> Optional[str]:
    width, height = img.size
    if min(width, height) < 1:
        return f'image of {width}x{height} pixels'
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f'image of {width}x{height} pixels: one side is more than {MAX_ASPECT_RATIO}x the other (resizing '
                f'its shorter side would make it gigapixels); crop or pad it')
    return None


def load_rgb(path: str) -> Image.Image:
    with open_image_file(path) as f:
        img = Image.open(f)
        problem = image_shape_problem(img)  # from the header, before the pixels are decoded
        if problem:
            raise UnsupportedImageError(problem)
        img.load()
        return to_rgb(img)


def _header_problem(path: str) -> Optional[str]:
    """What is wrong with ``path`` as far as its header tells (format, size, shape, mode), without decoding
    pixels."""
    try:
        with open_image_file(path) as f, Image.open(f) as img:
            return image_shape_problem(img) or _mode_problem(img)
    except DECODE_ERRORS as e:
        return f'{type(e).__name__}: {e}'


def check_image_headers(paths: Sequence[str], what: str = 'validation') -> None:
    """Raise DataError naming the first of ``paths`` whose header Pillow cannot read (empty, not an image, an
    unknown format, an unsupported mode), and how many more there are.

    Reading a header costs a file open and a few KB, not a decode (docs/reliability.md gives its cost), so a broken
    validation image is found before the first epoch instead of after it. A file truncated inside its pixel data passes this check; it is
    found when validation decodes it, which is then an error (validation never skips images)."""
    bad = [(p, problem) for p in paths if (problem := _header_problem(p))]
    if bad:
        path, problem = bad[0]
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise DataError(f"unreadable {what} image '{path}': {problem}{more}; remove or replace it "
                        f"({what} never skips images)")


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


def count_images(dataset: ImageFolder) -> dict[str, int]:
    """Images per class of a built data set, by class name (every class listed, in label order)."""
    counts = Counter(dataset.targets)
    return {name: counts.get(i, 0) for i, name in enumerate(dataset.classes)}


def describe_split(dataset: ImageFolder) -> str:
    """One log line's worth: how many images a split holds, in how many classes, and the spread per class (an
    odd maximum points at a folder that holds more than it should)."""
    per_class = list(count_images(dataset).values())
    return (f"'{dataset.root}': {len(dataset)} images in {len(per_class)} classes "
            f"({min(per_class)}..{max(per_class)} per class)")


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


class SafeImageFolder(ImageFolder):
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

    def __getitem__(self, index: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, int]:
        """``index``, or ``(index, seed)`` from ``ResumableDistributedSampler``: the random transforms of this sample
        then draw from ``seed`` alone, whichever worker (or the main process) loads it."""
        index, seed = index if isinstance(index, tuple) else (index, None)
        skipped = 0
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = self.loader(path)
            except DECODE_ERRORS as e:
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
                    seed_cpu_generators(seed)
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
    if not uses_mixup(config):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


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
    from .device_loader import worker_transform
    from .samples import FileImages
    root = os.path.join(config.DATA.DATA_PATH, 'train' if is_train else 'val')
    transform = worker_transform(config, is_train).transform
    skip = is_train and config.DATA.SKIP_CORRUPT
    folder = SafeImageFolder(root, transform=transform, skip_corrupt=skip, logger=logger)
    report_listing(folder, 'training' if is_train else 'validation', logger)
    if is_train and config.DATA.FAST_DECODE:
        return FileImages(root, folder.samples, folder.classes, transform=transform, skip_corrupt=skip, lazy=True,
                          logger=logger)
    return folder


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
    loader_train: Optional['DeviceLoader']   # data/device_loader.py: batches on the device
    loader_val: 'DeviceLoader'
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
    from .device_loader import close_loaders
    _MAIN_DONE.set()
    close_loaders()


def _loader(dataset: Dataset, sampler: Sampler, config, batch_size: int, drop_last: bool, pin_memory: bool,
            device: Optional[torch.device] = None, is_train: bool = False) -> 'DeviceLoader':
    """Workers hand uint8 images over and the device normalises and erases them (``data/device_loader.py``); they
    persist across epochs and end with the run (``release_workers``). Prefetch as PyTorch's default."""
    from .device_loader import make_loader, worker_transform
    return make_loader(dataset, sampler, batch_size=batch_size, num_workers=config.DATA.NUM_WORKERS,
                       drop_last=drop_last, pin_memory=pin_memory, device=device,
                       worker=worker_transform(config, is_train),
                       worker_init_fn=_leave_stop_signals_to_the_main_process)


def build_loader(config, rank: int, world_size: int, logger: Optional[logging.Logger] = None, train: bool = True,
                 device: Optional[torch.device] = None) -> Data:
    """The data of a run (evaluation and throughput runs need no training folder contents). Batches are pinned
    when they go to a CUDA ``device`` (``DATA.PIN_MEMORY``), so the loops copy them with ``non_blocking=True``.
    A zip (``--zip``) or tar shards are read by ``data/formats.py``."""
    from .formats import build_encoded_loader, data_format
    if data_format(config) != 'folder':
        _MAIN_DONE.clear()
        return build_encoded_loader(config, rank, world_size, logger, train=train, device=device)
    class_names = check_data_folder(config.DATA.DATA_PATH, config.MODEL.NUM_CLASSES,
                                    splits=('train', 'val') if train else ('val',))
    _MAIN_DONE.clear()  # a run starts: its workers leave SIGTERM to it
    pin = bool(config.DATA.PIN_MEMORY) and device is not None and device.type == 'cuda'
    dataset_val = build_dataset(config, is_train=False, logger=logger)
    loader_val = _loader(dataset_val, ShardSampler(len(dataset_val), rank, world_size), config,
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
    loader_train = _loader(dataset_train, sampler, config, config.DATA.BATCH_SIZE, drop_last=True, pin_memory=pin,
                           device=device, is_train=True)
    return Data(dataset_train, dataset_val, loader_train, loader_val, build_mixup(config), class_names)
