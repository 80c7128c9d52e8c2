"""Configuration: yacs defaults, YAML files with ``BASE`` inheritance, command-line overrides.

The config is the single source of truth for the architecture and the run. ``get_config(args)`` returns a
frozen ``CfgNode``; ``main.py`` writes it to ``<OUTPUT>/config.yaml`` so every run can be reproduced.
Keys and defaults follow Swin-Transformer's ``config.py`` (which both official repositories fork), so the
official YAMLs and ``--opts`` overrides work unchanged.
"""
from __future__ import annotations

import ast
import difflib
import functools
import os
from typing import Any, Iterable, Optional

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A user-facing configuration problem; ``main.py`` prints its message as one line."""


_C = CN()
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data
# -----------------------------------------------------------------------------
_C.DATA = CN()
_C.DATA.BATCH_SIZE = 128             # per process
_C.DATA.DATA_PATH = ''               # <path>/train/<class>/*, <path>/val/<class>/*
_C.DATA.DATASET = 'imagenet'
_C.DATA.IMG_SIZE = 224
_C.DATA.INTERPOLATION = 'bicubic'
_C.DATA.PIN_MEMORY = True
_C.DATA.NUM_WORKERS = 8
_C.DATA.SKIP_CORRUPT = True          # training set only: skip unreadable images with a warning
_C.DATA.MEAN = (0.485, 0.456, 0.406)
_C.DATA.STD = (0.229, 0.224, 0.225)

# -----------------------------------------------------------------------------
# Model
# -----------------------------------------------------------------------------
_C.MODEL = CN()
_C.MODEL.TYPE = 'msg'                # a name registered in models/ (see models.list_model_types())
_C.MODEL.NAME = 'msg_tiny_p4_win7_224'
_C.MODEL.PRETRAINED = ''             # weights to fine-tune from (head / position tables adapted)
_C.MODEL.RESUME = ''                 # checkpoint to resume (or evaluate with --eval)
_C.MODEL.NUM_CLASSES = 1000
_C.MODEL.DROP_RATE = 0.0
_C.MODEL.DROP_PATH_RATE = 0.1
_C.MODEL.LABEL_SMOOTHING = 0.1
_C.MODEL.FUSED_ATTN = True           # scaled_dot_product_attention where it is exact; False: plain matmuls

# MSG-Transformer (hustvl/MSG-Transformer)
_C.MODEL.MSG = CN()
_C.MODEL.MSG.PATCH_SIZE = 4
_C.MODEL.MSG.IN_CHANS = 3
_C.MODEL.MSG.EMBED_DIM = 96
_C.MODEL.MSG.DEPTHS = [2, 2, 6, 2]
_C.MODEL.MSG.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.MSG.WINDOW_SIZE = 7
_C.MODEL.MSG.MLP_RATIO = 4.
_C.MODEL.MSG.QKV_BIAS = True
_C.MODEL.MSG.QK_SCALE = None
_C.MODEL.MSG.APE = False
_C.MODEL.MSG.PATCH_NORM = True
_C.MODEL.MSG.SHUF_SIZE = [4, 4, 2, 1]
_C.MODEL.MSG.MANIP_TYPE = 'shuf'
# The official recipe decays the MSG tokens (its no_weight_decay() names 'msg_token', which no parameter is called,
# and the published accuracies were trained so). False exempts them like the other learned tokens and biases.
_C.MODEL.MSG.DECAY_MSG_TOKENS = True

# MG-SSAF (shuaiyang11/MG-SSAF)
_C.MODEL.MGSSAF = CN()
_C.MODEL.MGSSAF.PATCH_SIZE = 4
_C.MODEL.MGSSAF.IN_CHANS = 3
_C.MODEL.MGSSAF.EMBED_DIM = 96
_C.MODEL.MGSSAF.DEPTHS = [2, 2, 6, 2]
_C.MODEL.MGSSAF.NUM_HEADS = [3, 6, 12, 24]
_C.MODEL.MGSSAF.GLOBAL_RATIO = [0.0, 0.5, 0.5, 0.0]   # share of each stage's heads that attend globally
_C.MODEL.MGSSAF.WIDTH = [0, 2, 2, 0]
_C.MODEL.MGSSAF.WINDOW_SIZE = 7
_C.MODEL.MGSSAF.MLP_RATIO = 2.
_C.MODEL.MGSSAF.QKV_BIAS = True
_C.MODEL.MGSSAF.HEAD_HIDDEN_DIM = 1280

# -----------------------------------------------------------------------------
# Training
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
_C.TRAIN.WEIGHT_DECAY = 0.05
_C.TRAIN.BASE_LR = 5e-4              # for a total batch of LR_SCALE_BATCH; scaled linearly
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
_C.TRAIN.LR_SCALE_BATCH = 512        # the official code scales LRs by total_batch / 512
_C.TRAIN.CLIP_GRAD = 5.0             # max grad norm; 0 or None disables clipping
_C.TRAIN.AUTO_RESUME = True
_C.TRAIN.ACCUMULATION_STEPS = 1      # 0 and 1 both mean no accumulation
_C.TRAIN.USE_CHECKPOINT = False      # gradient checkpointing per block
_C.TRAIN.COMPILE = False             # torch.compile the model (falls back to eager on failure)
_C.TRAIN.KEEP_CHECKPOINTS = 3        # ckpt_epoch_*.pth kept in OUTPUT (best.pth is kept apart)
_C.TRAIN.MAX_NONFINITE_STEPS = 10    # stop after this many non-finite losses in a row

_C.TRAIN.LR_SCHEDULER = CN()
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'   # cosine | linear | step | multistep
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# The two official recipes (see lr_scheduler.py). MSG-Transformer: the cosine spans all steps (no prefix) and the
# schedule counts batches; MG-SSAF: the cosine starts after warm-up and the schedule counts optimiser updates
# (its YAMLs set both). The defaults are MSG-Transformer's, like every other default here.
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = False
_C.TRAIN.LR_SCHEDULER.T_IN_BATCHES = True
_C.TRAIN.LR_SCHEDULER.GAMMA = 0.1
_C.TRAIN.LR_SCHEDULER.MULTISTEPS = []

_C.TRAIN.OPTIMIZER = CN()
_C.TRAIN.OPTIMIZER.NAME = 'adamw'       # adamw | sgd
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9998

# -----------------------------------------------------------------------------
# Augmentation (timm)
# -----------------------------------------------------------------------------
_C.AUG = CN()
_C.AUG.COLOR_JITTER = 0.4
_C.AUG.HFLIP = 0.5                   # horizontal flip probability (0 for data where mirroring changes the class)
_C.AUG.SCALE = (0.08, 1.0)           # RandomResizedCrop area range
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'   # '' or 'none' disables
_C.AUG.REPROB = 0.25
_C.AUG.REMODE = 'pixel'
_C.AUG.RECOUNT = 1
_C.AUG.MIXUP = 0.8
_C.AUG.CUTMIX = 1.0
_C.AUG.CUTMIX_MINMAX = None
_C.AUG.MIXUP_PROB = 1.0
_C.AUG.MIXUP_SWITCH_PROB = 0.5
_C.AUG.MIXUP_MODE = 'batch'

# -----------------------------------------------------------------------------
# Testing
# -----------------------------------------------------------------------------
_C.TEST = CN()
_C.TEST.CROP = True                  # resize to IMG_SIZE/0.875 then centre-crop
_C.TEST.CROP_PCT = 0.875
_C.TEST.SEQUENTIAL = False

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
_C.AMP_ENABLE = True                 # native torch.amp autocast on CUDA/CPU
_C.AMP_DTYPE = 'float16'             # float16 (with GradScaler) | bfloat16
_C.AMP_OPT_LEVEL = ''                # apex-era flag, mapped onto AMP_ENABLE (O0 = off)
_C.DEVICE = ''                       # '' = cuda when available, else cpu
_C.OUTPUT = ''
_C.TAG = 'default'
_C.SAVE_FREQ = 1
_C.PRINT_FREQ = 100
_C.SEED = 0
_C.EVAL_MODE = False
_C.THROUGHPUT_MODE = False
_C.LOCAL_RANK = 0


def _closest(key: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ''


def _all_keys(node: CN, prefix: str = '') -> list[str]:
    keys = []
    for k, v in node.items():
        full = f'{prefix}{k}'
        keys.append(full)
        if isinstance(v, CN):
            keys.extend(_all_keys(v, full + '.'))
    return keys


def _check_keys(node: CN, ref: CN, where: str, prefix: str = '') -> None:
    """Raise ConfigError naming the first unknown key in ``node`` and the closest valid one."""
    for k, v in node.items():
        full = f'{prefix}{k}'
        if k not in ref:
            raise ConfigError(f"unknown config key '{full}' in {where}{_closest(full, _all_keys(_C))}")
        if isinstance(v, dict) and isinstance(ref[k], CN):
            _check_keys(v, ref[k], where, full + '.')


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: '{path}' (pass an existing YAML, e.g. configs/msg_tiny_p4_win7_224.yaml)")
    try:
        with open(path, 'r') as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        raise ConfigError(f"YAML syntax error in '{path}'{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _merge(config: CN, data: dict, where: str) -> None:
    _check_keys(data, config, where)
    try:
        config.merge_from_other_cfg(CN(data))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ConfigError(f'bad value in {where}: {e}') from None


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
_notes: list[str] = []


def config_notes() -> list[str]:
    """What the last config read did that the user should see in the log (e.g. a variant filled in)."""
    return list(_notes)


@functools.lru_cache(maxsize=None)
def variant_files() -> dict[str, str]:
    """MODEL.NAME -> our complete YAML, for every YAML in ``configs/`` that names its MODEL.TYPE."""
    found = {}
    for folder, _, files in sorted(os.walk(CONFIG_DIR)):
        for name in sorted(files):
            if name.endswith(('.yaml', '.yml')):
                path = os.path.join(folder, name)
                model = _load_yaml(path).get('MODEL') or {}
                if isinstance(model, dict) and 'TYPE' in model and 'NAME' in model:
                    found.setdefault(str(model['NAME']), path)
    return found


def _yaml_chain(path: str, chain: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The files merged for ``path`` in order: its ``BASE`` files (recursively), then the file itself."""
    path = os.path.normpath(path)
    if os.path.realpath(path) in {os.path.realpath(p) for p in chain}:
        raise ConfigError(f"BASE cycle {' -> '.join(chain + (path,))}")
    data = _load_yaml(path)
    files = []
    for base in data.pop('BASE', None) or ['']:
        if base:
            files += _yaml_chain(os.path.join(os.path.dirname(path), base), chain + (path,))
    return files + [(path, data)]


