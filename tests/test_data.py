"""The demo's data export and the folder loader's handling of bad folders and corrupt images."""
import logging
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from config import get_default_config, merge_opts
from data import DataError, check_data_folder
from data.build import SafeImageFolder, build_loader, list_images
from data.images import check_image_headers
from data.samplers import ResumableDistributedSampler, ShardSampler
from data.samples import count_images
from data.transforms import build_transform
from data.digits import export_digits


def test_digits_export_is_balanced_stratified_and_readable(tmp_path):
    summary = export_digits(str(tmp_path), size=32)
    train, val = summary['train'], summary['val']
    assert sorted(train) == [str(d) for d in range(10)] == sorted(val)
    assert sum(train.values()) + sum(val.values()) == 1797          # every image of the data set, once
    for c in train:                                                 # stratified 80/20 within each class
        assert abs(val[c] / (train[c] + val[c]) - 0.2) < 0.02
    train_files = {f for c in train for f in os.listdir(tmp_path / 'train' / c)}
    val_files = {f for c in val for f in os.listdir(tmp_path / 'val' / c)}
    assert not train_files & val_files                              # disjoint split
    img = Image.open(tmp_path / 'val' / '3' / sorted(os.listdir(tmp_path / 'val' / '3'))[0])
    assert img.size == (32, 32) and img.mode == 'RGB'
    assert export_digits(str(tmp_path), size=32) == summary         # fixed split: same result again


def test_check_data_folder_errors(tmp_path, digits_dir):
    with pytest.raises(DataError, match='does not exist'):
        check_data_folder(str(tmp_path / 'missing'))
    (tmp_path / 'only_train' / 'train' / 'a').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'only_train' / 'train' / 'a' / 'x.png')
    with pytest.raises(DataError, match="has no 'val/' folder"):
        check_data_folder(str(tmp_path / 'only_train'))
    root = tmp_path / 'copy'
    shutil.copytree(digits_dir, root)
    assert check_data_folder(str(root), num_classes=10) == [str(d) for d in range(10)]
    with pytest.raises(DataError, match='MODEL.NUM_CLASSES is 1000 but .* has 10 classes'):
        check_data_folder(str(root), num_classes=1000)
    (root / 'val' / 'extra').mkdir()
    Image.new('RGB', (8, 8)).save(root / 'val' / 'extra' / 'x.png')
    with pytest.raises(DataError, match='different classes'):
        check_data_folder(str(root))
    shutil.rmtree(root / 'val' / 'extra')
    (root / 'train' / 'empty').mkdir()
    with pytest.raises(DataError, match="class folder .*empty' has no images"):
        check_data_folder(str(root))


def _corrupt_folder(tmp_path, digits_dir):
    root = tmp_path / 'corrupt'
    shutil.copytree(digits_dir, root)
    cls = root / 'train' / '0'
    good = sorted(os.listdir(cls))[0]
    data = (cls / good).read_bytes()
    (cls / '0000_truncated.png').write_bytes(data[: len(data) // 2])
    (cls / '0000_zero.png').write_bytes(b'')
    (cls / '0000_text.jpg').write_text('this is not an image')
    return root


def test_corrupt_training_images_are_skipped_and_counted(tmp_path, digits_dir):
    root = _corrupt_folder(tmp_path, digits_dir)
    ds = SafeImageFolder(str(root / 'train'), transform=lambda im: torch.zeros(1), skip_corrupt=True)
    names = [os.path.basename(p) for p, _ in ds.samples]
    first_bad = names.index('0000_text.jpg')
    with pytest.warns(UserWarning, match='skipping unreadable training image'):
        img, target, skipped = ds[first_bad]
    assert skipped == 3 and target == 0                             # three bad files in a row, then a good one
    strict = SafeImageFolder(str(root / 'train'), skip_corrupt=False)
    with pytest.raises(DataError, match="unreadable image '.*0000_text.jpg'"):
        strict[first_bad]


def test_loader_counts_skips_and_keeps_batch_shapes(tmp_path, digits_dir):
    root = _corrupt_folder(tmp_path, digits_dir)
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', str(root), 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '16',
                     'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '10', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0'])
    with pytest.warns(UserWarning):
        data = build_loader(cfg, rank=0, world_size=1)
        loader, mixup = data.loader_train, data.mixup_fn
        total = 0
        for images, targets, skipped in loader:
            assert images.shape == (16, 3, 32, 32)
            total += int(skipped.sum())
    assert total >= 3 and mixup is None


