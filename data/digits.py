"""Export scikit-learn's handwritten digits as an ImageNet-style folder for the demo and the tests.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 grey-scale scans of the digits 0-9 inside the package
(nothing is downloaded). Each is scaled to 0-255, upscaled (bicubic) to ``--size`` pixels, stored as an RGB PNG,
and split with a fixed, stratified 80/20 split into ``<out>/train/<digit>/`` and ``<out>/val/<digit>/``.

    python -m data.digits --out demo_data/digits --size 56
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import numpy as np
from PIL import Image

DIGITS_MAX = 16  # load_digits pixel values are 0..16


def export_digits(out_dir: str, size: int, val_fraction: float = 0.2, seed: int = 0,
                  limit_per_class: Optional[int] = None) -> dict:
    """Write the folder (idempotent: an existing complete export of the same settings is kept).

    Returns a summary ``{'train': {class: n}, 'val': {class: n}, 'size': size}``, also written to
    ``<out_dir>/summary.json``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    summary_path = os.path.join(out_dir, 'summary.json')
    settings = {'size': size, 'val_fraction': val_fraction, 'seed': seed, 'limit_per_class': limit_per_class}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get('settings') == settings:
            return summary

    digits = load_digits()
    images, labels = digits.images, digits.target
    index = np.arange(len(labels))
    if limit_per_class is not None:
        index = np.concatenate([index[labels == c][:limit_per_class] for c in np.unique(labels)])
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, random_state=seed,
                                          stratify=labels[index])
    summary = {'settings': settings, 'train': {}, 'val': {}}
    for split, idx in (('train', train_idx), ('val', val_idx)):
        for i in sorted(idx):
            cls = str(int(labels[i]))
            folder = os.path.join(out_dir, split, cls)
            os.makedirs(folder, exist_ok=True)
            pixels = (images[i] * (255.0 / DIGITS_MAX)).round().astype(np.uint8)   # 8, 8
            img = Image.fromarray(pixels, mode='L').resize((size, size), Image.BICUBIC).convert('RGB')
            img.save(os.path.join(folder, f'{i:04d}.png'))
            summary[split][cls] = summary[split].get(cls, 0) + 1
    with open(summary_path, 'w') as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='demo_data/digits', help='output folder')
    parser.add_argument('--size', type=int, default=56, help='image side in pixels')
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    summary = export_digits(args.out, args.size, args.val_fraction, args.seed)
    n_train, n_val = sum(summary['train'].values()), sum(summary['val'].values())
    print(f'digits: {n_train} train / {n_val} val images, 10 classes, {args.size}x{args.size} -> {args.out}')


if __name__ == '__main__':
    main()