def _model_keys(data: dict) -> dict:
    model = data.get('MODEL')
    return model if isinstance(model, dict) else {}


def update_config_from_file(config: CN, cfg_file: str) -> None:
    """Merge ``cfg_file`` into ``config``, first merging each file named in its ``BASE`` list.

    A file that names a known variant (``MODEL.NAME``, e.g. MG-SSAF-T) but no ``MODEL.TYPE``, as the official MG-SSAF
    YAMLs do, is merged on top of our complete YAML for that variant (with a note for the log); with neither, the
    model would be a guess, so it is an error."""
    files = _yaml_chain(cfg_file)
    scratch = config.clone()
    for path, data in files:  # unknown keys and bad values first, named with their file
        _merge(scratch, data, f"'{path}'")
    if not any('TYPE' in _model_keys(data) for _, data in files):
        names = [_model_keys(data)['NAME'] for _, data in files if 'NAME' in _model_keys(data)]
        preset = variant_files().get(str(names[-1])) if names else None
        if preset is None:
            raise ConfigError(f"'{cfg_file}' sets no MODEL.TYPE and its MODEL.NAME "
                              f"({names[-1] if names else 'unset'}) is none of our variants: set MODEL.TYPE "
                              f"(msg or mg_ssaf), or MODEL.NAME to one of {', '.join(variant_files())}")
        own = sorted(f'{section}.{key}' for _, data in files for section, node in data.items()
                     for key in (node if isinstance(node, dict) else {'': None}))
        _notes.append(f"config: '{cfg_file}' names the variant {names[-1]} but sets no MODEL.TYPE: architecture and "
                      f"recipe from '{os.path.relpath(preset)}', then its own values "
                      f"({', '.join(k.rstrip('.') for k in own)})")
        files = _yaml_chain(preset) + files
    config.defrost()
    for path, data in files:
        _merge(config, data, f"'{path}'")
    config.freeze()


