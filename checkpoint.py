"""Checkpoint I/O: safe reading, atomic writing, finding the newest, loading weights into a model.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) so ``torch.load(..., weights_only=True)``
reads ours with no allow-list; the config travels as YAML text. Official Swin-style training checkpoints pickle
a yacs ``CfgNode``: that one class, and nothing else, is allowed when reading them. Writes are atomic
(temporary file, fsync, rename), so a crash while saving never leaves a half-written newest checkpoint.
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import re
from typing import Optional

import torch
import torch.nn as nn
from yacs.config import CfgNode

from models.pretrained import fit_state_dict  # shared with timm's checkpoint_filter_fn

CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r'^ckpt_epoch_(\d+)\.pth$')


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, untrusted or does not fit the model (user-facing, one line)."""


class _WeightsOnlyPlusCfgNode(pickle.Unpickler):
    """PyTorch's own ``weights_only`` allow-list plus yacs' ``CfgNode``, as a restricted ``find_class``.

    ``torch.load(weights_only=True)`` cannot rebuild a CfgNode even when it is allowed (it only fills plain
    dicts), and official Swin-style training checkpoints pickle one. This reader resolves exactly the globals
    that ``weights_only`` resolves, and CfgNode; any other global is refused before it can be called."""

    def find_class(self, module: str, name: str):
        from torch._weights_only_unpickler import _get_allowed_globals
        key = f"{'builtins' if module == '__builtin__' else module}.{name}"
        allowed = _get_allowed_globals()
        if key == 'yacs.config.CfgNode':
            return CfgNode
        if key in allowed:
            return allowed[key]
        raise pickle.UnpicklingError(f'Unsupported global: GLOBAL {key}')


class _restricted_pickle:  # noqa: N801 - stands in for the ``pickle`` module in torch.load
    Unpickler = _WeightsOnlyPlusCfgNode
    __name__ = 'restricted_pickle'

    @staticmethod
    def load(f, **kwargs):
        return _WeightsOnlyPlusCfgNode(f, **kwargs).load()


def load_checkpoint_file(path: str) -> dict:
    """Read a checkpoint safely: ``torch.load(weights_only=True)``; for official checkpoints that pickle a yacs
    ``CfgNode``, the same allow-list plus that one class. Anything else in the pickle is refused unexecuted."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: '{path}'")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file is empty: '{path}'")
    try:
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError as e:
            if 'CfgNode' not in str(e):
                raise
            ckpt = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_restricted_pickle)
    except pickle.UnpicklingError as e:
        found = re.search(r'[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)', str(e))
        if found:
            raise CheckpointError(f"refusing to load '{path}': it pickles {found.group(1)}, which could run code; "
                                  f"only tensors, plain data and yacs CfgNode are accepted") from None
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (wrong file, or truncated?)") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"'{path}' holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def extract_state_dict(ckpt: dict, path: str = '') -> dict[str, torch.Tensor]:
    """The model weights in a checkpoint: ``ckpt['model']`` (Swin/official style), ``ckpt['state_dict']`` or the
    dict itself when it maps names to tensors. A ``module.`` (DDP) or ``_orig_mod.`` (compile) prefix is removed."""
    for key in ('model', 'state_dict', 'model_state_dict'):
        if key in ckpt and isinstance(ckpt[key], dict):
            sd = ckpt[key]
            break
    else:
        sd = ckpt
    if not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"'{path}' has no model weights (expected a 'model' entry of tensors)")
    out = {}
    for k, v in sd.items():
        for prefix in ('module.', '_orig_mod.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _fmt_keys(keys: list[str], limit: int = 5) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def adapt_state_dict(model: nn.Module, sd: dict[str, torch.Tensor],
                     logger: Optional[logging.Logger] = None) -> dict[str, torch.Tensor]:
    """Let the model translate a foreign layout (e.g. official MG-SSAF keys); log what it drops."""
    adapt = getattr(model, 'adapt_state_dict', None)
    if adapt is None:
        return sd
    sd, dropped = adapt(sd)
    if dropped and logger is not None:
        logger.info(f'checkpoint: dropped {len(dropped)} parameters the official forward never uses '
                    f'({_fmt_keys(sorted(dropped), 3)})')
    return sd


def load_model_weights(model: nn.Module, sd: dict[str, torch.Tensor], path: str = '',
                       logger: Optional[logging.Logger] = None) -> None:
    """Strict load with a readable error: names a few missing, unexpected and mis-shaped keys."""
    sd = adapt_state_dict(model, sd, logger)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f'{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}'
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f'shape mismatch: {_fmt_keys(mismatched, 3)}')
        if missing:
            parts.append(f'missing: {_fmt_keys(missing)}')
        if unexpected:
            parts.append(f'unexpected: {_fmt_keys(unexpected)}')
        raise CheckpointError(f"'{path}' does not fit this model ({type(model).__name__}; another architecture, "
                              f"variant or class count?): " + '; '.join(parts))
    model.load_state_dict(sd, strict=True)


def load_pretrained(model: nn.Module, path: str, logger: logging.Logger) -> None:
    """Weights for fine-tuning: a head of another size is re-initialised, relative-position tables are resized
    bicubically when the window differs (``models.pretrained.fit_state_dict``, as timm's pretrained loading does);
    everything else must match exactly."""
    ckpt = load_checkpoint_file(path)
    sd = adapt_state_dict(model, extract_state_dict(ckpt, path), logger)
    try:
        sd = fit_state_dict(sd, model, log=lambda msg: logger.info(f'pretrained: {msg}'))
    except ValueError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    own = model.state_dict()
    for k in list(sd):
        if k.startswith('head.') and k in own and sd[k].shape != own[k].shape:
            logger.info(f'pretrained: re-initialising {k} ({tuple(sd[k].shape)} in file, {tuple(own[k].shape)} in model)')
            sd[k] = own[k]
    load_model_weights(model, sd, path)
    logger.info(f"pretrained: loaded weights from '{path}'")


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` atomically: a partial write never replaces or impersonates a complete checkpoint."""
    tmp = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_checkpoints(output_dir: str) -> list[str]:
    """``ckpt_epoch_N.pth`` files in ``output_dir``, oldest first (by N)."""
    found = []
    for p in glob.glob(os.path.join(output_dir, 'ckpt_epoch_*.pth')):
        m = _CKPT_RE.match(os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: str, logger: logging.Logger) -> Optional[tuple[str, dict]]:
    """Newest checkpoint in ``output_dir`` that reads back whole (``last.pth`` or ``ckpt_epoch_*.pth``), with its
    contents; a corrupt newest file is skipped with a warning and the previous one taken."""
    for stale in glob.glob(os.path.join(output_dir, '*.pth.tmp.*')):  # left by a process killed while saving
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass
    candidates = list_checkpoints(output_dir)
    last = os.path.join(output_dir, 'last.pth')
    if os.path.isfile(last):
        candidates.append(last)
    candidates.sort(key=os.path.getmtime)
    for p in reversed(candidates):
        try:
            ckpt = load_checkpoint_file(p)
        except CheckpointError as e:
            logger.warning(f'auto-resume: skipping unreadable checkpoint: {e}')
            continue
        if 'model' in ckpt and 'epoch' in ckpt:
            return p, ckpt
        logger.warning(f"auto-resume: '{p}' is not a training checkpoint, skipping it")
    return None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` epoch checkpoints (``best.pth``/``last.pth`` are never touched)."""
    if keep <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep]:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
