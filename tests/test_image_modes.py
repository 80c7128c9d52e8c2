"""Issue 14: every image mode Pillow returns becomes correct 8-bit RGB, or is refused by name.

Each case writes a real file with Pillow (the format that carries the mode) and reads it through the data set's
loader. ``convert('RGB')`` alone, the old loader, clips 16-bit values at 255, drops alpha and reads floats as 0..255.
"""
import numpy as np
import pytest
from PIL import Image

from data import DataError
from data.build import SafeImageFolder
from data.images import ALPHA_BACKGROUND, UnsupportedImageError, check_image_headers, load_rgb, to_rgb

H, W = 4, 64
WHITE = ALPHA_BACKGROUND


def _save(tmp_path, img: Image.Image, name: str, **kw) -> str:
    path = str(tmp_path / name)
    img.save(path, **kw)
    return path


def _read(path: str) -> np.ndarray:
    img = load_rgb(path)
    assert img.mode == 'RGB'
    return np.asarray(img)


def _ramp16() -> np.ndarray:
    return np.tile(np.linspace(0, 65535, W).round().astype(np.uint16), (H, 1))   # H, W


def _expected8(ramp: np.ndarray) -> np.ndarray:
    return np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.mark.parametrize('mode, ext', [('I;16', 'png'), ('I;16', 'tif'), ('I;16B', 'tif')])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, mode, ext):
    ramp = _ramp16()
    img = Image.frombytes(mode, (W, H), ramp.astype('>u2' if mode.endswith('B') else '<u2').tobytes())
    path = _save(tmp_path, img, f'ramp.{ext}')
    assert Image.open(path).mode == mode                                  # the mode Pillow hands the loader
    rgb = _read(path)
    assert np.array_equal(rgb, np.repeat(_expected8(ramp)[..., None], 3, axis=2))
    assert (rgb == 255).mean() < 0.05                                     # convert('RGB') made 98% white
    assert (np.asarray(Image.open(path).convert('RGB')) == 255).mean() > 0.9


def test_16bit_pgm_read_as_mode_I_is_scaled(tmp_path):
    ramp = _ramp16()
    path = _save(tmp_path, Image.fromarray(ramp), 'ramp.pgm')
    assert Image.open(path).mode == 'I'                                   # Pillow's mode for 16-bit PGM/PPM
    assert np.array_equal(_read(path)[..., 0], _expected8(ramp))


def test_32bit_integer_tiff_is_refused_by_name(tmp_path):
    path = _save(tmp_path, Image.fromarray(np.full((H, W), 70000, dtype=np.int32)), 'i32.tif')
    assert Image.open(path).mode == 'I'
    with pytest.raises(UnsupportedImageError, match=r"32-bit integer image \(mode 'I', TIFF\) has no defined range"):
        _read(path)


def test_float_image_0_to_1_is_scaled_and_other_ranges_refused(tmp_path):
    values = np.tile(np.linspace(0, 1, W, dtype=np.float32), (H, 1))
    path = _save(tmp_path, Image.fromarray(values), 'f.tif')
    assert Image.open(path).mode == 'F'
    assert np.array_equal(_read(path)[..., 1], np.rint(values * 255).astype(np.uint8))
    path = _save(tmp_path, Image.fromarray(values * 255), 'f255.tif')
    with pytest.raises(UnsupportedImageError, match=r"float image \(mode 'F'\) with values 0..255: only 0..1"):
        _read(path)


