"""Distributed helpers and checkpoint I/O.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) so ``torch.load(..., weights_only=True)``
reads ours with no allow-list; the config travels as YAML text. Official Swin-style training checkpoints pickle
a yacs ``CfgNode``: that one class, and nothing else, is allowed when reading them. Writes are atomic
(temporary file, fsync, rename), so a crash while saving never leaves a half-written newest checkpoint.
"""
from __future__ import annotations

import datetime
import glob
import logging
import os
import pickle
import random
import re
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode

from config import ConfigError

CHECKPOINT_VERSION = 1
_CKPT_RE = re.compile(r'^ckpt_epoch_(\d+)\.pth$')


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, untrusted or does not fit the model (user-facing, one line)."""


# -----------------------------------------------------------------------------
# Distributed
# -----------------------------------------------------------------------------
def init_distributed(device: torch.device, timeout_s: int = 600) -> tuple[int, int]:
    """Join the process group started by torchrun / torch.distributed.launch, if any; returns (rank, world)."""
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if world == 1 and 'MASTER_ADDR' not in os.environ:
        return 0, 1
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == 'cuda':
        kwargs['device_id'] = device
    dist.init_process_group(**kwargs)
    return dist.get_rank(), dist.get_world_size()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op on one process) and return it."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """'' picks CUDA (this process's LOCAL_RANK GPU) when available, else CPU."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if not name:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory it frees instead of handing it back to the OS (for CPU runs).

    By default glibc serves large blocks with mmap and trims the heap top, so tensors of the same sizes, freed and
    allocated again every step, are paged in afresh each time: on this 2-core CPU ~17k minor page faults per MSG-T
    inference batch and ~36k per MG-SSAF-T batch, 9-21% of their time (the official MG-SSAF: ~220k). Heap only,
    no trimming below 2 GB free: the process keeps its peak footprint (the peak itself does not change). The
    same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. Forked DataLoader
    workers inherit it. Returns False where the C library is not glibc (nothing changes there).
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl and macOS have other mallopt semantics)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif hasattr(model, 'module') and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


# -----------------------------------------------------------------------------
# Checkpoint I/O
# -----------------------------------------------------------------------------
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


def _resize_rel_pos_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Bicubic resize of a (L, nH) relative-position table laid out on a (2W-1)^2 square grid."""
    old_side, new_side = int(round(table.shape[0] ** 0.5)), int(round(new_len ** 0.5))
    if old_side ** 2 != table.shape[0] or new_side ** 2 != new_len:
        raise CheckpointError(f'cannot resize a relative-position table of {table.shape[0]} rows to {new_len}')
    grid = table.float().t().reshape(1, -1, old_side, old_side)  # 1, nH, S, S
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.reshape(-1, new_len).t().to(table.dtype)  # L', nH


def load_pretrained(model: nn.Module, path: str, logger: logging.Logger) -> None:
    """Weights for fine-tuning: a head of another size is re-initialised, relative-position tables are resized
    bicubically when the window differs; everything else must match exactly."""
    ckpt = load_checkpoint_file(path)
    sd = adapt_state_dict(model, extract_state_dict(ckpt, path), logger)
    own = model.state_dict()
    for k in list(sd):
        if k not in own or sd[k].shape == own[k].shape:
            continue
        if k.endswith('relative_position_index') or k.endswith('attn_mask'):
            sd[k] = own[k]  # recomputed buffers: take the model's own
        elif k.endswith('relative_position_bias_table') and sd[k].dim() == 2 and sd[k].shape[1] == own[k].shape[1]:
            logger.info(f'pretrained: resizing {k} {tuple(sd[k].shape)} -> {tuple(own[k].shape)} (bicubic)')
            sd[k] = _resize_rel_pos_table(sd[k], own[k].shape[0])
        elif k.startswith('head.'):
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


_compile_warned = False


def compile_model(model: torch.nn.Module, logger: logging.Logger) -> torch.nn.Module:
    """``torch.compile(model)`` with inductor, never fatal: a graph inductor cannot compile (no C++ compiler, an
    unsupported op, ...) runs eagerly, with one warning per process; dynamo's own failures likewise run eagerly."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True

    def backend(gm, example_inputs):
        global _compile_warned
        from torch._inductor.compile_fx import compile_fx
        try:
            return compile_fx(gm, example_inputs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: this graph runs eagerly
            if not _compile_warned:
                _compile_warned = True
                first_line = str(e).splitlines()[0] if str(e) else ''
                logger.warning(f'torch.compile failed ({type(e).__name__}: {first_line}); running those graphs eagerly')
            return gm.forward

    try:
        compiled = torch.compile(model, backend=backend)
    except Exception as e:  # noqa: BLE001 - compile set-up failure (e.g. an unsupported Python): eager
        logger.warning(f'torch.compile unavailable ({type(e).__name__}: {e}); running eagerly')
        return model
    logger.info('torch.compile enabled (graphs that fail to compile run eagerly)')
    return compiled