def merge_opts(config: CN, opts: list[str]) -> None:
    """Apply ``KEY VALUE`` pairs from ``--opts``, naming the closest key when one is unknown."""
    if len(opts) % 2:
        raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {opts}')
    all_keys = _all_keys(config)
    for key, value in zip(opts[0::2], opts[1::2]):
        if key not in all_keys:
            raise ConfigError(f"unknown config key '{key}' in --opts{_closest(key, all_keys)}")
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        old = node[leaf]
        try:
            new = value if isinstance(old, str) else ast.literal_eval(value)  # a string key takes the text as is
        except (ValueError, SyntaxError):
            new = value
        if old is not None and new is not None and not isinstance(new, type(old)):
            if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
                new = float(new)
            elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
                new = type(old)(new)
            else:
                raise ConfigError(f"--opts {key}: expected {type(old).__name__}, got {value!r}")
        node[leaf] = new


def update_config(config: CN, args: Any) -> None:
    """Apply the YAML in ``args.cfg``, then ``--opts``, then the dedicated command-line flags."""
    if getattr(args, 'cfg', None):
        update_config_from_file(config, args.cfg)
    config.defrost()
    if getattr(args, 'opts', None):
        merge_opts(config, args.opts)

    def _given(name: str) -> Optional[Any]:
        return getattr(args, name, None)

    if _given('batch_size'):
        config.DATA.BATCH_SIZE = args.batch_size
    if _given('data_path'):
        config.DATA.DATA_PATH = args.data_path
    if _given('pretrained'):
        config.MODEL.PRETRAINED = args.pretrained
    if _given('resume'):
        config.MODEL.RESUME = args.resume
    if _given('accumulation_steps'):
        config.TRAIN.ACCUMULATION_STEPS = args.accumulation_steps
    if _given('use_checkpoint'):
        config.TRAIN.USE_CHECKPOINT = True
    if _given('compile'):
        config.TRAIN.COMPILE = True
    if _given('amp_opt_level'):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        config.AMP_ENABLE = args.amp_opt_level != 'O0'
    if _given('disable_amp'):
        config.AMP_ENABLE = False
    if _given('amp_dtype'):
        config.AMP_DTYPE = args.amp_dtype
    if _given('device'):
        config.DEVICE = args.device
    if _given('output'):
        config.OUTPUT = args.output
    if _given('tag'):
        config.TAG = args.tag
    if _given('eval'):
        config.EVAL_MODE = True
    if _given('throughput'):
        config.THROUGHPUT_MODE = True
    config.LOCAL_RANK = int(os.environ.get('LOCAL_RANK', 0))
    if config.TRAIN.ACCUMULATION_STEPS < 1:
        config.TRAIN.ACCUMULATION_STEPS = 1
    if config.AMP_DTYPE not in ('float16', 'bfloat16'):
        raise ConfigError(f"AMP_DTYPE must be 'float16' or 'bfloat16', got {config.AMP_DTYPE!r}")
    # Output folder: <OUTPUT>/<MODEL.NAME>/<TAG>, as in Swin-Transformer.
    config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
    config.freeze()


def get_default_config() -> CN:
    return _C.clone()


def get_config(args: Any = None) -> CN:
    """Defaults, then ``args.cfg``, ``args.opts`` and flags; frozen. ``args=None`` gives the defaults."""
    config = _C.clone()
    _notes.clear()
    if args is not None:
        update_config(config, args)
    config.freeze()
    return config


def load_config_file(cfg_file: str, opts: Optional[list[str]] = None) -> CN:
    """Convenience for scripts and tests: defaults + one YAML + optional KEY VALUE overrides (frozen)."""
    config = _C.clone()
    _notes.clear()
    update_config_from_file(config, cfg_file)
    config.defrost()
    if opts:
        merge_opts(config, opts)
    config.freeze()
    return config
