"""Regenerate the test fixtures that come from the official training code (not part of this repository).

    python tools/official_fixtures.py --official-msg ../MSG-Transformer --official-mgssaf ../MG-SSAF \
        [--timm-msg <timm 0.3.2 source root>] [--timm-mgssaf <timm 0.4.12 source root>]

Writes, into ``tests/fixtures/``:

* ``official_lr_traces.json``: the LR of sampled optimiser updates over 300 epochs, from each official
  ``lr_scheduler.py`` driven the way its ``main.py`` drives it (``step_update`` after each update, at the batch or
  update index), for the commands of the official READMEs on ImageNet-1k (1,281,167 training images; a padded
  ``DistributedSampler`` and a loader that drops the last partial batch), plus the other schedulers and
  gradient accumulation.
* ``official_saved_bytes.json``: the bytes the official T models save for backward in a training forward at batch 32
  under float16 autocast, on fake CUDA tensors (``bench/fake_cuda.py``, which measures ours the same way).
* ``official_{msg,mgssaf}_train.pth``: training checkpoints written by the official ``save_checkpoint`` after a few
  official optimiser steps on random data, for tiny configurations of the official models (MSG-Transformer at
  64x64; MG-SSAF at 224x224, the only size the official code takes), with an official float16 scaler state.

The official code's timm pin matters only for its scheduler modules: ``--timm-msg`` / ``--timm-mgssaf`` put a timm
source tree (an unpacked sdist) first on the path for the traces; by default the installed timm is used, which
runs the MG-SSAF scheduler but not MSG-Transformer's (timm 1.0 renamed ``t_mul``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
IMAGENET_TRAIN = 1281167

# name: (official repo, base LR, warm-up LR, min LR (the official defaults), processes, batch, accumulation)
RUNS = {
    'msg_tiny_p4_win7_224': ('msg', 5e-4, 5e-7, 5e-6, 8, 128, 1),
    'msg_small_p4_win7_224': ('msg', 5e-4, 5e-7, 5e-6, 8, 128, 1),
    'msg_base_p4_win7_224': ('msg', 5e-4, 5e-7, 5e-6, 16, 64, 1),
    'MG-SSAF-T': ('mgssaf', 1e-3, 5e-7, 1e-6, 2, 128, 1),
    'MG-SSAF-S': ('mgssaf', 1e-3, 5e-7, 1e-6, 2, 128, 1),
    'MG-SSAF-B': ('mgssaf', 1e-3, 5e-7, 1e-6, 2, 64, 2),
}
EXTRA = [('msg_tiny_p4_win7_224', 'linear', None), ('msg_tiny_p4_win7_224', 'step', None),
         ('msg_tiny_p4_win7_224', 'cosine', 2), ('MG-SSAF-T', 'linear', None), ('MG-SSAF-T', 'step', None),
         ('MG-SSAF-T', 'multistep', None), ('MG-SSAF-T', 'cosine', 3)]
MULTISTEPS = [100, 200]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schedule_config(repo: str, scheduler: str, base: float, warm: float, low: float, world: int, batch: int,
                     accum: int):
    from yacs.config import CfgNode as CN
    c = CN()
    c.TRAIN = CN(dict(EPOCHS=300, WARMUP_EPOCHS=20))
    c.TRAIN.LR_SCHEDULER = CN(dict(NAME=scheduler, DECAY_EPOCHS=30, DECAY_RATE=0.1, WARMUP_PREFIX=True, GAMMA=0.1,
                                   MULTISTEPS=MULTISTEPS))
    scale = batch * world / 512.0 * (accum if accum > 1 else 1)  # the official main.py's linear scaling
    c.TRAIN.BASE_LR, c.TRAIN.WARMUP_LR, c.TRAIN.MIN_LR = base * scale, warm * scale, low * scale
    return c


def _trace(module, repo: str, cfg, world: int, batch: int, accum: int) -> tuple[int, list[float]]:
    """The LR of every optimiser update of the official loop (MSG: main.py; MG-SSAF: main.py)."""
    import torch
    batches = math.ceil(IMAGENET_TRAIN / world) // batch
    optimizer = torch.optim.AdamW([{'params': [torch.nn.Parameter(torch.zeros(1))]},
                                   {'params': [torch.nn.Parameter(torch.zeros(1))], 'weight_decay': 0.}],
                                  lr=cfg.TRAIN.BASE_LR)
    per_epoch = batches if repo == 'msg' or accum == 1 else batches // accum
    scheduler = module.build_scheduler(cfg, optimizer, per_epoch)
    lrs = []
    for epoch in range(cfg.TRAIN.EPOCHS):
        for idx in range(batches):
            if (idx + 1) % accum:
                continue
            lrs.append(optimizer.param_groups[0]['lr'])
            scheduler.step_update(epoch * batches + idx if repo == 'msg' else (epoch * batches + idx) // accum)
    return batches, lrs


def _samples(n: int, warmup_updates: int) -> list[int]:
    picked = (set(range(40)) | set(range(warmup_updates - 3, warmup_updates + 4)) | set(range(0, n, 2999))
              | set(range(n - 40, n)) | {282367})
    return sorted(u for u in picked if 0 <= u < n)


def lr_traces(msg_root: str, mgssaf_root: str, timm_roots: dict) -> dict:
    """Each repo's traces in a child process with that repo's timm first on the path."""
    out = {}
    for repo, root in (('msg', msg_root), ('mgssaf', mgssaf_root)):
        env = dict(os.environ)
        if timm_roots.get(repo):
            env['PYTHONPATH'] = os.pathsep.join([timm_roots[repo], env.get('PYTHONPATH', '')])
        with tempfile.NamedTemporaryFile(suffix='.json') as tmp:
            subprocess.run([sys.executable, __file__, '--_traces-for', repo, '--_root', root, '--_out', tmp.name],
                           env=env, check=True)
            out.update(json.load(open(tmp.name)))
    return out


def _traces_for(repo: str, root: str) -> dict:
    module = _load(os.path.join(root, 'lr_scheduler.py'), f'official_{repo}_lr_scheduler')
    jobs = [(name, 'cosine', None) for name in RUNS] + EXTRA
    traces = {}
    for name, scheduler, accum_override in jobs:
        kind, base, warm, low, world, batch, accum = RUNS[name]
        if kind != repo:
            continue
        if accum_override:
            accum, batch = accum_override, batch // accum_override
        cfg = _schedule_config(repo, scheduler, base, warm, low, world, batch, accum)
        batches, lrs = _trace(module, repo, cfg, world, batch, accum)
        key = name if (scheduler, accum_override) == ('cosine', None) else f'{name}:{scheduler}:accum{accum}'
        picked = _samples(len(lrs), 20 * (batches // accum))
        traces[key] = dict(config=name, scheduler=scheduler, world_size=world, batch_size=batch,
                           accumulation_steps=accum, batches_per_epoch=batches, num_updates=len(lrs),
                           updates=picked, lr=[lrs[u] for u in picked])
        print(f'{key}: {batches} batches per epoch, {len(lrs)} updates, last LR {lrs[-1]:.4e}')
    return traces


def _official_training_config(repo: str, output: str):
    """The official config, as its get_config would build it, for the tiny runs (only what save/optimizer read)."""
    from yacs.config import CfgNode as CN
    c = CN()
    c.MODEL = CN(dict(TYPE='msg' if repo == 'msg' else 'MG-SSAF', NAME=f'official_{repo}_tiny'))
    c.TRAIN = CN(dict(BASE_LR=5e-4, WEIGHT_DECAY=0.05, EPOCHS=300, WARMUP_EPOCHS=20, WARMUP_LR=5e-7, MIN_LR=5e-6))
    c.TRAIN.OPTIMIZER = CN(dict(NAME='adamw', EPS=1e-8, BETAS=(0.9, 0.999), MOMENTUM=0.9))
    c.TRAIN.LR_SCHEDULER = CN(dict(NAME='cosine', DECAY_EPOCHS=30, DECAY_RATE=0.1, WARMUP_PREFIX=True, GAMMA=0.1,
                                   MULTISTEPS=[]))
    c.AMP_OPT_LEVEL = 'O0'
    c.OUTPUT = output
    return c


def _moments(model, optimizer) -> dict:
    """Per official parameter name, fingerprints of its AdamW moments, read through the live parameter objects (the
    truth a name-matching loader is checked against)."""
    return {name: [optimizer.state[p]['exp_avg'].double().sum().item(), optimizer.state[p]['exp_avg_sq'].double().sum().item()]
            for name, p in model.named_parameters() if p in optimizer.state}


def training_checkpoints(msg_root: str, mgssaf_root: str) -> None:
    import torch
    from timm.scheduler import CosineLRScheduler
    torch.manual_seed(0)
    logger = logging.getLogger('official')
    with tempfile.TemporaryDirectory() as out:
        # MSG-Transformer: dims 4..32, window 2, shuffle (2, 2, 2, 1), 64x64 input, 10 classes.
        msg = _load(os.path.join(msg_root, 'models', 'msg_transformer.py'), 'official_msg_model')
        model = msg.MSGTransformer(img_size=64, patch_size=4, num_classes=10, embed_dim=4, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2], window_size=2, shuffle_size=[2, 2, 2, 1],
                                   drop_path_rate=0.0)
        cfg = _official_training_config('msg', out)
        opt = _load(os.path.join(msg_root, 'optimizer.py'), 'official_msg_optimizer').build_optimizer(cfg, model)
        sched = CosineLRScheduler(opt, t_initial=3000, warmup_t=200, warmup_lr_init=5e-7, t_in_epochs=False)
        for step in range(3):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)), torch.arange(4))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step_update(step)
        utils = _load(os.path.join(msg_root, 'utils.py'), 'official_msg_utils')
        moments = {'official_msg_train.pth': _moments(model, opt)}
        utils.save_checkpoint(cfg, 1, model, 42.5, opt, sched, logger)
        os.replace(os.path.join(out, 'ckpt_epoch_1.pth'), os.path.join(FIXTURES, 'official_msg_train.pth'))

        # MG-SSAF: dims 6..48, heads (1, 6, 6, 6), 224x224, 10 classes, float16-style scaler (enabled on CPU).
        mg = _load(os.path.join(mgssaf_root, 'models', 'MS-SSAF-T.py'), 'official_mgssaf_model')
        model = mg.MGSSAF(num_classes=10, embed_dim=6, depths=[1, 1, 1, 1], num_heads=[1, 6, 6, 6],
                          drop_path_rate=0.0)
        cfg = _official_training_config('mgssaf', out)
        opt = _load(os.path.join(mgssaf_root, 'optimizer.py'), 'official_mgssaf_optimizer').build_optimizer(cfg, model)
        sched = _load(os.path.join(mgssaf_root, 'lr_scheduler.py'), 'official_mgssaf_lr').build_scheduler(cfg, opt, 10)
        # (MSG-Transformer's lr_scheduler.py needs timm 0.3's t_mul; its state is written, never read, so timm's
        # own scheduler stands in for it above.)
        utils = _load(os.path.join(mgssaf_root, 'utils.py'), 'official_mgssaf_utils')
        scaler = utils.NativeScalerWithGradNormCount()
        scaler._scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)  # the GPU scaler's state, on this CPU
        for step in range(3):
            loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 224, 224)), torch.arange(2))
            scaler(loss, opt, clip_grad=5.0, parameters=model.parameters())
            opt.zero_grad()
            sched.step_update(step)
        moments['official_mgssaf_train.pth'] = _moments(model, opt)
        utils.save_checkpoint(cfg, 4, model, 61.25, opt, sched, scaler, logger)
        os.replace(os.path.join(out, 'ckpt_epoch_4.pth'), os.path.join(FIXTURES, 'official_mgssaf_train.pth'))
    with open(os.path.join(FIXTURES, 'official_train_moments.json'), 'w') as f:
        json.dump(moments, f, indent=0)
    for name in ('official_msg_train.pth', 'official_mgssaf_train.pth'):
        print(f'{name}: {os.path.getsize(os.path.join(FIXTURES, name)) / 1024:.0f} KB')


def saved_bytes_fixture(msg_root: str, mgssaf_root: str) -> None:
    """``official_saved_bytes.json``: the official T models' activation memory at batch 32, float16 (fake CUDA)."""
    import torch
    sys.path.insert(0, ROOT)
    from bench.official import official_model
    from bench.fake_cuda import saved_bytes
    from config import load_config_file
    batch, out = 32, {}
    for name, cfg_file, root in (('msg_tiny', 'msg_tiny_p4_win7_224.yaml', msg_root),
                                 ('mgssaf_tiny', 'MG-SSAF/MG-SSAF-T.yaml', mgssaf_root)):
        cfg = load_config_file(os.path.join(ROOT, 'configs', cfg_file), ['MODEL.DROP_PATH_RATE', '0.0'])
        out[name] = saved_bytes(lambda: official_model(cfg, root), batch, cfg.DATA.IMG_SIZE, torch.float16)
    doc = {'batch_size': batch, 'dtype': 'float16', 'img_size': 224, 'saved_bytes': out,
           'note': 'saved-for-backward bytes of one training forward of the official model on fake CUDA; '
                   'tools/official_fixtures.py --saved-bytes-only'}
    with open(os.path.join(FIXTURES, 'official_saved_bytes.json'), 'w') as f:
        json.dump(doc, f, indent=1)
    print(f'official_saved_bytes.json: {out}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--official-msg', help='checkout of hustvl/MSG-Transformer')
    parser.add_argument('--official-mgssaf', help='checkout of shuaiyang11/MG-SSAF')
    parser.add_argument('--timm-msg', help='timm source root for the MSG-Transformer scheduler (its pin: 0.3.2)')
    parser.add_argument('--timm-mgssaf', help='timm source root for the MG-SSAF scheduler (its pin: 0.4.12)')
    parser.add_argument('--checkpoints-only', action='store_true', help='only the training checkpoints')
    parser.add_argument('--saved-bytes-only', action='store_true', help='only official_saved_bytes.json')
    parser.add_argument('--_traces-for', help=argparse.SUPPRESS)
    parser.add_argument('--_root', help=argparse.SUPPRESS)
    parser.add_argument('--_out', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._traces_for:
        json.dump(_traces_for(args._traces_for, args._root), open(args._out, 'w'))
        return
    if not (args.official_msg and args.official_mgssaf):
        parser.error('--official-msg and --official-mgssaf are required')
    if args.checkpoints_only:
        training_checkpoints(args.official_msg, args.official_mgssaf)
        return
    if args.saved_bytes_only:
        saved_bytes_fixture(args.official_msg, args.official_mgssaf)
        return
    traces = lr_traces(args.official_msg, args.official_mgssaf, {'msg': args.timm_msg, 'mgssaf': args.timm_mgssaf})
    doc = {'imagenet_train_images': IMAGENET_TRAIN, 'epochs': 300, 'warmup_epochs': 20, 'multisteps': MULTISTEPS,
           'note': 'LR of optimiser update u (0-based) in the official training loop; tools/official_fixtures.py',
           'traces': traces}
    with open(os.path.join(FIXTURES, 'official_lr_traces.json'), 'w') as f:
        json.dump(doc, f, separators=(',', ':'))
    training_checkpoints(args.official_msg, args.official_mgssaf)
    saved_bytes_fixture(args.official_msg, args.official_mgssaf)


if __name__ == '__main__':
    main()