def test_eval_sharding_covers_every_item_once():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(10))


def test_resumable_sampler_continues_the_same_order():
    data = list(range(40))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    full.set_epoch(5)
    order = list(full)
    part = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    part.set_epoch(5)
    part.start_index = 8
    assert list(part) == order[8:] and len(part) == len(order) - 8


def test_randaugment_posterize_at_full_magnitude_does_not_crash():
    # 'rand-m9-mstd0.5-inc1' samples magnitudes up to 10, where posterize keeps 0 bits (Pillow >= 11 raises).
    from timm.data.auto_augment import rand_augment_transform
    ra = rand_augment_transform('rand-n1-m10-inc1', {})
    posterize = next(op for op in ra.ops if op.name == 'PosterizeIncreasing')
    posterize.prob, posterize.magnitude_std = 1.0, 0.0
    out = posterize(Image.new('RGB', (8, 8), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))            # 0 bits kept: black, as old Pillow did


# --------------------------------------------------------------------------------------------------------------
# Issue 14: one definition of a split's classes and images; loops refused; counts logged; headers checked.
def _tiny_split(root, classes=('a', 'b', 'c'), per_class=2):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new('RGB', (8, 8), (i, 0, 0)).save(root / c / f'{i}.png')


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path):
    for split in ('train', 'val'):
        _tiny_split(tmp_path / split)
    (tmp_path / 'train' / '.cache').mkdir()                            # sorts first: it became class 0
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / '.cache' / 'x.png')
    (tmp_path / 'train' / '.ipynb_checkpoints').mkdir()                # empty: used to be a traceback
    (tmp_path / 'val' / '.ipynb_checkpoints').mkdir()
    (tmp_path / 'train' / 'a' / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')   # macOS metadata
    (tmp_path / 'train' / 'b' / '.thumbs').mkdir()
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / 'b' / '.thumbs' / 't.png')
    assert check_data_folder(str(tmp_path), num_classes=3) == ['a', 'b', 'c']
    ds = SafeImageFolder(str(tmp_path / 'train'))
    assert ds.classes == ['a', 'b', 'c'] and ds.class_to_idx == {'a': 0, 'b': 1, 'c': 2}
    assert [(os.path.relpath(p, tmp_path / 'train'), t) for p, t in ds.samples] == [
        ('a/0.png', 0), ('a/1.png', 0), ('b/0.png', 1), ('b/1.png', 1), ('c/0.png', 2), ('c/1.png', 2)]


def test_class_with_images_only_in_hidden_folders_has_no_images(tmp_path):
    _tiny_split(tmp_path / 'train')
    _tiny_split(tmp_path / 'val')
    (tmp_path / 'train' / 'd' / '.cache').mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(tmp_path / 'train' / 'd' / '.cache' / 'x.png')
    with pytest.raises(DataError, match=r"class folder '.*train/d' has no images .*hidden names are skipped"):
        check_data_folder(str(tmp_path))
    with pytest.raises(DataError, match=r"class folder '.*train/d' has no images"):
        SafeImageFolder(str(tmp_path / 'train'))


def test_listing_matches_torchvision_on_a_plain_tree(tmp_path, digits_dir):
    """Without hidden names or linked folders, the samples (and so every index a sampler draws) are exactly
    torchvision's, nested folders and names that sort around '/' included."""
    from torchvision.datasets import ImageFolder
    root = tmp_path / 'train'
    _tiny_split(root, classes=('a', 'a b', 'a-b', 'c'))
    for sub in ('a/x', 'a/x/deep', 'a/x-1', 'a/x 2', 'c/Z'):           # by path: a/x < a/x 2 < a/x-1 < a/x/deep
        (root / sub).mkdir(parents=True)
    for d in [p for p in root.rglob('*') if p.is_dir()]:
        Image.new('RGB', (8, 8)).save(d / 'img.JPG')
        (d / 'notes.txt').write_text('not an image')
    for folder in (str(root), os.path.join(digits_dir, 'train')):
        ours, theirs = SafeImageFolder(folder), ImageFolder(folder)
        assert ours.samples == theirs.samples and ours.classes == theirs.classes


