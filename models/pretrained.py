"""timm glue shared by both backbones: pretrained configs, creation through timm, fitting weights to a model.

* ``pretrained_cfg`` -- one entry of a module's ``default_cfgs`` (``timm.models.generate_default_cfgs``): input
  geometry, the evaluation transform of ``main.py``, the first conv and classifier names, license and paper.
  No download location is registered (none is known for the released files): ``pretrained=True`` needs
  ``pretrained_cfg_overlay=dict(file=...)`` and says so otherwise; nothing is ever downloaded.
* ``create`` -- what a registered ``timm.create_model`` entry point calls: ``timm.models.build_model_with_cfg``
  with ``checkpoint_filter_fn`` for pretrained files and ``FeatureGetterNet`` (``forward_intermediates``) for
  ``features_only=True``; timm's ``device`` / ``dtype`` arguments build the model where it will live.
* ``checkpoint_filter_fn`` / ``fit_state_dict`` -- official (or our) weights to a model of maybe another window:
  the model's own key map (``adapt_state_dict``: MG-SSAF's renames, 1x1 convs, unused norms), recomputed
  buffers taken from the model, relative-position tables resized bicubically. ``checkpoint.load_pretrained``
  (``--pretrained``) fits weights with the same ``fit_state_dict``.
"""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

try:
    from timm.models._input import update_model_input_size  # records set_input_size for resolve_data_config
except ImportError:  # pragma: no cover - timm without model traits
    def update_model_input_size(model: nn.Module, img_size: Any, **model_args: Any) -> None:
        pass

__all__ = ['pretrained_cfg', 'create', 'checkpoint_filter_fn', 'fit_state_dict', 'resize_rel_pos_table',
           'update_model_input_size']

# The evaluation transform of main.py (data/build.py with config.py's TEST.CROP_PCT, DATA.INTERPOLATION,
# DATA.MEAN / DATA.STD): resize the short side to floor(size / crop_pct), centre crop, bicubic, ImageNet
# statistics. tests/test_timm.py checks that timm's resolve_data_config gives the same transform.
EVAL_CROP_PCT = 0.875
EVAL_INTERPOLATION = 'bicubic'
TRAIN_SIZE = 224  # the released models' input side


def pretrained_cfg(
        *,
        size_multiple: int,
        pool_size: tuple[int, int],
        first_conv: str,
        license: str,
        origin_url: str,
        paper_name: str,
        weights: str,
        paper_ids: Optional[str] = None,
) -> dict[str, Any]:
    """A ``default_cfgs`` entry for a variant trained at ``TRAIN_SIZE``.

    Args:
        size_multiple: every input side must be a multiple of it (the model's geometry; 1: any size): timm's
            ``min_input_size``; the input size is not fixed (``fixed_input_size=False``).
        pool_size: the spatial size of ``forward_features`` at ``TRAIN_SIZE``.
        first_conv: name of the stem conv (timm adapts it to other ``in_chans``).
        weights: where the released weights are, for ``notes`` (no ``url`` / ``hf_hub_id``: nothing downloads).
    """
    return dict(
        url='',
        num_classes=1000,
        input_size=(3, TRAIN_SIZE, TRAIN_SIZE),
        min_input_size=(3, size_multiple, size_multiple),
        fixed_input_size=False,
        pool_size=pool_size,
        crop_pct=EVAL_CROP_PCT,
        interpolation=EVAL_INTERPOLATION,
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv=first_conv,
        classifier='head',
        license=license,
        origin_url=origin_url,
        paper_name=paper_name,
        paper_ids=paper_ids,
        notes=(f'weights: {weights}', _LOAD_A_FILE),
    )


_LOAD_A_FILE = "no download location is registered: load a file with pretrained_cfg_overlay=dict(file='<path>')"


def _construct(cls: Callable[..., nn.Module], device: Any = None, dtype: Optional[torch.dtype] = None,
               **kwargs: Any) -> nn.Module:
    """``cls(**kwargs)`` with every parameter and buffer created on ``device`` (timm's ``create_model(device=)``;
    e.g. 'meta' builds shapes without memory), then cast to ``dtype``. Unknown kwargs raise ``TypeError``."""
    with torch.device(device) if device is not None else nullcontext():
        model = cls(**kwargs)
    return model if dtype is None else model.to(dtype)


