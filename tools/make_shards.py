"""Write tar shards in the webdataset layout from an ImageNet-style folder.

    python tools/make_shards.py SRC DST --shard-size N [--splits train val]

For each split, ``DST/<split>/shard-000000.tar``, ... hold N samples each (the last one the rest): ``<key>.<ext>``,
the image file's bytes as they are (``<ext>`` its extension, lower case), and ``<key>.cls``, its label as text, with
``<key>`` the sample's number in the split. ``DST/<split>/classes.txt`` names the classes (label i on line i + 1) and
``DST/<split>/index.json`` is wids' shard index (samples per shard). Images, labels and their order are those of the
folder loader (``data.build.SafeImageFolder``); ``main.py --data-path DST`` reads them (data/shards.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.build import SafeImageFolder, check_data_folder  # noqa: E402
from data.images import DataError  # noqa: E402
from data.shards import CLASSES_FILE, INDEX_FILE  # noqa: E402


def make_shards(src: str, dst: str, shard_size: int, splits: tuple[str, ...] = ('train', 'val')) -> dict[str, int]:
    """Write the shards, ``classes.txt`` and ``index.json`` of each split; returns shards per split."""
    import webdataset as wds
    if shard_size < 1:
        raise DataError(f'--shard-size must be at least 1, got {shard_size}')
    check_data_folder(src, splits=splits)
    written = {}
    for split in splits:
        folder = SafeImageFolder(os.path.join(src, split))
        out = os.path.join(dst, split)
        os.makedirs(out, exist_ok=True)
        shardlist = []
        for start in range(0, len(folder.samples), shard_size):
            name = f'shard-{start // shard_size:06d}.tar'
            chunk = folder.samples[start:start + shard_size]
            with wds.TarWriter(os.path.join(out, name + '.tmp'), encoder=False, mtime=0) as sink:
                for key, (path, label) in enumerate(chunk, start):
                    with open(path, 'rb') as f:
                        data = f.read()
                    ext = os.path.splitext(path)[1].lstrip('.').lower()
                    sink.write({'__key__': f'{key:08d}', ext: data, 'cls': str(label).encode()})
            os.replace(os.path.join(out, name + '.tmp'), os.path.join(out, name))
            shardlist.append({'url': name, 'nsamples': len(chunk),
                              'filesize': os.path.getsize(os.path.join(out, name))})
        with open(os.path.join(out, CLASSES_FILE), 'w', encoding='utf-8') as f:
            f.writelines(f'{c}\n' for c in folder.classes)
        with open(os.path.join(out, INDEX_FILE), 'w', encoding='utf-8') as f:
            json.dump({'__kind__': 'wids-shard-index-v1', 'wids_version': 1, 'name': split,
                       'shardlist': shardlist}, f, indent=1)
        written[split] = len(shardlist)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('src', help='folder with <split>/<class>/<image>')
    parser.add_argument('dst', help='folder for <split>/*.tar')
    parser.add_argument('--shard-size', type=int, required=True, help='samples per shard')
    parser.add_argument('--splits', nargs='+', default=['train', 'val'])
    args = parser.parse_args()
    try:
        written = make_shards(args.src, args.dst, args.shard_size, tuple(args.splits))
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    for split, n in written.items():
        print(f'{split}: {n} shards -> {os.path.join(args.dst, split)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
