"""Print the model zoo table (params and MACs counted by ``models.model_cost``) as Markdown.

    python tools/model_table.py [--img-size 224]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config_file  # noqa: E402
from models import build_model, model_cost  # noqa: E402

# variant, config, published ImageNet-1k top-1 (the papers), released weights
ZOO = [
    ('MSG-Transformer-T', 'configs/msg_tiny_p4_win7_224.yaml', 82.4, 'not released'),
    ('MSG-Transformer-S', 'configs/msg_small_p4_win7_224.yaml', 83.4, 'not released'),
    ('MSG-Transformer-B', 'configs/msg_base_p4_win7_224.yaml', 84.0, 'not released'),
    ('MG-SSAF-T', 'configs/MG-SSAF/MG-SSAF-T.yaml', 81.9,
     '[MG-SSAF-T.pth](https://drive.google.com/file/d/1pqzUHH3RxBoRcWjVyM7U-E20BRZqgDcH/view?usp=sharing)'),
    ('MG-SSAF-S', 'configs/MG-SSAF/MG-SSAF-S.yaml', 82.7,
     '[MG-SSAF-S.pth](https://drive.google.com/file/d/1c1zMzzBUCgQCKDPU7TwK7N0L_kOckR4T/view?usp=sharing)'),
    ('MG-SSAF-B', 'configs/MG-SSAF/MG-SSAF-B.yaml', 83.2,
     '[MG-SSAF-B.pth](https://drive.google.com/file/d/1g0z2rMqnwfgJt2PnfiyhytMRTe3eWr_Z/view?usp=sharing)'),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--img-size', type=int, default=None, help='override DATA.IMG_SIZE')
    args = parser.parse_args()
    print('| variant | params | MACs | top-1 (paper) | config | official weights |')
    print('|---|---|---|---|---|---|')
    for name, cfg_path, top1, weights in ZOO:
        opts = ['DATA.IMG_SIZE', str(args.img_size)] if args.img_size else []
        cfg = load_config_file(os.path.join(ROOT, cfg_path), opts)
        params, macs = model_cost(build_model(cfg), cfg.DATA.IMG_SIZE)
        print(f'| {name} | {params / 1e6:.2f}M | {macs / 1e9:.2f}G | {top1} | `{cfg_path}` | {weights} |', flush=True)


if __name__ == '__main__':
    main()
