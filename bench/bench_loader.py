"""Training data pipeline speed per CPU core: ours (exact and fast; from a folder, a zip, tar shards) beside the
official MG-SSAF pipeline, timed in turns in one process.

    python bench/bench_loader.py --official ../MG-SSAF [--images 256] [--rounds 12] [--chunk 64]

The data are real-size JPEGs (ImageNet's typical 500x375, quality 90) cut from the two photographs scikit-learn
ships (``load_sample_images``), in 4 classes, written as a folder, as Swin's zip (``tools/make_zip.py``) and as tar
shards (``tools/make_shards.py``); nothing is downloaded. Every pipeline runs the papers' training transform (random
resized crop 224, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25) and collates batches of 32, in this
process on one thread (``num_workers=0``): images/s is per core.

* official: the official MG-SSAF ``data/build.py`` ``build_transform`` (imported from ``--official``) with
  torchvision's ``ImageFolder``: decode, augment, ToTensor, Normalize and random erasing on the CPU. It runs with
  our fix of timm's Posterize at 0 bits (``data/build.py``), without which current Pillow stops it mid-epoch.
* ours exact: what a data worker of ours does (``data/device_loader.py``): decode, augment, uint8; normalisation
  and erasing run on the training device and are not counted (the ``+ device step on CPU`` row counts them here).
* ours fast: ``DATA.FAST_DECODE``: JPEG draft mode and one crop-and-resize with a reducing gap.

Timing in turns: after one warm-up chunk each, every round times one chunk (``--chunk`` images) of every pipeline,
in an order rotated each round, so that a slow spell of a shared machine hits all of them. A chunk's rate is images
per CPU-second of the measuring thread (``time.thread_time``: the work of one core, not the time other processes of
a shared machine took from it; ``--wall`` for wall-clock seconds). The table gives each pipeline's median over the
rounds with the spread (min..max), and its ratios as medians of the per-round ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Callable, Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

IMAGENET_TYPICAL = (500, 375)
NUM_CLASSES = 4
BATCH = 32


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


def _config(path: str, *opts: str):
    from config import get_default_config, merge_opts
    cfg = get_default_config()
    merge_opts(cfg, ['DATA.DATA_PATH', path, 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', str(BATCH),
                     'MODEL.NUM_CLASSES', str(NUM_CLASSES), *opts])
    return cfg


def _forever(loader) -> Iterator:
    for epoch in itertools.count():
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        yield from loader


def ours(path: str, *opts: str, device_step: bool = False) -> Iterator:
    """Batches of our training loader: the workers' uint8 output, or with ``device_step`` the prepared batch."""
    from data import build_loader
    loader = build_loader(_config(path, *opts), rank=0, world_size=1).loader_train
    if device_step:
        return (batch[0] for batch in _forever(loader))
    return (batch[0] for batch in _forever(loader.loader))


def official_transform(official_dir: str) -> Callable:
    """The official MG-SSAF ``build_transform(is_train=True, config)``, imported from its checkout (its ``data``
    package is loaded under another name, without its ``__init__``, which imports SimMIM code)."""
    folder = os.path.join(official_dir, 'data')
    if not os.path.isfile(os.path.join(folder, 'build.py')):
        raise SystemExit(f"error: --official: no '{folder}/build.py' (give a checkout of the official MG-SSAF)")
    package = types.ModuleType('official_mgssaf_data')
    package.__path__ = [folder]
    sys.modules['official_mgssaf_data'] = package
    spec = importlib.util.spec_from_file_location('official_mgssaf_data.build', os.path.join(folder, 'build.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.build_transform(True, _config(''))


def official(path: str, transform: Callable) -> Iterator:
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(os.path.join(path, 'train'), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=0, drop_last=True)
    return (batch[0] for batch in _forever(loader))


def time_chunk(batches: Iterator, images: int, clock: Callable[[], float] = time.thread_time) -> float:
    """Images per second of ``clock`` for the next ``images`` images (whole batches) of ``batches``: per CPU-second
    of this thread by default (what a core does, whatever else the machine runs), or per wall-clock second."""
    n, t0 = 0, clock()
    while n < images:
        n += next(batches).shape[0]
    return n / (clock() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--official', required=True, metavar='DIR', help='a checkout of the official MG-SSAF')
    parser.add_argument('--images', type=int, default=256, help='training images written')
    parser.add_argument('--rounds', type=int, default=12)
    parser.add_argument('--chunk', type=int, default=64, help='images timed per pipeline per round')
    parser.add_argument('--wall', action='store_true', help='wall-clock seconds instead of CPU-seconds')
    args = parser.parse_args()
    clock = time.perf_counter if args.wall else time.thread_time
    torch.set_num_threads(1)
    import data.transforms  # noqa: F401 - timm's Posterize as old Pillow did it, for the official pipeline too (below)
    official_tf = official_transform(args.official)  # a wrong --official fails before any work
    from tools.make_shards import make_shards
    from tools.make_zip import make_zip
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_jpeg_folder(os.path.join(tmp, 'folder'), args.images)
        make_zip(folder, os.path.join(tmp, 'zip'))
        make_shards(folder, os.path.join(tmp, 'shards'), shard_size=64)
        zip_opts = ('DATA.ZIP_MODE', 'True', 'DATA.CACHE_MODE', 'no')
        fast = ('DATA.FAST_DECODE', 'True')
        pipelines = {
            'official (folder)': official(folder, official_tf),
            'ours exact, folder': ours(folder),
            'ours exact, zip': ours(os.path.join(tmp, 'zip'), *zip_opts),
            'ours exact, shards': ours(os.path.join(tmp, 'shards')),
            'ours fast, folder': ours(folder, *fast),
            'ours fast, zip': ours(os.path.join(tmp, 'zip'), *zip_opts, *fast),
            'ours fast, shards': ours(os.path.join(tmp, 'shards'), *fast),
            'ours exact + device step on CPU': ours(folder, device_step=True),
        }
        names = list(pipelines)
        for name in names:
            time_chunk(pipelines[name], args.chunk, clock)  # warm-up: first decode, page cache, lazily built state
        rates: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rates[name].append(time_chunk(pipelines[name], args.chunk, clock))
        base = rates['official (folder)']
        print(f'{args.images} JPEGs of {IMAGENET_TYPICAL[0]}x{IMAGENET_TYPICAL[1]}, batch {BATCH}, one thread, '
              f'{args.rounds} rounds of {args.chunk} images per pipeline, in turns; '
              f'{"wall-clock" if args.wall else "CPU"} seconds')
        print(f"{'pipeline':34s} {'img/s per core':>15s} {'min..max':>14s} {'/ official':>11s} {'/ ours folder':>14s}")
        for name in names:
            ratio = statistics.median(a / b for a, b in zip(rates[name], base))
            same = rates['ours fast, folder' if 'fast' in name else 'ours exact, folder']
            to_folder = statistics.median(a / b for a, b in zip(rates[name], same))
            spread = f'{min(rates[name]):.0f}..{max(rates[name]):.0f}'
            folder_ratio = f'{to_folder:13.2f}x' if name.startswith('ours') else f"{'-':>14s}"
            print(f'{name:34s} {statistics.median(rates[name]):15.1f} {spread:>14s} {ratio:10.2f}x {folder_ratio}',
                  flush=True)
        from data import release_workers
        release_workers()


if __name__ == '__main__':
    main()
