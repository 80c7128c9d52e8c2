"""Configuration: yacs defaults, YAML files with ``BASE`` inheritance, command-line overrides.

The config is the single source of truth for the architecture and the run. ``get_config(args)`` returns a
frozen ``CfgNode``; ``main.py`` writes it to ``<OUTPUT>/config.yaml`` so every run can be reproduced. Every value
is checked against its rule in ``RULES`` (range, choices, list length) when the config is read, so a bad value
ends in one ``ConfigError`` naming the key before any work is done.
Keys and defaults follow Swin-Transformer's ``config.py`` (which both official repositories fork), so the
official YAMLs and ``--opts`` overrides work unchanged.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import functools
import math
import os
import re
import reprlib
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import yaml
from yacs.config import CfgNode as CN


class ConfigError(ValueError):
    """A user-facing configuration problem; ``main.py`` prints its message as one line."""


# The names TRAIN.LR_SCHEDULER.NAME and TRAIN.OPTIMIZER.NAME take: lr_scheduler.py and optimizer.py build each one
# (and import these lists from here, so that nothing imports in a circle).
SCHEDULERS = ('cosine', 'linear', 'step', 'multistep')
OPTIMIZERS = ('adamw', 'sgd')


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
_C.DATA.CHECK_OVERLAP = True         # refuse validation images that are training images (links, identical copies)
# Swin's zipped ImageNet (--zip): <path>/{train,val}.zip with {train,val}_map.txt; CACHE_MODE (--cache-mode) keeps
# the encoded images in memory: 'no', 'full' (all of them on every rank) or 'part' (each rank its own share).
_C.DATA.ZIP_MODE = False
_C.DATA.CACHE_MODE = 'part'
# Training crops decoded at reduced size (JPEG draft mode) and resized bilinearly with a reducing gap, RandAugment's
# geometric ops bilinear: faster, other pixels.
_C.DATA.FAST_DECODE = False
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
_C.TRAIN.ACCUMULATION_STEPS = 1      # batches per optimiser update; 1 = no accumulation
_C.TRAIN.USE_CHECKPOINT = False      # gradient checkpointing per block
_C.TRAIN.COMPILE = False             # torch.compile the model (falls back to eager on failure)
_C.TRAIN.KEEP_CHECKPOINTS = 3        # ckpt_epoch_*.pth kept in OUTPUT, 0 = all (best.pth is kept apart)
_C.TRAIN.MAX_NONFINITE_STEPS = 10    # stop after this many non-finite losses in a row
_C.TRAIN.TF32 = True                 # CUDA: float32 matmuls / convolutions in TF32 (AMP off); False: full float32

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
# The official fused CUDA kernels (--fused_window_process, --fused_layernorm): accepted so that the official commands
# run as written; our window partitions and LayerNorm need no custom kernel, so they change nothing.
_C.FUSED_WINDOW_PROCESS = False
_C.FUSED_LAYERNORM = False


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
            raise ConfigError(f"unknown config key {shown(full)} in {where}{_closest(str(full), _all_keys(_C))}")
        if isinstance(v, dict) and isinstance(ref[k], CN):
            _check_keys(v, ref[k], where, full + '.')


# What a config file may hold: a config is a few hundred values, so these bounds never bind a real one; they stop a
# YAML alias bomb (a kilobyte of nested anchors expands to billions of items) before anything walks or prints it.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_ITEMS = 10_000
MAX_SHOWN_CHARS = 200  # a value quoted in an error message is cut to this length


def shown(value: Any, limit: int = MAX_SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters (a long list or string is elided)."""
    brief = reprlib.Repr()
    brief.maxlist = brief.maxtuple = brief.maxdict = brief.maxset = 12
    brief.maxstring = brief.maxother = limit
    brief.maxlevel = 3
    text = brief.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + '...'


