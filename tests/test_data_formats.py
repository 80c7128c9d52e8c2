"""Issue 31: the device-side loader, Swin's zip format and its cache modes, tar shards, the fast decode."""
import io
import os
import random
import shutil
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from config import get_default_config, merge_opts
from conftest import DEMO_CFG
from data import build_loader, build_transform, release_workers
from data.build import SafeImageFolder
from data.images import UnreadableImageError
from data.device_loader import FastResizedCrop, split_transform
from data.samplers import ContiguousSampler, ShardShareSampler, StridedShareSampler
from data.shards import ShardImages, check_shard_split
from data.zipped import ZipImages, load_zip_split
from test_reliability import assert_one_line_error, main_in_process
from tools.make_shards import make_shards
from tools.make_zip import make_zip
from utils import seed_cpu_generators

SHARD_SIZE = 37  # 200 training images: 5 full shards and one of 15


@pytest.fixture(scope='module')
def packed(tmp_path_factory, digits_dir):
    """The digits as Swin's zip and as tar shards."""
    root = tmp_path_factory.mktemp('packed')
    make_zip(digits_dir, str(root / 'zip'))
    make_shards(digits_dir, str(root / 'shards'), SHARD_SIZE)
    return {'folder': digits_dir, 'zip': str(root / 'zip'), 'shards': str(root / 'shards')}


def _cfg(path, *opts):
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', path, 'DATA.IMG_SIZE', '32', 'DATA.BATCH_SIZE', '16', 'DATA.NUM_WORKERS', '0',
                     'MODEL.NUM_CLASSES', '10', *opts])
    return cfg


# ------------------------------------------------------------------------------------------------------------------
# The device-side loader: the same pixels as the all-CPU pipeline
@pytest.mark.parametrize('mode,workers', [('pixel', 2), ('rand', 0), ('const', 0)])
def test_device_loader_gives_the_cpu_pipelines_pixels(digits_dir, mode, workers):
    """Workers hand over uint8; /255, -mean, /std and random erasing on the device: bit for bit the batches of
    timm's CPU transform (RandAugment, erasing of every image, two rectangles each), training and validation."""
    cfg = _cfg(digits_dir, 'AUG.REPROB', '1.0', 'AUG.RECOUNT', '2', 'AUG.REMODE', mode,
               'DATA.NUM_WORKERS', str(workers))
    data = build_loader(cfg, rank=0, world_size=1)
    try:
        sampler = data.loader_train.sampler
        sampler.set_epoch(3)
        order = list(sampler)
        reference = SafeImageFolder(os.path.join(digits_dir, 'train'), transform=build_transform(cfg, True))
        for b, (images, targets, skipped) in zip(range(3), data.loader_train):
            expected = [reference[i] for i in order[16 * b:16 * (b + 1)]]
            assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
            assert torch.equal(images, torch.stack([e[0] for e in expected]))
            assert targets.tolist() == [e[1] for e in expected] and skipped.sum() == 0
        val = SafeImageFolder(os.path.join(digits_dir, 'val'), transform=build_transform(cfg, False))
        images, targets, _ = next(iter(data.loader_val))
        assert torch.equal(images, torch.stack([val[i][0] for i in range(16)]))
    finally:
        release_workers()


def test_workers_persist_across_epochs_and_end_with_the_run(digits_dir):
    cfg = _cfg(digits_dir, 'DATA.NUM_WORKERS', '1', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0')
    loader = build_loader(cfg, rank=0, world_size=1).loader_train
    pids = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for _ in loader:
            pass
        pids.append([w.pid for w in loader.loader._iterator._workers])
    workers = loader.loader._iterator._workers
    assert pids[0] == pids[1] and all(w.is_alive() for w in workers)     # the same process served both epochs
    release_workers()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)


