"""Checkpoint I/O: safe reading, atomic writing, finding the newest, loading weights into a model.

Checkpoints are plain data (tensors, numbers, strings, lists, dicts) so ``torch.load(..., weights_only=True)``
reads ours with no allow-list; the config travels as YAML text. Official Swin-style training checkpoints pickle
a yacs ``CfgNode``: that one class, and nothing else, is allowed when reading them. Writes are atomic
(temporary file, fsync, rename), so a crash while saving never leaves a half-written newest checkpoint. An epoch's
checkpoint records the writes that belong with it (``best.pth``, its metrics row), which a rerun completes
(``complete_epoch_writes``); a checkpoint's class names are compared with the data's (``check_class_names``).
"""
from __future__ import annotations

import glob
import logging
import os
import pickle
import re
import shutil
import unicodedata
from typing import Optional

import torch
import torch.nn as nn
from yacs.config import CfgNode

from models.pretrained import fit_state_dict  # shared with timm's checkpoint_filter_fn
from output_folder import append_metrics, has_metrics_row

CHECKPOINT_VERSION = 2  # 2: epoch = last completed epoch (official meaning); version 1 stored the next one
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
    if path and os.path.isdir(path):
        inside = list_checkpoints(path) + [p for p in (os.path.join(path, n) for n in ('last.pth', 'best.pth'))
                                           if os.path.isfile(p)]
        newest = max(inside, key=os.path.getmtime) if inside else None
        hint = f"; pass a file in it, e.g. '{newest}'" if newest else '; pass a checkpoint file (.pth)'
        raise CheckpointError(f"'{path}' is a folder, not a checkpoint file{hint}")
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


class _RecordingFile:
    """A file whose write errors are kept: torch.save turns them into an opaque 'enforce fail ... unexpected pos'."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` atomically: a partial write never replaces or impersonates a complete checkpoint. A failed
    write (full disk, quota, I/O error) raises one ``CheckpointError`` naming the cause; the previous file stays."""
    tmp = f'{path}.tmp.{os.getpid()}'
    out = None
    try:
        with open(tmp, 'wb') as f:
            out = _RecordingFile(f)
            torch.save(state, out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = out.error if out is not None and out.error is not None else e
        if isinstance(cause, FileNotFoundError) and not os.path.exists(tmp):
            raise CheckpointError(f"could not write '{path}': its temporary file '{tmp}' was removed while it was "
                                  f"written (by another run in this output folder?)") from None
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause).splitlines()[0]
        # Nothing was replaced (the write is atomic): say so when there is a previous checkpoint to rerun from.
        kept = ' (the previous checkpoint is kept)' if glob.glob(os.path.join(os.path.dirname(path) or '.', '*.pth')) else ''
        raise CheckpointError(f"could not write '{path}': {reason}{kept}") from None
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


def training_position(ckpt: dict) -> tuple[int, int]:
    """(epochs completed, batches done in the next epoch) of a training checkpoint, of any version."""
    epoch = int(ckpt['epoch'])
    return (epoch - 1 if ckpt.get('version') == 1 else epoch), int(ckpt.get('step_in_epoch') or 0)