def shown_text(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` for a message, at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit - 3] + '...'


class _DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: Any, again: Any) -> None:
        super().__init__(f'{key!r} at lines {first.line + 1} and {again.line + 1}')
        self.key, self.first, self.again = key, first, again


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the last
    silently, so a section written twice would lose everything the first one set. Merge keys (``<<``) may still
    be overridden, as YAML defines."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == 'tag:yaml.org,2002:merge':
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in first:
                        raise _DuplicateKeyError(key, first[key], key_node.start_mark)
                    first[key] = key_node.start_mark
                except TypeError:  # an unhashable key: the constructor names it below
                    pass
        return super().construct_mapping(node, deep=deep)


def _expanded_size(data: Any, limit: int) -> int:
    """Items in ``data`` with every alias expanded (each reference counted where it appears), counting stops past
    ``limit``: what merging, validating, printing or dumping the value would walk."""
    count, stack = 0, [data]
    while stack and count <= limit:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return count


def _read_text(path: str) -> str:
    """The text of a config file, or ConfigError saying what the file is instead (too large, not UTF-8)."""
    size = os.path.getsize(path)
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"config file '{path}' is {size:,} bytes; a config is a few KB (at most "
                          f"{MAX_YAML_BYTES:,} bytes): is it the right file?")
    with open(path, 'rb') as f:
        raw = f.read()
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        if raw.startswith((b'PK\x03\x04', b'\x80')):
            raise ConfigError(f"'{path}' is not a YAML file but looks like a PyTorch checkpoint; pass it with "
                              f"--resume or --pretrained, and a YAML with --cfg") from None
        line = raw[:e.start].count(b'\n') + 1
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); "
                          f"save it as UTF-8") from None


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: '{path}' (pass an existing YAML, e.g. configs/msg_tiny_p4_win7_224.yaml)")
    text = _read_text(path)
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except _DuplicateKeyError as e:
        raise ConfigError(f"'{path}' gives the key {shown(e.key)} twice in one section (lines {e.first.line + 1} "
                          f"and {e.again.line + 1}): the first would be lost; merge the two") from None
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark else ''
        problem = getattr(e, 'problem', None) or str(e)
        raise ConfigError(f"YAML syntax error in '{path}'{where}: {shown_text(problem)}") from None
    if _expanded_size(data, MAX_YAML_ITEMS) > MAX_YAML_ITEMS:
        raise ConfigError(f"config file '{path}' expands to more than {MAX_YAML_ITEMS:,} values (nested YAML "
                          f"aliases?); a config holds a few hundred")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def _merge(config: CN, data: dict, where: str) -> None:
    _check_keys(data, config, where)
    try:
        config.merge_from_other_cfg(CN(data))
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ConfigError(f'bad value in {where}: {shown_text(str(e))}') from None


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
    real = [os.path.realpath(p) for p in chain]
    if os.path.realpath(path) in real:  # a cycle: name the loop instead of recursing until Python gives up
        raise ConfigError('BASE cycle ' + ' -> '.join(chain[real.index(os.path.realpath(path)):] + (path,)))
    data = _load_yaml(path)
    bases = data.pop('BASE', None) or ['']
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"BASE in '{path}' must be a list of YAML file names, got {bases!r}")
    files = []
    for base in bases:
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


def merge_opts(config: CN, opts: list[str]) -> dict[str, Any]:
    """Apply ``KEY VALUE`` pairs from ``--opts``, naming the closest key when one is unknown; returns the values set
    by key. A key given twice takes the last value, as in yacs (scripts append overrides), with a note for the log
    (``config_notes``) so the first does not vanish without a word."""
    if len(opts) % 2:
        raise ConfigError(f'--opts takes KEY VALUE pairs; got an odd number of items: {shown(list(opts))}')
    all_keys = _all_keys(config)
    given: dict[str, Any] = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        if key not in all_keys:
            raise ConfigError(f"unknown config key {shown(key)} in --opts{_closest(key, all_keys)}")
        if key in given:
            _notes.append(f'config: --opts sets {key} more than once; the last value, {shown(value)}, is used')
        node = config
        *parents, leaf = key.split('.')
        for p in parents:
            node = node[p]
        old = node[leaf]
        try:
            new = value if isinstance(old, str) else ast.literal_eval(value)  # a string key takes the text as is
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            new = value
        if old is not None and new is not None and not isinstance(new, type(old)):
            if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
                new = float(new)
            elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
                new = type(old)(new)
            else:
                raise ConfigError(f"--opts {key}: expected {type(old).__name__}, got {shown(value)}")
        node[leaf] = new
        given[key] = new
    return given


def add_opts_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--opts KEY VALUE ...``; given twice, the lists are joined (a second ``--opts`` used to replace the first)."""
    parser.add_argument('--opts', default=None, nargs='+', action='extend', help=help_text)


# Command-line flags that carry a value, by argparse ``dest``: the config key each one sets. A flag is given when
# its value is not None, so ``--batch-size 0`` reaches the config (and is refused there) instead of being dropped.
FLAG_KEYS = {
    'batch_size': 'DATA.BATCH_SIZE',
    'data_path': 'DATA.DATA_PATH',
    'pretrained': 'MODEL.PRETRAINED',
    'resume': 'MODEL.RESUME',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
    'amp_dtype': 'AMP_DTYPE',
    'device': 'DEVICE',
    'output': 'OUTPUT',
    'tag': 'TAG',
    'cache_mode': 'DATA.CACHE_MODE',
}
# Switches (``store_true``): the key each one sets, and to what, when it is on.
SWITCH_KEYS = {
    'use_checkpoint': ('TRAIN.USE_CHECKPOINT', True),
    'compile': ('TRAIN.COMPILE', True),
    'disable_amp': ('AMP_ENABLE', False),
    'eval': ('EVAL_MODE', True),
    'throughput': ('THROUGHPUT_MODE', True),
    'zip': ('DATA.ZIP_MODE', True),
    'fused_window_process': ('FUSED_WINDOW_PROCESS', True),
    'fused_layernorm': ('FUSED_LAYERNORM', True),
}


def _set_key(config: CN, key: str, value: Any) -> None:
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def update_config(config: CN, args: Any) -> None:
    """Apply the YAML in ``args.cfg``, then ``--opts``, then the dedicated command-line flags."""
    if getattr(args, 'cfg', None):
        update_config_from_file(config, args.cfg)
    config.defrost()
    given = merge_opts(config, args.opts) if getattr(args, 'opts', None) else {}

    def from_flag(key: str, value: Any, flag: str) -> None:
        if key in given and given[key] != value:  # the flag wins, as in Swin: say so
            _notes.append(f'config: {key} is set by --opts ({shown(given[key])}) and by {flag} ({shown(value)}); '
                          f'{flag} wins')
        _set_key(config, key, value)

    for dest, key in FLAG_KEYS.items():
        if getattr(args, dest, None) is not None:
            from_flag(key, getattr(args, dest), f"--{dest.replace('_', '-')}")
    if getattr(args, 'amp_opt_level', None):
        config.AMP_OPT_LEVEL = args.amp_opt_level
        config.AMP_ENABLE = args.amp_opt_level != 'O0'
    for dest, (key, value) in SWITCH_KEYS.items():  # after the opt level: --disable-amp wins over it
        if getattr(args, dest, None):
            from_flag(key, value, f"--{dest.replace('_', '-')}")
    fused = [f'--{flag}' for flag in ('fused_window_process', 'fused_layernorm') if getattr(args, flag, None)]
    if fused:
        _notes.append(f"{' and '.join(fused)}: accepted for the official commands; nothing to fuse here (window "
                      f"partitions are reshapes, LayerNorm is PyTorch's)")
    config.freeze()


def get_default_config() -> CN:
    return _C.clone()


def get_config(args: Any = None) -> CN:
    """Defaults, then ``args.cfg``, ``args.opts`` and flags, validated; frozen. ``args=None`` gives the defaults."""
    config = _C.clone()
    _notes.clear()
    if args is not None:
        update_config(config, args)
    validate_config(config)
    if args is not None:
        # Output folder: <OUTPUT>/<MODEL.NAME>/<TAG>, as in Swin-Transformer (from validated names).
        config.defrost()
        config.OUTPUT = os.path.join(config.OUTPUT or 'output', config.MODEL.NAME, config.TAG)
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
    validate_config(config)
    return config


# -----------------------------------------------------------------------------
# Validation: one rule per key, checked once when the config is read
# -----------------------------------------------------------------------------
# The right type is not enough: SAVE_FREQ 0 or TEST.CROP_PCT 0 pass yacs and fail an epoch later, and a YAML
# ``null`` passes yacs for any key. Every key of the defaults has a rule below (tests/test_config.py checks that
# none is missing); a key added to the defaults needs one here.

class Rule:
    """What a valid value is: ``want`` says it in words for the message (``wants`` for a list of them)."""

    want = 'valid'
    wants = 'valid values'

    def ok(self, value: Any) -> bool:
        raise NotImplementedError


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Int(Rule):
    def __init__(self, lo: Optional[int] = None, hi: Optional[int] = None) -> None:
        self.lo, self.hi = lo, hi
        bound = '' if lo is None else f' >= {lo}' if hi is None else f' in {lo}..{hi}'
        self.want, self.wants = f'an integer{bound}', f'integers{bound}'

    def ok(self, v: Any) -> bool:
        return _is_int(v) and (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi)


class Real(Rule):
    """A finite number in an interval written as in mathematics: ``'(0, 1]'``, ``'[0, inf)'``."""

    def __init__(self, interval: str) -> None:
        m = re.fullmatch(r'([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])', interval)
        assert m, interval
        self.lo_open, self.hi_open = m.group(1) == '(', m.group(4) == ')'
        self.lo, self.hi = float(m.group(2)), float(m.group(3))
        if self.hi == math.inf:
            bound = f" {'>' if self.lo_open else '>='} {m.group(2)}"
        else:
            bound = f' in {interval}'
        self.want, self.wants = f'a number{bound}', f'numbers{bound}'

    def ok(self, v: Any) -> bool:
        return (_is_real(v) and (v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))


class Flag(Rule):
    want, wants = 'True or False', 'True or False values'

    def ok(self, v: Any) -> bool:
        return isinstance(v, bool)


class Text(Rule):
    def __init__(self, empty: bool = True, pattern: Optional[str] = None, want: Optional[str] = None) -> None:
        self.empty, self.pattern = empty, pattern
        self.want = want or ('a string' if empty else 'a non-empty string')
        self.wants = 'strings' if empty else 'non-empty strings'

    def ok(self, v: Any) -> bool:
        return (isinstance(v, str) and (self.empty or bool(v))
                and (self.pattern is None or re.fullmatch(self.pattern, v) is not None))


class OneOf(Rule):
    """One of ``choices`` (a tuple, or a function returning it where the list lives in another module)."""

    def __init__(self, choices: Union[Sequence[str], Callable[[], Sequence[str]]], ignore_case: bool = False) -> None:
        self._choices, self.ignore_case = choices, ignore_case

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._choices() if callable(self._choices) else self._choices)

    @property
    def want(self) -> str:
        return 'one of ' + ', '.join(repr(c) for c in self.choices)

    def ok(self, v: Any) -> bool:
        if not isinstance(v, str):
            return False
        return (v.lower() in [c.lower() for c in self.choices]) if self.ignore_case else v in self.choices


class Seq(Rule):
    """A list (or tuple) of items that each satisfy ``item``; optionally of a fixed length, not empty, increasing."""

    def __init__(self, item: Rule, length: Optional[int] = None, nonempty: bool = False,
                 increasing: bool = False) -> None:
        self.item, self.length, self.nonempty, self.increasing = item, length, nonempty, increasing
        count = f'{length} ' if length else ''
        order = (', smallest first' if length == 2 else ', increasing') if increasing else ''
        self.want = f"a{' non-empty' if nonempty else ''} list of {count}{item.wants}{order}"
        self.wants = 'lists'

    def ok(self, v: Any) -> bool:
        if not isinstance(v, (list, tuple)):
            return False
        if (self.length is not None and len(v) != self.length) or (self.nonempty and not v):
            return False
        if not all(self.item.ok(x) for x in v):
            return False
        return not self.increasing or all(a <= b if self.length == 2 else a < b for a, b in zip(v, v[1:]))


class Maybe(Rule):
    """``None`` (the key's "off" value), or a value that satisfies ``rule``."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.want, self.wants = f'None or {rule.want}', f'None or {rule.wants}'

    def ok(self, v: Any) -> bool:
        return v is None or self.rule.ok(v)


class Check(Rule):
    """A rule of its own: ``test(value)`` says whether ``value`` is valid."""

    def __init__(self, test: Callable[[Any], bool], want: str) -> None:
        self.test, self.want, self.wants = test, want, want

    def ok(self, v: Any) -> bool:
        return self.test(v)


def _timm_auto_augment(spec: Any) -> bool:
    """Whether timm's ``create_transform`` (which builds our training transform) accepts ``spec``."""
    if not isinstance(spec, str):
        return False
    if spec.lower() in ('', 'none'):
        return True
    from timm.data import create_transform
    try:
        create_transform(input_size=32, is_training=True, auto_augment=spec)
    except Exception:  # noqa: BLE001 - timm signals a bad policy with AssertionError, KeyError or ValueError
        return False
    return True


def _manip_types() -> tuple[str, ...]:
    from models.msg_transformer import MANIP_TYPES
    return MANIP_TYPES


RGB_CHANNELS = 3  # the loader gives every image as 8-bit RGB (data/build.py)
MAX_SEED = 2**63 - 1  # every generator seeded from SEED takes it (torch's take 64 bits, NumPy's SeedSequence no sign)
# Values that pass their own rule but whose cost has no bound: what each costs, and the most that is accepted.
LIMITS = {
    'DATA.IMG_SIZE': (4096, 'pixels a side'),
    'DATA.NUM_WORKERS': (256, 'processes forked per loader'),
    'AUG.RECOUNT': (100, 'random-erasing boxes per image'),
}
MIN_CROP_PCT = 0.25  # evaluation resizes to IMG_SIZE / CROP_PCT: at most 4x the crop
# Interpolations that timm's training transform (RandAugment's affine ops included: Pillow's transform() takes
# only these three) and torchvision's Resize both take; 'random' is timm's, for training (evaluation uses bicubic).
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'random')

_UNIT = Real('[0, 1]')
_UNIT_OPEN = Real('[0, 1)')
_POSITIVE = Real('(0, inf)')
_NON_NEGATIVE = Real('[0, inf)')
_STAGES_POSITIVE = Seq(Int(1), nonempty=True)
_RGB = Check(lambda v: _is_int(v) and v == RGB_CHANNELS, f'{RGB_CHANNELS} (the loader gives RGB images)')

RULES: dict[str, Rule] = {
    'BASE': Seq(Text()),
    'DATA.BATCH_SIZE': Int(1),
    'DATA.DATA_PATH': Text(),
    'DATA.DATASET': Check(lambda v: v == 'imagenet', "'imagenet' (class folders in the ImageNet layout)"),
    'DATA.IMG_SIZE': Int(1),
    'DATA.INTERPOLATION': OneOf(INTERPOLATIONS),
    'DATA.PIN_MEMORY': Flag(),
    'DATA.NUM_WORKERS': Int(0),
    'DATA.SKIP_CORRUPT': Flag(),
    'DATA.CHECK_OVERLAP': Flag(),
    'DATA.MEAN': Seq(_UNIT, length=RGB_CHANNELS),
    'DATA.STD': Seq(_POSITIVE, length=RGB_CHANNELS),
    'DATA.ZIP_MODE': Flag(),
    'DATA.CACHE_MODE': OneOf(('no', 'full', 'part')),
    'DATA.FAST_DECODE': Flag(),

    'MODEL.TYPE': Text(empty=False),          # the registry names the known types when it builds (models/build.py)
    'MODEL.NAME': Text(empty=False),
    'MODEL.PRETRAINED': Text(),
    'MODEL.RESUME': Text(),
    'MODEL.NUM_CLASSES': Int(1),
    'MODEL.DROP_RATE': _UNIT_OPEN,
    'MODEL.DROP_PATH_RATE': _UNIT_OPEN,
    'MODEL.LABEL_SMOOTHING': _UNIT_OPEN,
    'MODEL.FUSED_ATTN': Flag(),
    # Per-stage lists and the geometry (lengths, heads dividing channels, valid sizes) are checked by the model
    # itself when it is built, with the valid values in the message; here only what any model needs.
    'MODEL.MSG.PATCH_SIZE': Int(1),
    'MODEL.MSG.IN_CHANS': _RGB,
    'MODEL.MSG.EMBED_DIM': Int(1),
    'MODEL.MSG.DEPTHS': _STAGES_POSITIVE,
    'MODEL.MSG.NUM_HEADS': _STAGES_POSITIVE,
    'MODEL.MSG.WINDOW_SIZE': Int(1),
    'MODEL.MSG.MLP_RATIO': _POSITIVE,
    'MODEL.MSG.QKV_BIAS': Flag(),
    'MODEL.MSG.QK_SCALE': Maybe(_POSITIVE),
    'MODEL.MSG.APE': Flag(),
    'MODEL.MSG.PATCH_NORM': Flag(),
    'MODEL.MSG.SHUF_SIZE': _STAGES_POSITIVE,
    'MODEL.MSG.MANIP_TYPE': OneOf(_manip_types),
    'MODEL.MSG.DECAY_MSG_TOKENS': Flag(),
    'MODEL.MGSSAF.PATCH_SIZE': Int(1),
    'MODEL.MGSSAF.IN_CHANS': _RGB,
    'MODEL.MGSSAF.EMBED_DIM': Int(1),
    'MODEL.MGSSAF.DEPTHS': _STAGES_POSITIVE,
    'MODEL.MGSSAF.NUM_HEADS': _STAGES_POSITIVE,
    'MODEL.MGSSAF.GLOBAL_RATIO': Seq(_UNIT, nonempty=True),
    'MODEL.MGSSAF.WIDTH': Seq(Int(0), nonempty=True),
    'MODEL.MGSSAF.WINDOW_SIZE': Int(1),
    'MODEL.MGSSAF.MLP_RATIO': _POSITIVE,
    'MODEL.MGSSAF.QKV_BIAS': Flag(),
    'MODEL.MGSSAF.HEAD_HIDDEN_DIM': Int(1),

    'TRAIN.START_EPOCH': Int(0),
    'TRAIN.EPOCHS': Int(1),
    'TRAIN.WARMUP_EPOCHS': Int(0),
    'TRAIN.WEIGHT_DECAY': _NON_NEGATIVE,
    'TRAIN.BASE_LR': _POSITIVE,
    'TRAIN.WARMUP_LR': _NON_NEGATIVE,
    'TRAIN.MIN_LR': _NON_NEGATIVE,
    'TRAIN.LR_SCALE_BATCH': Int(1),
    'TRAIN.CLIP_GRAD': Maybe(_NON_NEGATIVE),
    'TRAIN.AUTO_RESUME': Flag(),
    'TRAIN.ACCUMULATION_STEPS': Int(1),
    'TRAIN.USE_CHECKPOINT': Flag(),
    'TRAIN.COMPILE': Flag(),
    'TRAIN.KEEP_CHECKPOINTS': Int(0),
    'TRAIN.MAX_NONFINITE_STEPS': Int(1),
    'TRAIN.TF32': Flag(),
    'TRAIN.LR_SCHEDULER.NAME': OneOf(SCHEDULERS, ignore_case=True),
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': Int(1),
    'TRAIN.LR_SCHEDULER.DECAY_RATE': Real('(0, 1]'),
    'TRAIN.LR_SCHEDULER.WARMUP_PREFIX': Flag(),
    'TRAIN.LR_SCHEDULER.T_IN_BATCHES': Flag(),
    'TRAIN.LR_SCHEDULER.GAMMA': Real('(0, 1]'),
    'TRAIN.LR_SCHEDULER.MULTISTEPS': Seq(_POSITIVE, increasing=True),
    'TRAIN.OPTIMIZER.NAME': OneOf(OPTIMIZERS, ignore_case=True),
    'TRAIN.OPTIMIZER.EPS': _POSITIVE,
    'TRAIN.OPTIMIZER.BETAS': Seq(_UNIT_OPEN, length=2),
    'TRAIN.OPTIMIZER.MOMENTUM': _UNIT_OPEN,
    'TRAIN.EMA.ENABLE': Flag(),
    'TRAIN.EMA.DECAY': _UNIT_OPEN,

    'AUG.COLOR_JITTER': _NON_NEGATIVE,
    'AUG.HFLIP': _UNIT,
    'AUG.SCALE': Seq(Real('(0, 1]'), length=2, increasing=True),
    'AUG.AUTO_AUGMENT': Check(_timm_auto_augment, "'none' or a timm policy such as 'rand-m9-mstd0.5-inc1', "
                                                  "'augmix-m5', 'original', 'v0', '3a'"),
    'AUG.REPROB': _UNIT,
    'AUG.REMODE': OneOf(('const', 'rand', 'pixel')),
    'AUG.RECOUNT': Int(1),
    'AUG.MIXUP': _NON_NEGATIVE,
    'AUG.CUTMIX': _NON_NEGATIVE,
    'AUG.CUTMIX_MINMAX': Maybe(Seq(Real('(0, 1]'), length=2, increasing=True)),
    'AUG.MIXUP_PROB': _UNIT,
    'AUG.MIXUP_SWITCH_PROB': _UNIT,
    'AUG.MIXUP_MODE': OneOf(('batch', 'pair', 'elem')),

    'TEST.CROP': Flag(),
    'TEST.CROP_PCT': Real('(0, 1]'),
    'TEST.SEQUENTIAL': Flag(),

    'AMP_ENABLE': Flag(),
    'AMP_DTYPE': OneOf(('float16', 'bfloat16')),
    'AMP_OPT_LEVEL': OneOf(('', 'O0', 'O1', 'O2')),
    'DEVICE': Text(pattern=r'(cpu|cuda(:\d+)?)?', want="'' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'"),
    'OUTPUT': Text(),
    'TAG': Text(empty=False),
    'SAVE_FREQ': Int(1),
    'PRINT_FREQ': Int(1),
    'SEED': Int(0, MAX_SEED),
    'EVAL_MODE': Flag(),
    'THROUGHPUT_MODE': Flag(),
    'LOCAL_RANK': Int(0),
    'FUSED_WINDOW_PROCESS': Flag(),
    'FUSED_LAYERNORM': Flag(),
}


def uses_mixup(config: CN) -> bool:
    """Whether training mixes images (timm ``Mixup``/CutMix): it pairs images, so it needs an even batch."""
    aug = config.AUG
    return aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None


def _inside_output(name: str) -> bool:
    """Whether ``name`` joined below a folder stays inside it: relative, no '..', '.' or empty part, no NUL."""
    parts = name.replace('\\', '/').split('/')
    return not os.path.isabs(name) and '\x00' not in name and all(p not in ('', '.', '..') for p in parts)


def _relations(config: CN) -> Iterable[str]:
    """Rules between keys, and bounds on what values cost (each key on its own is valid by now)."""
    for key, flag in (('MODEL.NAME', ''), ('TAG', ' (--tag)')):
        value = _key_value(config, key)
        if not _inside_output(value):
            yield (f'{key}{flag} names the folder <OUTPUT>/<MODEL.NAME>/<TAG> and must stay inside OUTPUT (no '
                   f"absolute path, no '..'), got {shown(value)}")
    for key, (most, what) in LIMITS.items():
        value = _key_value(config, key)
        if value > most:
            yield f'{key}{_flag_of(key)} must be at most {most} ({what}), got {value}'
    if config.TEST.CROP_PCT < MIN_CROP_PCT:
        side = int(math.floor(config.DATA.IMG_SIZE / config.TEST.CROP_PCT))
        yield (f'TEST.CROP_PCT must be at least {MIN_CROP_PCT} (evaluation resizes images to IMG_SIZE / CROP_PCT = '
               f'{side} pixels), got {config.TEST.CROP_PCT}')
    t = config.TRAIN
    if t.START_EPOCH >= t.EPOCHS:
        yield f'TRAIN.START_EPOCH must be below TRAIN.EPOCHS ({t.EPOCHS}), got {t.START_EPOCH}'
    if t.LR_SCHEDULER.NAME.lower() == 'multistep' and not t.LR_SCHEDULER.MULTISTEPS:
        yield "TRAIN.LR_SCHEDULER.MULTISTEPS must list the epochs to decay at when NAME is 'multistep'"
    training = not (config.EVAL_MODE or config.THROUGHPUT_MODE)
    if training and uses_mixup(config) and config.DATA.BATCH_SIZE % 2:
        yield (f'DATA.BATCH_SIZE{_flag_of("DATA.BATCH_SIZE")} must be even with mixup/cutmix, got '
               f'{config.DATA.BATCH_SIZE} (or turn them off: --opts AUG.MIXUP 0.0 AUG.CUTMIX 0.0)')


def _key_value(config: CN, key: str) -> Any:
    node = config
    for part in key.split('.'):
        node = node[part]
    return node


def _flag_of(key: str) -> str:
    flags = [f"--{dest.replace('_', '-')}" for dest, k in FLAG_KEYS.items() if k == key]
    return f' ({flags[0]})' if flags else ''


def _leaves(node: CN, prefix: str = '') -> Iterable[tuple[str, Any]]:
    for k, v in node.items():
        if isinstance(v, CN):
            yield from _leaves(v, f'{prefix}{k}.')
        else:
            yield f'{prefix}{k}', v


def validate_config(config: CN) -> None:
    """Raise one ConfigError naming every key whose value is out of range, not a valid choice or of the wrong
    length, so a bad value fails at start instead of after an epoch of training."""
    problems = []
    for key, value in _leaves(config):
        rule = RULES.get(key)  # every key has one (tests/test_config.py::test_every_key_has_a_rule)
        if rule is not None and not rule.ok(value):
            as_given = list(value) if isinstance(value, tuple) else value  # as the YAML or --opts wrote it
            problems.append(f'{key}{_flag_of(key)} must be {rule.want}, got {shown(as_given)}')
    if not problems:
        problems.extend(_relations(config))
    if problems:
        raise ConfigError('; '.join(problems))
