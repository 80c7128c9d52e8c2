"""Time the write of a full training checkpoint (model + AdamW moments + EMA), as a stop (SIGTERM) writes it.

    python tools/bench_checkpoint.py --cfg configs/msg_base_p4_win7_224.yaml [--dir FOLDER] [--repeats 3]

torchrun (and Slurm's default KillWait) kills the workers 30 s after forwarding SIGTERM; the stop writes one
checkpoint, ``last.pth``, through ``checkpoint.save_checkpoint`` (temporary file, fsync, rename). This builds that
checkpoint for the config's model with random weights, AdamW state after one step and an EMA copy, writes it into
``--dir`` (put it on the file system the runs write to) and prints its size and the time of each write, the
``state_dict`` gathering included. The file is removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timm.utils import ModelEmaV3  # noqa: E402

from checkpoint import save_checkpoint, training_checkpoint  # noqa: E402
from config import load_config_file  # noqa: E402
from engine import TrainState  # noqa: E402
from lr_scheduler import ScheduleClock, build_scheduler  # noqa: E402
from models import build_model  # noqa: E402
from optimizer import build_optimizer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cfg', default='configs/msg_base_p4_win7_224.yaml')
    parser.add_argument('--dir', default=None, help='folder to write into (default: a temporary folder)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)

    config = load_config_file(args.cfg, ['TRAIN.EMA.ENABLE', 'True'])
    model = build_model(config)
    optimizer = build_optimizer(config, model, config.TRAIN.BASE_LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist from the first step on
    optimizer.zero_grad(set_to_none=True)
    scheduler = build_scheduler(config, optimizer, ScheduleClock(1000), config.TRAIN.BASE_LR, config.TRAIN.WARMUP_LR,
                                config.TRAIN.MIN_LR)
    scaler = torch.amp.GradScaler('cpu', enabled=False)
    ema = ModelEmaV3(model, decay=config.TRAIN.EMA.DECAY)
    params = sum(p.numel() for p in model.parameters())

    folder = args.dir or tempfile.mkdtemp(prefix='bench_ckpt_')
    path = os.path.join(folder, 'last.pth')
    print(f'{config.MODEL.NAME}: {params / 1e6:.1f} M parameters; writing into {folder}')
    for i in range(args.repeats):
        t0 = time.perf_counter()
        state = training_checkpoint(config=config, model=model, optimizer=optimizer, scheduler=scheduler,
                                    scaler=scaler, model_ema=ema, state=TrainState(epoch=1), class_names=None,
                                    world_size=1)
        t1 = time.perf_counter()
        save_checkpoint(path, state)
        t2 = time.perf_counter()
        size = os.path.getsize(path)
        print(f'write {i + 1}: {size / 2**30:.2f} GiB, gather {t1 - t0:.2f} s, write + fsync + rename {t2 - t1:.2f} s '
              f'({size / 2**20 / (t2 - t1):.0f} MiB/s)')
        del state
        os.remove(path)
    if not args.dir:
        os.rmdir(folder)
    return 0


if __name__ == '__main__':
    sys.exit(main())
