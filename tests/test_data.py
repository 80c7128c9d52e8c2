"""The demo's data export and the folder loader's handling of bad folders and corrupt images."""
import os
import shutil

import pytest
import torch
from PIL import Image

from config import get_default_config, merge_opts
from data import DataError, check_data_folder
from data.build import SafeImageFolder, ShardSampler, ResumableDistributedSampler, build_loader
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