def _check_weights_source(variant: str, pretrained_cfg: Any) -> None:
    """Raise a clear error for ``pretrained=True`` without a file (timm would say 'no pretrained weights exist'
    or fail on a missing path with an empty message)."""
    path = pretrained_cfg.file
    if not (path or pretrained_cfg.url or pretrained_cfg.hf_hub_id or pretrained_cfg.state_dict):
        weights = next((n for n in pretrained_cfg.notes or () if n.startswith('weights: ')), 'weights: unknown')
        raise ValueError(f'{variant}: no pretrained weights are downloaded; {_LOAD_A_FILE} ({weights})')
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{variant}: pretrained file not found: '{path}'")
    kind = _not_weights(path) if path else None
    if kind:
        raise ValueError(f"{variant}: pretrained file '{path}' is {kind}, not a weights file; pass the .pth or "
                         f".safetensors file")


def _not_weights(path: str) -> Optional[str]:
    """What ``path`` is when its first bytes show it is no weights file timm reads (PyTorch zip or pickle,
    safetensors), e.g. 'a text file (a YAML config?)'; None when it may be one."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':  # PyTorch's zip format, or its legacy pickle
        return None
    if len(head) >= 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') > 0:  # safetensors header
        return None
    try:
        head.decode('utf-8')
    except UnicodeDecodeError:
        return 'in an unknown format'
    return 'an empty file' if not head else 'a text file (a YAML config?)'


# Rates a module draws probabilities from: outside [0, 1) they fail only in the first training step.
_RATE_KWARGS = ('drop_rate', 'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate')


def _check_rates(variant: str, kwargs: dict) -> None:
    for name in _RATE_KWARGS:
        value = kwargs.get(name)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and 0.0 <= value < 1.0):
            raise ValueError(f'{variant}: {name} must be a number in [0, 1), got {value!r}')


def create(cls: Callable[..., nn.Module], variant: str, pretrained: bool, num_stages: int, **kwargs: Any) -> nn.Module:
    """Build a registered variant through ``timm.models.build_model_with_cfg``.

    ``kwargs`` are the variant's architecture merged with the caller's (which win) and timm's factory arguments
    (``pretrained_cfg``, ``pretrained_cfg_overlay``, ``cache_dir``, ``features_only``, ``out_indices``,
    ``device``, ``dtype``). ``features_only=True`` wraps the model in timm's ``FeatureGetterNet`` (one map per
    stage, ``out_indices`` of ``range(num_stages)``).
    """
    _check_rates(variant, kwargs)
    if pretrained:
        _check_weights_source(variant, resolve_pretrained_cfg(
            variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')))
    out_indices = kwargs.pop('out_indices', tuple(range(num_stages)))
    return build_model_with_cfg(
        functools.partial(_construct, cls),
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def resize_rel_pos_table(table: torch.Tensor, new_len: int) -> torch.Tensor:
    """Bicubic resize of a (L, nH) relative-position table laid out on a (2W-1)^2 square grid.

    Returns: (new_len, nH). Raises ValueError if either length is not a square.
    """
    old_side, new_side = int(round(table.shape[0] ** 0.5)), int(round(new_len ** 0.5))
    if old_side ** 2 != table.shape[0] or new_side ** 2 != new_len:
        raise ValueError(f'cannot resize a relative-position table of {table.shape[0]} rows to {new_len}')
    grid = table.float().t().reshape(1, -1, old_side, old_side)  # 1, nH, S, S
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    return grid.reshape(-1, new_len).t().to(table.dtype)  # L', nH


def fit_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module,
                   log: Optional[Callable[[str], None]] = None) -> dict[str, torch.Tensor]:
    """Weights saved with another window size, fitted to ``model``: recomputed buffers (``relative_position_index``,
    ``attn_mask``) are taken from the model, relative-position tables are resized bicubically (``log`` says which).
    Every other entry is left as it is (a strict load then names any mismatch). Returns a new dict."""
    own = model.state_dict()
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k not in own or v.shape == own[k].shape:
            continue
        if k.endswith('relative_position_index') or k.endswith('attn_mask'):
            out[k] = own[k]
        elif k.endswith('relative_position_bias_table') and v.dim() == 2 and v.shape[1] == own[k].shape[1]:
            if log is not None:
                log(f'resizing {k} {tuple(v.shape)} -> {tuple(own[k].shape)} (bicubic)')
            out[k] = resize_rel_pos_table(v, own[k].shape[0])
    return out


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's pretrained-weights filter (``load_pretrained`` calls it with the file's state_dict): the model's
    key map for official files (``model.adapt_state_dict``), then ``fit_state_dict``. timm itself then drops a
    classifier of another size and adapts the stem to other ``in_chans``."""
    adapt = getattr(model, 'adapt_state_dict', None)
    if adapt is not None:
        state_dict, _ = adapt(state_dict)
    return fit_state_dict(state_dict, model)