def find_resume_checkpoint(output_dir: str, logger: logging.Logger) -> Optional[tuple[str, dict]]:
    """The furthest training checkpoint in ``output_dir`` that reads back whole (``last.pth`` or the
    ``ckpt_epoch_*.pth`` of the highest epoch), with its contents. Ordered by what they hold, not by modification
    time (a copy without ``-p`` reorders those); a corrupt file is skipped with a warning and the next one taken.
    Temporary files are left alone: the run that owns the folder removes those of the run it replaced
    (output_folder.py); others may belong to a process still writing them."""
    leftovers = [p for p in glob.glob(os.path.join(glob.escape(output_dir), '*.pth.tmp.*'))
                 if not p.endswith(f'.tmp.{os.getpid()}')]
    if leftovers:
        logger.warning(f"auto-resume: {len(leftovers)} temporary checkpoint files of another process are in the output "
                       f"folder (e.g. '{leftovers[0]}'); not removed: delete them if no other run writes there")

    def readable(path: str) -> Optional[dict]:
        try:
            ckpt = load_checkpoint_file(path)
        except CheckpointError as e:
            logger.warning(f'auto-resume: skipping unreadable checkpoint: {e}')
            return None
        if 'model' in ckpt and isinstance(ckpt.get('epoch'), int):
            return ckpt
        logger.warning(f"auto-resume: '{path}' is not a training checkpoint, skipping it")
        return None

    best = None
    for path in reversed(list_checkpoints(output_dir)):  # highest epoch first
        ckpt = readable(path)
        if ckpt is not None:
            best = (path, ckpt)
            break
    last = os.path.join(output_dir, 'last.pth')
    if os.path.isfile(last):
        ckpt = readable(last)
        if ckpt is not None and (best is None or training_position(ckpt) >= training_position(best[1])):
            best = (last, ckpt)
    return best


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` atomically (temporary file, fsync, rename), ``CheckpointError`` on failure."""
    tmp = f'{dst}.tmp.{os.getpid()}'
    try:
        with open(src, 'rb') as fin, open(tmp, 'wb') as fout:
            shutil.copyfileobj(fin, fout, 16 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        raise CheckpointError(f"could not write '{dst}': {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_epoch(path: str) -> Optional[int]:
    """The ``epoch`` a checkpoint file holds, read without loading its tensors (memory-mapped); None if it cannot
    be read."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file counts as not holding the epoch
        return None
    return ckpt.get('epoch') if isinstance(ckpt, dict) else None


def epoch_end_writes(record: dict, improved: bool) -> dict:
    """What belongs with the checkpoint of an epoch's end: its ``metrics.jsonl`` row and whether it is the best so
    far (then ``best.pth`` is a copy of it). Stored in that checkpoint, so a rerun after a kill between the writes
    completes them (``complete_epoch_writes``)."""
    return {'metrics': record, 'best': bool(improved)}


def complete_epoch_writes(output_dir: str, path: str, ckpt: dict, logger: logging.Logger) -> None:
    """Write what belongs with checkpoint ``path`` (``ckpt``, its contents) and is missing: the metrics row of its
    epoch, and ``best.pth`` when that epoch was the best."""
    pending = ckpt.get('epoch_end')
    if not isinstance(pending, dict):
        return
    record = pending.get('metrics')
    if isinstance(record, dict) and isinstance(record.get('epoch'), int) and not has_metrics_row(output_dir,
                                                                                                  record['epoch']):
        append_metrics(output_dir, record)
        logger.info(f"resume: wrote the metrics row of epoch {record['epoch']}, missing after an interrupted run")
    best = os.path.join(output_dir, 'best.pth')
    if pending.get('best') and os.path.abspath(path) != os.path.abspath(best) \
            and checkpoint_epoch(best) != ckpt.get('epoch'):
        copy_checkpoint(path, best)
        logger.info(f"resume: wrote '{best}' (epoch {ckpt.get('epoch')}), missing after an interrupted run")


def describe_class_change(saved: list[str], names: list[str]) -> Optional[str]:
    """How the class names of the data (``names``, in label order) differ from a checkpoint's (``saved``); None
    when they are the same."""
    saved, names = [str(n) for n in saved], [str(n) for n in names]
    if saved == names:
        return None
    if len(saved) != len(names):
        only_saved = sorted(set(saved) - set(names))[:3]
        only_here = sorted(set(names) - set(saved))[:3]
        return (f'{len(names)} classes here, {len(saved)} in the checkpoint (only in the checkpoint: {only_saved}, '
                f'only here: {only_here})')
    nfc = [unicodedata.normalize('NFC', n) for n in names]
    if nfc == [unicodedata.normalize('NFC', n) for n in saved]:
        i = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
        return (f'the class {names[i]!r} is written in another Unicode form than in the checkpoint ({ascii(names[i])} '
                f'here, {ascii(saved[i])} there; NFC vs NFD, as macOS or some zip tools write names)')
    if sorted(saved) == sorted(names):
        moved = sum(a != b for a, b in zip(saved, names))
        return f'the same classes in another order ({moved} labels moved)'
    i = next(i for i, (a, b) in enumerate(zip(saved, names)) if a != b)
    changed = sum(a != b for a, b in zip(saved, names))
    return f'{changed} of {len(names)} labels name other classes (label {i} is {names[i]!r} here, {saved[i]!r} there)'


def check_class_names(ckpt: dict, names: Optional[list[str]], path: str, allow: bool,
                      logger: Optional[logging.Logger] = None) -> None:
    """Refuse a checkpoint trained on other classes than the data's (one line naming the difference), unless
    ``allow`` (``--allow-class-change``): then a warning. Official checkpoints carry no names: nothing to compare."""
    saved = ckpt.get('class_names')
    if not isinstance(saved, (list, tuple)) or names is None:
        return
    change = describe_class_change(list(saved), list(names))
    if change is None:
        return
    if allow:
        if logger is not None:
            logger.warning(f"--allow-class-change: the data's classes differ from those of '{path}': {change}")
        return
    raise CheckpointError(f"the data's classes differ from those '{path}' was trained on: {change}; every label would "
                          f"mean another class. Check --data-path, or pass --allow-class-change if you mean it")


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` epoch checkpoints (``best.pth``/``last.pth`` are never touched)."""
    if keep <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep]:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


# -----------------------------------------------------------------------------
# Training state: save and restore (ours and official training checkpoints)
# -----------------------------------------------------------------------------
def optimizer_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The parameter names of each param group of ``optimizer``, in its order (saved with our checkpoints, so the
    state can be matched by name whatever the grouping of the run that reads it)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group['params']] for group in optimizer.param_groups]


def official_optimizer_param_names(model: nn.Module, official_sd: dict[str, torch.Tensor],
                                   also_exempt: frozenset = frozenset()) -> list[list[Optional[str]]]:
    """Our names for the parameters of each param group of the official optimizer, in its order.

    The official ``build_optimizer`` makes two groups from ``model.named_parameters()``, [decayed, not decayed],
    not decaying 1-D tensors, biases, the model's ``no_weight_decay()`` names and its keyword matches. Its parameter
    order is the order of the checkpoint's weights without the buffers. Parameters we do not have (MG-SSAF's unused
    attention norms) are ``None``."""
    converted, dropped = (model.adapt_state_dict(official_sd) if hasattr(model, 'adapt_state_dict')
                          else (official_sd, []))
    dropped = set(dropped)
    ours = dict(zip([k for k in official_sd if k not in dropped], converted))
    buffers = {name for name, _ in model.named_buffers()}
    skip = getattr(model, 'official_no_weight_decay', getattr(model, 'no_weight_decay', set))() | also_exempt
    keywords = getattr(model, 'no_weight_decay_keywords', set)()
    decay, no_decay = [], []
    for key, value in official_sd.items():
        name = ours.get(key)
        if name in buffers:
            continue
        exempt = value.dim() <= 1 or key.endswith('.bias') or key in skip or any(k in key for k in keywords)
        (no_decay if exempt else decay).append(name)
    return [decay, no_decay]


def saved_optimizer_param_names(ckpt: dict, model: nn.Module, path: str = '') -> list[list[Optional[str]]]:
    """The parameter names of each param group of ``ckpt['optimizer']``: stored by our version-2 checkpoints;
    for the others, the grouping rule that wrote them, recognised by its group sizes: the official one, or our
    version 1's (which exempted the MSG tokens)."""
    if ckpt.get('optimizer_param_names'):
        return ckpt['optimizer_param_names']
    sd = extract_state_dict(ckpt, path)
    sizes = [len(g['params']) for g in ckpt['optimizer'].get('param_groups', [])]
    rules = [frozenset(), frozenset({'msg_tokens'})]  # official; our version 1
    candidates = [official_optimizer_param_names(model, sd, rule) for rule in rules]
    for names in candidates:
        if [len(n) for n in names] == sizes:
            return names
    return candidates[0]  # load_optimizer_state names the mismatch


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict,
                         saved_names: list[list[Optional[str]]], path: str = '',
                         logger: Optional[logging.Logger] = None) -> None:
    """Load ``saved`` (an optimizer ``state_dict``) into ``optimizer``, matching parameters by name.

    Each parameter's moments go to the parameter of the same name whatever group either run put it in, so a change
    of decay groups (``MODEL.MSG.DECAY_MSG_TOKENS``) or an official file (other grouping, extra parameters, 1x1
    kernels where we have matrices) still restores every moment. The hyper-parameters stay this run's."""
    groups = saved.get('param_groups', [])
    if len(groups) != len(saved_names) or any(len(g['params']) != len(n) for g, n in zip(groups, saved_names)):
        sizes = [len(g['params']) for g in groups]
        raise CheckpointError(f"'{path}': its optimizer state has param groups of {sizes} parameters, but the model "
                              f"gives {[len(n) for n in saved_names]} (another architecture or optimizer?)")
    by_name = {}
    for group, names in zip(groups, saved_names):
        for pid, name in zip(group['params'], names):
            if name is not None and pid in saved['state']:
                by_name[name] = saved['state'][pid]
    params = dict(model.named_parameters())
    current = optimizer.state_dict()
    state = {}
    for group, names in zip(current['param_groups'], optimizer_param_names(optimizer, model)):
        for pid, name in zip(group['params'], names):
            moments = by_name.pop(name, None)
            if moments is None:
                continue
            p = params[name]
            fitted = {}
            for key, value in moments.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    if value.numel() != p.numel():
                        raise CheckpointError(f"'{path}': optimizer state '{key}' of {name} has shape "
                                              f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")
                    value = value.reshape(p.shape)  # e.g. an official 1x1 kernel's moments for our Linear
                fitted[key] = value
            state[pid] = fitted
    optimizer.load_state_dict({'state': state, 'param_groups': current['param_groups']})
    if logger is not None:
        total = sum(len(g['params']) for g in current['param_groups'])
        logger.info(f'resume: optimizer state restored for {len(state)} of {total} parameters'
                    + (f' ({len(by_name)} in the file are not in this model: {_fmt_keys(sorted(by_name), 3)})'
                       if by_name else ''))


def training_checkpoint(*, config, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                        scaler: torch.amp.GradScaler, model_ema: Optional[nn.Module], state,
                        class_names: Optional[list[str]], world_size: int, epoch_end: Optional[dict] = None) -> dict:
    """Everything a rerun needs to continue exactly, as plain data.

    ``epoch`` is the last completed epoch, as in the official checkpoints (so either code base resumes the other's
    files at ``epoch + 1``); a checkpoint written mid-epoch also says how many batches of the next epoch each
    process had done (``step_in_epoch``) and with which batch, process count and accumulation. ``epoch_end``: see
    ``epoch_end_writes``."""
    return {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'optimizer_param_names': optimizer_param_names(optimizer, model),
        'optimizer_type': type(optimizer).__name__,
        'lr_scheduler': scheduler.state_dict(),
        'scaler': scaler.state_dict(),
        'model_ema': model_ema.state_dict() if model_ema is not None else None,
        'epoch': state.epoch - 1,
        'step_in_epoch': state.step_in_epoch,
        'num_updates': state.num_updates,
        'nonfinite_in_row': state.nonfinite_in_row,
        'max_accuracy': state.max_accuracy,
        'batch_size': config.DATA.BATCH_SIZE,
        'world_size': world_size,
        'accumulation_steps': config.TRAIN.ACCUMULATION_STEPS,
        'class_names': list(class_names) if class_names is not None else None,
        'config': config.dump(),
        'epoch_end': epoch_end,  # the writes that belong with this checkpoint (epoch_end_writes)
        'version': CHECKPOINT_VERSION,
    }


def restore_training(ckpt: dict, path: str, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                     scaler: torch.amp.GradScaler, model_ema: Optional[nn.Module], state, batch_size: int,
                     world_size: int, accumulation: int, updates_per_epoch: int, logger: logging.Logger) -> None:
    """Continue from a training checkpoint, ours or one written by the official ``save_checkpoint``: weights,
    optimizer moments (by parameter name), float16 scaler, EMA, best accuracy and the position in training.

    With another batch, process count or accumulation, a run stopped mid-epoch continues at the same place in the
    epoch's sample order (rounded down to a whole update of the new run, so no sample is skipped); the LR schedule
    follows that place (epochs completed plus the fraction of the current one), never the update count."""
    epoch = ckpt.get('epoch')
    if not isinstance(epoch, int):
        raise CheckpointError(f"'{path}' is a weights file, not a training checkpoint (no epoch): use it with "
                              f"--pretrained, or --eval --resume")
    load_model_weights(model, extract_state_dict(ckpt, path), path, logger)
    official = 'version' not in ckpt
    if isinstance(ckpt.get('optimizer'), dict):
        saved_type = ckpt.get('optimizer_type')
        if saved_type and saved_type != type(optimizer).__name__:
            raise CheckpointError(f"'{path}' holds the state of {saved_type}, this run uses "
                                  f"{type(optimizer).__name__}: set TRAIN.OPTIMIZER.NAME as it was, or start with "
                                  f"--pretrained")
        load_optimizer_state(optimizer, model, ckpt['optimizer'], saved_optimizer_param_names(ckpt, model, path),
                             path, logger)
    else:
        logger.warning(f"resume: '{path}' has no optimizer state; the optimizer starts fresh")
    if scaler.is_enabled() and ckpt.get('scaler'):
        scaler.load_state_dict(ckpt['scaler'])
    # Older checkpoints also carry 'cpu_kernels' (CPU kernel choices): a run's business, measured anew (models/cpu).
    if ckpt.get('amp'):
        logger.info("resume: the checkpoint's apex AMP state is not used (native torch.amp)")
    if model_ema is not None:
        if ckpt.get('model_ema') is not None:
            model_ema.load_state_dict(ckpt['model_ema'])
        else:
            model_ema.set(model)
            logger.info('resume: the checkpoint has no EMA; the EMA starts from its weights')
    state.epoch = epoch if ckpt.get('version') == 1 else epoch + 1  # version 1 stored the next epoch
    state.step_in_epoch = int(ckpt.get('step_in_epoch') or 0)
    state.max_accuracy = float(ckpt.get('max_accuracy') or 0.0)
    state.nonfinite_in_row = int(ckpt.get('nonfinite_in_row') or 0)
    if ckpt.get('version') == 1:
        logger.info('resume: a version-1 checkpoint of this code: its LR schedule and MSG-token weight decay '
                    'now follow the official recipe (README, Recipe)')
    saved = (ckpt.get('batch_size'), ckpt.get('world_size'), ckpt.get('accumulation_steps') or accumulation)
    now = (batch_size, world_size, accumulation)
    if not official and saved != now:
        logger.info(f'resume: effective batch changed from {saved[0] * saved[1] * saved[2]} ({saved[0]} x {saved[1]} '
                    f'processes x {saved[2]} accumulation) to {now[0] * now[1] * now[2]} ({now[0]} x {now[1]} x '
                    f'{now[2]}): the LR schedule is placed by epochs and samples done, not by updates')
        if state.step_in_epoch:
            samples = state.step_in_epoch * saved[0] * saved[1]
            per_update = batch_size * world_size * accumulation
            state.step_in_epoch = samples // per_update * accumulation
            logger.info(f'resume: epoch {state.epoch} had {samples} samples done; continuing after '
                        f'{state.step_in_epoch * batch_size * world_size} of them (a whole update of this run)')
    state.num_updates = state.epoch * updates_per_epoch + state.step_in_epoch // accumulation
    where = f'epoch {state.epoch}' + (f' step {state.step_in_epoch}' if state.step_in_epoch else '')
    kind = 'official-format checkpoint' if official else 'checkpoint'
    logger.info(f"resume: {kind} '{path}', continuing at {where} (best top-1 so far {state.max_accuracy:.3f})")