def test_symlink_loop_is_refused_naming_the_link(tmp_path):
    _tiny_split(tmp_path / 'train')
    _tiny_split(tmp_path / 'val')
    os.symlink('.', tmp_path / 'train' / 'a' / 'loop')                # 6 images became dozens, silently
    with pytest.raises(DataError, match=r"symlink loop: '.*train/a/loop' leads back to '.*train/a'; remove the link"):
        SafeImageFolder(str(tmp_path / 'train'))
    os.remove(tmp_path / 'train' / 'a' / 'loop')
    os.symlink('..', tmp_path / 'train' / 'b' / 'up')                 # the whole split again, under label b
    with pytest.raises(DataError, match=r"'.*train/b/up/a' is the same folder as '.*train/a'"):
        SafeImageFolder(str(tmp_path / 'train'))
    with pytest.raises(DataError, match=r"symlink loop: '.*train/b/up/b' leads back to '.*train/b'"):
        list_images(str(tmp_path / 'train' / 'b'))


def test_folder_reached_twice_is_refused_and_outside_links_work(tmp_path):
    _tiny_split(tmp_path / 'train')
    os.symlink(tmp_path / 'train' / 'b', tmp_path / 'train' / 'a' / 'more')    # b's images under label a too
    with pytest.raises(DataError, match=r"'.*train/b' is the same folder as '.*train/a/more': its images would be "
                                        r"listed twice"):
        SafeImageFolder(str(tmp_path / 'train'))
    os.remove(tmp_path / 'train' / 'a' / 'more')
    _tiny_split(tmp_path / 'elsewhere', classes=('extra',), per_class=3)
    os.symlink(tmp_path / 'elsewhere' / 'extra', tmp_path / 'train' / 'a' / 'extra')   # a linked folder: followed
    ds = SafeImageFolder(str(tmp_path / 'train'))
    assert count_images(ds) == {'a': 5, 'b': 2, 'c': 2}


def test_split_sizes_are_logged(tmp_path, digits_dir, caplog):
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', digits_dir, 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '16',
                     'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '10'])
    logger = logging.getLogger('test_split_sizes')
    with caplog.at_level(logging.INFO, logger='test_split_sizes'):
        build_loader(cfg, rank=0, world_size=1, logger=logger)
    lines = [r.getMessage() for r in caplog.records]
    assert any(re.fullmatch(r"data: train '.*train': 200 images in 10 classes \(20..20 per class\); "
                            r"val '.*val': 50 images in 10 classes \(5..5 per class\)", ln) for ln in lines), lines
    assert any(re.fullmatch(r'data: 50 validation image headers read in \d+\.\d s', ln) for ln in lines), lines


def test_unreadable_validation_image_is_found_before_training(tmp_path, digits_dir):
    root = tmp_path / 'd'
    shutil.copytree(digits_dir, root)
    (root / 'val' / '3' / 'empty.png').write_bytes(b'')
    (root / 'val' / '7' / 'text.jpg').write_text('not an image')
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', str(root), 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '16',
                     'DATA.NUM_WORKERS', '0', 'MODEL.NUM_CLASSES', '10'])
    with pytest.raises(DataError, match=r"^unreadable validation image '.*val/3/empty.png': UnidentifiedImageError: "
                                        r".* \(and 1 more\); remove or replace it \(validation never skips images\)$"):
        build_loader(cfg, rank=0, world_size=1)
    ds_val = build_loader(cfg, rank=0, world_size=1, train=False).dataset_val   # evaluation finds it when it reads
    assert len(ds_val) == 52
    check_image_headers([p for p, _ in SafeImageFolder(digits_dir + '/val').samples])   # the good ones pass


def test_every_allowed_interpolation_builds_both_transforms():
    from config import INTERPOLATIONS
    for name in INTERPOLATIONS:
        cfg = get_default_config()
        merge_opts(cfg, ['DATA.INTERPOLATION', name, 'DATA.IMG_SIZE', '32'])
        for is_train in (True, False):
            out = build_transform(cfg, is_train)(Image.new('RGB', (40, 48)))
            assert out.shape == (3, 32, 32)
