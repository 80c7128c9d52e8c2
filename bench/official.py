"""The official models, built from a checkout of the official repository, as the speed and memory tools measure
them beside ours (``bench/benchmark.py``, ``bench/profile_ops.py``, ``bench/fake_cuda.py``)."""
from __future__ import annotations

import importlib.util
import os


def official_model_file(cfg, root: str) -> str:
    """The file of the official checkout at ``root`` that defines ``cfg``'s model (it may not exist)."""
    if cfg.MODEL.TYPE == 'msg':
        return os.path.join(root, 'models', 'msg_transformer.py')
    variant = cfg.MODEL.NAME.split('-')[-1]          # MG-SSAF-T / -S / -B: one official file each
    return os.path.join(root, 'models', f'MS-SSAF-{variant}.py')


def official_model(cfg, root: str):
    """The official implementation of ``cfg``'s model, imported from a checkout at ``root`` (not part of this
    repository: clone hustvl/MSG-Transformer or shuaiyang11/MG-SSAF yourself), built as ours is measured: the
    config's size and classes, no stochastic depth."""
    path = official_model_file(cfg, root)
    if cfg.MODEL.TYPE == 'msg':
        factory = 'MSGTransformer'
        m = cfg.MODEL.MSG
        kwargs = dict(img_size=cfg.DATA.IMG_SIZE, patch_size=m.PATCH_SIZE, in_chans=m.IN_CHANS,
                      num_classes=cfg.MODEL.NUM_CLASSES, embed_dim=m.EMBED_DIM, depths=list(m.DEPTHS),
                      num_heads=list(m.NUM_HEADS), window_size=m.WINDOW_SIZE, mlp_ratio=m.MLP_RATIO,
                      qkv_bias=m.QKV_BIAS, qk_scale=m.QK_SCALE, drop_path_rate=0.0, ape=m.APE,
                      patch_norm=m.PATCH_NORM, shuffle_size=list(m.SHUF_SIZE), manip_type=m.MANIP_TYPE)
    else:  # as ours is measured: no stochastic depth (the official constructor's default is 0.2)
        factory = 'MGSSAF'
        kwargs = dict(img_size=cfg.DATA.IMG_SIZE, num_classes=cfg.MODEL.NUM_CLASSES, drop_path_rate=0.0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official model file not found: '{path}'")
    spec = importlib.util.spec_from_file_location(f'official_{os.path.basename(path)[:-3].replace("-", "_")}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, factory)(**kwargs)
