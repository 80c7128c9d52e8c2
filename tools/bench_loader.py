"""Training data pipeline speed: images/s per worker of our loader vs timm's, same transforms.

    python tools/bench_loader.py [--images 512] [--workers 0 1 2] [--batch-size 64]

The folder holds real-size JPEGs (ImageNet's typical 500x375, quality 90) cut from the two photographs that
scikit-learn ships (``load_sample_images``), in 4 classes; nothing is downloaded. Both loaders decode the JPEG,
apply the papers' training transform (random resized crop 224, flip, RandAugment rand-m9-mstd0.5-inc1, colour
jitter, random erasing 0.25, normalise) and collate batches; ours also checks for unreadable files. The first
batch (worker start-up) is excluded from the timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

IMAGENET_TYPICAL = (500, 375)
NUM_CLASSES = 4


def make_jpeg_folder(root: str, n_images: int, seed: int = 0) -> str:
    """Random crops of the sample photos, resized to 500x375, as <root>/{train,val}/<class>/*.JPEG."""
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for split, count in (('train', n_images), ('val', NUM_CLASSES)):
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
            x0, y0 = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
            img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(IMAGENET_TYPICAL, Image.BICUBIC)
            folder = os.path.join(root, split, f'class{i % NUM_CLASSES}')
            os.makedirs(folder, exist_ok=True)
            img.save(os.path.join(folder, f'{i:05d}.JPEG'), quality=90)
    return root


def images_per_second(loader, batch_size: int) -> float:
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not timed
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += batch[0].shape[0]
    return n / (time.perf_counter() - t0)


def ours(root: str, workers: int, batch_size: int):
    from config import get_default_config, merge_opts
    from data.build import build_loader
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', root, 'DATA.NUM_WORKERS', str(workers), 'DATA.BATCH_SIZE', str(batch_size),
                     'MODEL.NUM_CLASSES', str(NUM_CLASSES)])
    return build_loader(cfg, rank=0, world_size=1).loader_train


def timm_loader(root: str, workers: int, batch_size: int):
    from timm.data import create_dataset, create_loader
    ds = create_dataset('', root=os.path.join(root, 'train'), is_training=True)
    return create_loader(ds, input_size=(3, 224, 224), batch_size=batch_size, is_training=True, use_prefetcher=False,
                         no_aug=False, re_prob=0.25, re_mode='pixel', re_count=1, color_jitter=0.4,
                         auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', num_workers=workers,
                         pin_memory=False, persistent_workers=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--images', type=int, default=512)
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=3, help='median over this many passes')
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = make_jpeg_folder(tmp, args.images)
        print(f'{args.images} JPEGs of {IMAGENET_TYPICAL[0]}x{IMAGENET_TYPICAL[1]}, batch {args.batch_size}, '
              f'train transform with RandAugment + erasing')
        print(f"{'workers':>7s} {'ours img/s':>11s} {'timm img/s':>11s} {'ours per worker':>16s}")
        for w in args.workers:
            rates = {}
            for name, make in (('ours', ours), ('timm', timm_loader)):
                rates[name] = float(np.median([images_per_second(make(root, w, args.batch_size), args.batch_size)
                                               for _ in range(args.repeats)]))
            per = rates['ours'] / max(1, w)
            print(f"{w:7d} {rates['ours']:11.1f} {rates['timm']:11.1f} {per:16.1f}", flush=True)


if __name__ == '__main__':
    main()
