"""Write Swin-Transformer's zipped data set from an ImageNet-style folder.

    python tools/make_zip.py SRC DST [--splits train val]

For each split, ``DST/<split>.zip`` holds the images of ``SRC/<split>/<class>/...`` as members ``<class>/<file>``
(stored, not compressed: JPEGs do not compress and stored members are read without inflating), and
``DST/<split>_map.txt`` lists ``<member>\\t<label>`` per image. Images, labels and their order are those of the
folder loader (``data.build.SafeImageFolder``), so ``main.py --zip --data-path DST`` trains on the same samples, in
the same order, as ``main.py --data-path SRC``.
"""
from __future__ import annotations

import argparse
import os
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.build import SafeImageFolder, check_data_folder  # noqa: E402
from data.images import DataError  # noqa: E402


def make_zip(src: str, dst: str, splits: tuple[str, ...] = ('train', 'val')) -> dict[str, int]:
    """Write ``DST/<split>.zip`` and ``DST/<split>_map.txt`` for each split; returns images per split."""
    check_data_folder(src, splits=splits)
    os.makedirs(dst, exist_ok=True)
    counts = {}
    for split in splits:
        folder = SafeImageFolder(os.path.join(src, split))
        zip_path, map_path = os.path.join(dst, f'{split}.zip'), os.path.join(dst, f'{split}_map.txt')
        with zipfile.ZipFile(zip_path + '.tmp', 'w', compression=zipfile.ZIP_STORED) as zf, \
                open(map_path + '.tmp', 'w', encoding='utf-8') as mf:
            for path, label in folder.samples:
                member = os.path.relpath(path, folder.root).replace(os.sep, '/')
                zf.write(path, member)
                mf.write(f'{member}\t{label}\n')
        os.replace(zip_path + '.tmp', zip_path)
        os.replace(map_path + '.tmp', map_path)
        counts[split] = len(folder.samples)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='folder with <split>/<class>/<image>')
    parser.add_argument('dst', help='folder for <split>.zip and <split>_map.txt')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'])
    args = parser.parse_args()
    try:
        counts = make_zip(args.src, args.dst, tuple(args.splits))
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for split, n in counts.items():
        print(f'{split}: {n} images -> {os.path.join(args.dst, split + ".zip")}, {split}_map.txt')
    return 0


if __name__ == '__main__':
    sys.exit(main())