def _rgba_pixels() -> np.ndarray:
    px = np.zeros((H, W, 4), dtype=np.uint8)
    px[..., :3] = (10, 200, 30)
    px[:, : W // 2, 3] = 255        # opaque left half
    px[:, W // 2:, 3] = 0           # transparent right half (its stored colour must not show)
    px[0, -1, 3] = 128              # one half-transparent pixel
    return px


@pytest.mark.parametrize('ext', ['png', 'tif', 'webp'])
def test_rgba_is_composited_over_the_background(tmp_path, ext):
    kw = {'lossless': True} if ext == 'webp' else {}
    path = _save(tmp_path, Image.fromarray(_rgba_pixels(), 'RGBA'), f'a.{ext}', **kw)
    assert Image.open(path).mode == 'RGBA'
    rgb = _read(path)
    assert (rgb[:, : W // 2] == (10, 200, 30)).all()
    assert (rgb[1:, W // 2:] == WHITE).all()
    half = np.rint((np.array((10, 200, 30)) * 128 + np.array(WHITE) * 127) / 255)
    assert np.abs(rgb[0, -1].astype(int) - half).max() <= 1


def test_grey_with_alpha_LA_is_composited(tmp_path):
    px = np.zeros((H, W, 2), dtype=np.uint8)
    px[..., 0], px[:, : W // 2, 1] = 60, 255
    path = _save(tmp_path, Image.fromarray(px, 'LA'), 'la.png')
    assert Image.open(path).mode == 'LA'
    rgb = _read(path)
    assert (rgb[:, : W // 2] == 60).all() and (rgb[:, W // 2:] == WHITE).all()


def _palette_image(mode: str = 'P') -> Image.Image:
    img = Image.new(mode, (W, H))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    img.paste(1, (0, 0, W // 2, H))
    img.paste(2, (W // 2, 0, W, H))
    img.paste(0, (0, 0, 4, H))       # index 0 (black in the palette) is the transparent one below
    return img


def test_palette_without_transparency_keeps_its_colours(tmp_path):
    path = _save(tmp_path, _palette_image(), 'p.png')
    rgb = _read(path)
    assert (rgb[:, :4] == 0).all()
    assert (rgb[:, 4: W // 2] == (255, 0, 0)).all() and (rgb[:, W // 2:] == (0, 0, 255)).all()


@pytest.mark.parametrize('ext', ['png', 'gif'])
def test_palette_with_transparency_is_composited(tmp_path, ext):
    path = _save(tmp_path, _palette_image(), f'pt.{ext}', transparency=0)
    img = Image.open(path)
    assert img.mode == 'P' and img.info.get('transparency') == 0
    rgb = _read(path)
    assert (rgb[:, :4] == WHITE).all()                                   # convert('RGB') gave the palette's black
    assert (rgb[:, 4: W // 2] == (255, 0, 0)).all() and (rgb[:, W // 2:] == (0, 0, 255)).all()


def test_palette_with_alpha_PA_is_composited(tmp_path):
    px = Image.merge('PA', (_palette_image(), Image.new('L', (W, H), 0)))   # every pixel transparent
    path = _save(tmp_path, px, 'pa.tif')
    assert Image.open(path).mode == 'PA'
    assert (_read(path) == WHITE).all()


def test_grey_with_a_transparent_value_is_composited(tmp_path):
    px = np.full((H, W), 90, dtype=np.uint8)
    px[:, :8] = 7
    path = _save(tmp_path, Image.fromarray(px), 'lt.png', transparency=7)
    assert Image.open(path).info.get('transparency') == 7
    rgb = _read(path)
    assert (rgb[:, :8] == WHITE).all() and (rgb[:, 8:] == 90).all()


@pytest.mark.parametrize('mode, ext, value, expected', [
    ('1', 'png', 1, (255, 255, 255)),
    ('L', 'png', 77, (77, 77, 77)),
    ('L', 'jpg', 77, None),
    ('RGB', 'png', (1, 2, 3), (1, 2, 3)),
    ('CMYK', 'tif', (0, 0, 0, 0), (255, 255, 255)),
    ('CMYK', 'tif', (255, 0, 0, 0), (0, 255, 255)),
    ('CMYK', 'jpg', (0, 0, 0, 128), None),
    ('YCbCr', 'tif', (128, 128, 128), (128, 128, 128)),
    ('LAB', 'tif', (255, 128, 128), None),
])
def test_modes_pillow_converts_exactly_are_unchanged(tmp_path, mode, ext, value, expected):
    """These read as ``convert('RGB')`` always read them (the values a valid run trains on do not change)."""
    path = _save(tmp_path, Image.new(mode, (W, H), value), f'm.{ext}')
    assert Image.open(path).mode == mode
    rgb = _read(path)
    assert np.array_equal(rgb, np.asarray(Image.open(path).convert('RGB')))
    if expected is not None:
        assert (rgb == expected).all()


def test_lab_white_is_white(tmp_path):
    path = _save(tmp_path, Image.new('LAB', (W, H), (255, 128, 128)), 'lab.tif')
    assert np.abs(_read(path).astype(int) - 255).max() <= 1


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(UnsupportedImageError, match=r"image mode 'La' is not supported"):
        to_rgb(Image.new('La', (W, H)))
    assert to_rgb(Image.new('HSV', (W, H), (0, 0, 255))).getpixel((0, 0)) == (255, 255, 255)


def test_refused_mode_skipped_in_training_and_fatal_in_validation(tmp_path):
    for split in ('train', 'val'):
        d = tmp_path / split / 'a'
        d.mkdir(parents=True)
        Image.new('RGB', (W, H)).save(d / 'ok.png')
        Image.fromarray(np.full((H, W), 70000, dtype=np.int32)).save(d / '0_int32.tif')
    train = SafeImageFolder(str(tmp_path / 'train'), skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipping unreadable training image '.*0_int32.tif': UnsupportedImageError"):
        img, _, skipped = train[0]
    assert skipped == 1 and img.mode == 'RGB'
    val = SafeImageFolder(str(tmp_path / 'val'), skip_corrupt=False)
    with pytest.raises(DataError, match=r"unreadable image '.*0_int32.tif': UnsupportedImageError: 32-bit integer"):
        val[0]
    with pytest.raises(DataError, match=r"unreadable validation image '.*0_int32.tif': 32-bit integer image"):
        check_image_headers([p for p, _ in val.samples])                 # found from the header, before training