def test_fast_crop_draws_the_same_crop_and_decodes_jpegs_at_reduced_size(monkeypatch):
    """The fast crop consumes the same random numbers as timm's (the rest of the pipeline is unchanged), asks the
    JPEG decoder for a draft when the crop shrinks by 1.5x or more, and stays close to the exact pixels."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    photo = photo.resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format='JPEG', quality=90)
    exact = RandomResizedCropAndInterpolation(112, scale=(0.5, 1.0), interpolation='bicubic')
    fast = FastResizedCrop(112, scale=(0.5, 1.0), interpolation='bicubic')
    from PIL.JpegImagePlugin import JpegImageFile
    drafts = []
    real_draft = JpegImageFile.draft
    monkeypatch.setattr(JpegImageFile, 'draft', lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size))
    for seed in range(5):
        random.seed(seed)
        want = np.asarray(exact(Image.open(io.BytesIO(buf.getvalue())).convert('RGB')), dtype=np.float64)
        after_exact = random.random()
        random.seed(seed)
        got = np.asarray(fast(Image.open(io.BytesIO(buf.getvalue()))), dtype=np.float64)
        assert random.random() == after_exact                           # the same draws
        assert got.shape == want.shape == (112, 112, 3)
        assert 0 < np.abs(got - want).mean() < 6                        # other pixels, the same picture
    assert drafts and all(w < 500 for w, _ in drafts)                   # every crop here shrinks by >= 2x


@pytest.mark.parametrize('interpolation', ['bicubic', 'random'])
def test_fast_path_augments_with_bilinear_geometry_and_the_same_draws(monkeypatch, interpolation):
    """The fast path's RandAugment rotates, shears and translates bilinearly (the exact path keeps the config's
    resampling), and every transform draws the same random numbers in both paths."""
    cfg = _cfg('unused', 'DATA.INTERPOLATION', interpolation)
    full = build_transform(cfg, True)
    exact, fast = split_transform(full).transform, split_transform(full, fast=True).transform
    resamples = []
    real_transform = Image.Image.transform

    def transform_recorded(self, size, method, data=None, resample=Image.NEAREST, *args, **kwargs):
        resamples.append(resample)
        return real_transform(self, size, method, data, resample, *args, **kwargs)
    monkeypatch.setattr(Image.Image, 'transform', transform_recorded)   # rotate, shear and translate call it
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, format='JPEG')
    used = {}
    for name, transform, image in (('exact', exact, lambda: Image.open(io.BytesIO(buf.getvalue())).convert('RGB')),
                                   ('fast', fast, lambda: Image.open(io.BytesIO(buf.getvalue())))):
        resamples.clear()
        states = []
        for seed in range(40):
            seed_cpu_generators(seed)
            transform(image())
            states.append((random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()))
        used[name], used[name + ' states'] = set(resamples), states
    assert used['fast'] == {Image.BILINEAR}                                   # the geometric ops ran (~1/3 of images)
    want = {Image.BICUBIC} if interpolation == 'bicubic' else {Image.BILINEAR, Image.BICUBIC}
    assert used['exact'] == want
    for (r1, n1, t1), (r2, n2, t2) in zip(used['exact states'], used['fast states']):
        assert r1 == r2 and n1 == n2 and torch.equal(t1, t2)


def test_fast_decode_trains_from_a_folder_and_skips_corrupt_files(tmp_path, digits_dir):
    root = tmp_path / 'd'
    shutil.copytree(digits_dir, root)
    (root / 'train' / '0' / '0000_bad.png').write_bytes(b'\x89PNG not really')
    cfg = _cfg(str(root), 'DATA.FAST_DECODE', 'True', 'AUG.MIXUP', '0.0', 'AUG.CUTMIX', '0.0')
    data = build_loader(cfg, rank=0, world_size=1)
    skipped = 0
    with pytest.warns(UserWarning, match="skipping unreadable training image '.*0000_bad.png'"):
        for images, targets, skip in data.loader_train:
            assert images.shape == (16, 3, 32, 32) and torch.isfinite(images).all()
            skipped += int(skip.sum())
    assert skipped >= 1
    exact_val = SafeImageFolder(os.path.join(digits_dir, 'val'), transform=build_transform(cfg, False))
    assert torch.equal(next(iter(data.loader_val))[0], torch.stack([exact_val[i][0] for i in range(16)]))


def test_split_transform_keeps_the_head_of_the_pipeline():
    cfg = _cfg('unused')
    worker = split_transform(build_transform(cfg, True))
    names = [type(t).__name__ for t in worker.transform.transforms]
    assert names == ['RandomResizedCropAndInterpolation', 'RandomHorizontalFlip', 'RandAugment', 'ToHWC',
                     'EraseRecorder']
    assert worker.mean == pytest.approx(cfg.DATA.MEAN) and worker.std == pytest.approx(cfg.DATA.STD)


# ------------------------------------------------------------------------------------------------------------------
# Swin's zip format
@pytest.mark.parametrize('cache_mode', ['no', 'full'])
def test_zip_gives_the_folders_samples_and_batches(packed, cache_mode):
    cfg_opts = ('AUG.REPROB', '0.5')
    folder = build_loader(_cfg(packed['folder'], *cfg_opts), rank=0, world_size=1)
    zipped = build_loader(_cfg(packed['zip'], *cfg_opts, 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', cache_mode),
                          rank=0, world_size=1)
    assert zipped.class_names == folder.class_names == [str(d) for d in range(10)]
    f_train, z_train = folder.dataset_train, zipped.dataset_train
    assert [(os.path.relpath(p, f_train.root), t) for p, t in f_train.samples] == z_train.samples
    for split in ('loader_train', 'loader_val'):
        for a, b in zip(getattr(folder, split), getattr(zipped, split)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (zipped.dataset_train.slot >= 0).sum() == (200 if cache_mode == 'full' else 0)


def test_zip_part_cache_each_rank_holds_and_samples_its_own_share(packed):
    zip_path, samples = load_zip_split(packed['zip'], 'train')
    shares = []
    for rank in (0, 1, 2):                                                  # 200 images on 3 ranks: 67/67/66
        ds = ZipImages(zip_path, samples, [str(d) for d in range(10)], 'part', rank, 3)
        assert np.flatnonzero(ds.slot >= 0).tolist() == list(range(rank, 200, 3))    # cached: its share only
        sampler = StridedShareSampler(len(ds), rank, 3, seed=5)
        sampler.set_epoch(2)
        order = [i for i, _ in sampler]
        assert len(order) == 67 and set(order) == set(range(rank, 200, 3))  # its share, padded to 67
        again = StridedShareSampler(len(ds), rank, 3, seed=5)
        again.set_epoch(2)
        again.start_index = 16
        assert list(again) == list(sampler)[16:]                            # reproducible and resumable
        again.start_index = 0
        again.set_epoch(3)
        assert [i for i, _ in again] != order                               # a new order every epoch
        shares.append(order)
    assert sorted(set().union(*shares)) == list(range(200))


# ------------------------------------------------------------------------------------------------------------------
# Tar shards
def test_shard_sampler_gives_each_rank_a_run_of_its_own_shards():
    lengths = [37] * 5 + [15]
    starts = np.cumsum([0] + lengths)
    shard_of = lambda i: int(np.searchsorted(starts, i, side='right') - 1)  # noqa: E731
    shares = []
    for rank in range(3):
        sampler = ShardShareSampler(lengths, rank, 3, seed=1)
        sampler.set_epoch(4)
        order = [i for i, _ in sampler]
        assert len(order) == 67
        shares.append(order)
        assert len({shard_of(i) for i in order}) <= 4                       # 67 samples from at most 4 shards
        resumed = ShardShareSampler(lengths, rank, 3, seed=1)
        resumed.set_epoch(4)
        resumed.start_index = 32
        assert list(resumed) == list(sampler)[32:]
    seen = [i for s in shares for i in s]
    assert sorted(set(seen)) == list(range(200)) and len(seen) - len(set(seen)) <= 3   # once each, and padding
    other = ShardShareSampler(lengths, 0, 3, seed=1)
    other.set_epoch(5)
    assert [i for i, _ in other] != shares[0]


def test_one_checkpoint_evaluates_alike_from_folder_zip_and_shards(packed):
    """The same weights give the same top-1, top-5 and loss on the folder, its zip in each cache mode, and its
    shards; the evaluation samplers cover every image once for any process count."""
    from engine import Precision, evaluate
    from config import load_config_file
    from models import build_model
    torch.manual_seed(0)
    model = build_model(load_config_file(DEMO_CFG))
    precision = Precision('cpu', False, torch.float32)
    runs = {'folder': _cfg(packed['folder'])}
    for mode in ('no', 'full', 'part'):
        runs[f'zip {mode}'] = _cfg(packed['zip'], 'DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', mode)
    runs['shards'] = _cfg(packed['shards'])
    stats = {}
    for name, cfg in runs.items():
        cfg.defrost()
        cfg.DATA.IMG_SIZE = 64
        stats[name] = evaluate(model, build_loader(cfg, 0, 1, train=False).loader_val, torch.device('cpu'), precision)
    for name, s in stats.items():
        assert (s['acc1'], s['acc5'], s['loss'], s['num_images']) == (
            stats['folder']['acc1'], stats['folder']['acc5'], stats['folder']['loss'], 50), name
    for world in (2, 3):
        covered = sorted(i for r in range(world) for i in ContiguousSampler(50, r, world))
        assert covered == list(range(50))


def test_corrupt_shard_samples_are_skipped_in_training_and_named_in_validation(tmp_path, packed):
    root = tmp_path / 'shards'
    shutil.copytree(packed['shards'], root)
    shard = root / 'train' / 'shard-000001.tar'
    data = bytearray(shard.read_bytes())
    start = data.index(b'\x89PNG')                                          # the first image of the shard
    data[start:start + 64] = b'\x00' * 64
    shard.write_bytes(bytes(data))
    last = root / 'train' / 'shard-000005.tar'
    last.write_bytes(last.read_bytes()[:len(last.read_bytes()) // 2])       # truncated: half its samples
    shards, lengths, classes = check_shard_split(str(root), 'train')
    train = ShardImages(str(root / 'train'), shards, lengths, classes, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipping unreadable training image #0 of the shard '.*shard-000001.tar'"):
        _, label, skipped = train[SHARD_SIZE]
    assert skipped == 1 and 0 <= label < 10
    tail = sum(lengths[:5])
    with pytest.warns(UserWarning):
        _, _, skipped = train[199]                                          # past the cut: skipped to the next
    assert skipped >= 1
    strict = ShardImages(str(root / 'train'), shards, lengths, classes)
    with pytest.raises(UnreadableImageError, match=r"unreadable image #0 of the shard '.*shard-000001.tar'"):
        strict[SHARD_SIZE]
    assert strict[tail][1] in range(10)                                     # the cut shard's first samples read


def test_corrupt_zip_member_is_skipped_and_counted(tmp_path, digits_dir):
    root = tmp_path / 'd'
    shutil.copytree(digits_dir, root)
    (root / 'train' / '0' / '0000_bad.png').write_bytes(b'\x89PNG garbage')
    make_zip(str(root), str(tmp_path / 'zip'))
    zip_path, samples = load_zip_split(str(tmp_path / 'zip'), 'train')
    ds = ZipImages(zip_path, samples, [str(d) for d in range(10)], 'full', 0, 1, skip_corrupt=True)
    bad = [m for m, _ in samples].index('0/0000_bad.png')
    with pytest.warns(UserWarning, match=r"skipping unreadable training image '0/0000_bad.png' in '.*train.zip'"):
        _, label, skipped = ds[bad]
    assert skipped == 1 and label == 0


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one line, before any work
def test_bad_zips_and_shards_are_one_line(tmp_path, packed, capsys):
    def run(path, *extra):
        return main_in_process(['--cfg', DEMO_CFG, '--data-path', str(path), '--output', str(tmp_path / 'out'),
                                *extra], capsys)

    no_map = tmp_path / 'no_map'
    shutil.copytree(packed['zip'], no_map)
    os.remove(no_map / 'val_map.txt')
    assert_one_line_error(run(no_map, '--zip'), r"^error: '.*no_map/val_map.txt' not found: --zip reads .*val.zip "
                                                r"with its map file")
    missing = tmp_path / 'missing'
    shutil.copytree(packed['zip'], missing)
    with open(missing / 'train_map.txt', 'a') as f:
        f.write('3/nowhere.png\t3\n')
    assert_one_line_error(run(missing, '--zip'), r"^error: '.*train_map.txt' line 201 names '3/nowhere.png', which "
                                                 r"is not in '.*train.zip'")
    no_tar = tmp_path / 'no_tar'
    shutil.copytree(packed['shards'], no_tar)
    for name in os.listdir(no_tar / 'val'):
        if name.endswith('.tar'):
            os.remove(no_tar / 'val' / name)
    assert_one_line_error(run(no_tar), r"^error: '.*no_tar/val' holds no .tar shards")
    renamed = tmp_path / 'renamed'
    shutil.copytree(packed['shards'], renamed)
    (renamed / 'val' / 'classes.txt').write_text('\n'.join(['zero'] + [str(d) for d in range(1, 10)]) + '\n')
    assert_one_line_error(run(renamed), r"^error: the class names of '.*renamed/train' and '.*renamed/val' differ "
                                        r"\(only in train: \['0'\], only in val: \['zero'\]\)")
    assert not (tmp_path / 'out' / 'msg_demo' / 'default' / 'ckpt_epoch_0.pth').exists()


def test_flat_val_map_takes_the_training_class_names(tmp_path, packed):
    """ImageNet's val_map.txt names bare files: the class names come from train_map.txt's folders."""
    root = tmp_path / 'flat'
    shutil.copytree(packed['zip'], root)
    with zipfile.ZipFile(root / 'val.zip') as src, zipfile.ZipFile(root / 'val_flat.zip', 'w') as dst:
        rows = []
        for line in (root / 'val_map.txt').read_text().splitlines():
            member, label = line.split('\t')
            flat = member.replace('/', '_')
            dst.writestr(flat, src.read(member))
            rows.append(f'{flat}\t{label}')
    os.replace(root / 'val_flat.zip', root / 'val.zip')
    (root / 'val_map.txt').write_text('\n'.join(rows) + '\n')
    data = build_loader(_cfg(str(root), 'DATA.ZIP_MODE', 'True'), 0, 1, train=False)
    assert data.class_names == [str(d) for d in range(10)] and len(data.dataset_val) == 50


@pytest.mark.bench
def test_bench_loader_times_every_pipeline_with_the_official_one(tmp_path):
    """bench/bench_loader.py with a stand-in official checkout (its data/build.py's build_transform is imported as
    the official one is): one row per pipeline, ratios to the official; a missing checkout is one error line."""
    import subprocess
    from conftest import PYTHON, ROOT, subprocess_env
    official = tmp_path / 'official' / 'data'
    official.mkdir(parents=True)
    (official / '__init__.py').write_text('raise ImportError("the package __init__ must not be run")\n')
    (official / 'build.py').write_text(
        'from torchvision import transforms\n'
        'def build_transform(is_train, config):\n'
        '    return transforms.Compose([transforms.RandomResizedCrop(config.DATA.IMG_SIZE), transforms.ToTensor()])\n')
    cmd = [PYTHON, os.path.join(ROOT, 'bench', 'bench_loader.py'), '--images', '32', '--rounds', '1', '--chunk', '32']
    proc = subprocess.run(cmd + ['--official', str(tmp_path / 'official')], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(('official', 'ours'))]
    assert [r.split('  ')[0] for r in rows] == [
        'official (folder)', 'ours exact, folder', 'ours exact, zip', 'ours exact, shards', 'ours fast, folder',
        'ours fast, zip', 'ours fast, shards', 'ours exact + device step on CPU']
    assert rows[0].split()[-2:] == ['1.00x', '-'] and all(r.rstrip().endswith('x') for r in rows[1:])
    missing = subprocess.run(cmd + ['--official', str(tmp_path / 'none')], cwd=ROOT, env=subprocess_env(),
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and missing.stderr.strip().splitlines()[-1].startswith("error: --official: no '")


def test_a_failing_transform_is_not_taken_for_an_unreadable_image(packed, digits_dir):
    """Every data set skips unreadable images in training; an error of the transforms (a bug, a bad augmentation
    setting) is not one of them: it shows, in the folder's data set and in the encoded ones alike."""
    def broken(img):
        raise ValueError('a bug in a transform')
    zip_path, samples = load_zip_split(packed['zip'], 'train')
    folder = SafeImageFolder(os.path.join(digits_dir, 'train'), transform=broken, skip_corrupt=True)
    zipped = ZipImages(zip_path, samples, [str(d) for d in range(10)], 'no', 0, 1, transform=broken, skip_corrupt=True)
    for ds in (folder, zipped):
        with pytest.raises(ValueError, match='a bug in a transform'):
            ds[0]
