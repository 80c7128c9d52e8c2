"""One image: reading it safely as 8-bit RGB, and the errors a user's data can cause.

Every image is read as 8-bit RGB by ``to_rgb``: 16-bit images are scaled, transparent ones composited, and modes with
no defined meaning refused by name (``mode_problem``); its width and height are checked from the header before the
pixels are decoded (``image_shape_problem``); only regular files (and links to them) are opened
(``open_image_file``), since opening a FIFO or a device blocks. EXIF orientation is not applied, as in torchvision
and timm. Every problem a user can cause with the data raises ``DataError`` with one line naming the path and the fix.
"""
from __future__ import annotations

import os
import stat
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG is an error, never silently half-grey

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


def mode_problem(img: Image.Image) -> Optional[str]:
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
    problem = mode_problem(img)
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
            return image_shape_problem(img) or mode_problem(img)
    except DECODE_ERRORS as e:
        return f'{type(e).__name__}: {e}'


def check_image_headers(paths: Sequence[str], what: str = 'validation') -> None:
    """Raise DataError naming the first of ``paths`` whose header Pillow cannot read (empty, not an image, an
    unknown format, an unsupported mode), and how many more there are.

    Reading a header costs a file open and a few KB, not a decode (docs/reliability.md gives its cost), so a broken
    validation image is found before the first epoch instead of after it. A file truncated inside its pixel data
    passes this check; it is found when validation decodes it, which is then an error (validation never skips
    images)."""
    bad = [(p, problem) for p in paths if (problem := _header_problem(p))]
    if bad:
        path, problem = bad[0]
        more = f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''
        raise DataError(f"unreadable {what} image '{path}': {problem}{more}; remove or replace it "
                        f"({what} never skips images)")
