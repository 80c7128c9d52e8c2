"""Blocks shared by the windowed backbones (MSG-Transformer, MG-SSAF).

Layout: feature maps are NHWC, ``(B, H, W, C)``; windows are ``(B, nW, ws*ws, C)`` with the batch kept as
the leading dimension (so per-sample ops such as ``DropPath`` act per image) and ``nW`` windows in the
order described in :func:`window_partition`. ``reshape(B * nW, ws * ws, C)`` of that tensor is free and
gives Swin's per-window batch.

Abbreviations: B batch, H/W height/width (tokens), C channels, ws window side, nW windows per image,
gs group side (windows per group side), nG groups per image.

MLP, DropPath, trunc_normal_ and to_2tuple come from ``timm.layers`` and are re-exported here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_

__all__ = ['window_partition', 'window_reverse', 'relative_position_index', 'channels_last_weight_', 'size_free',
           'crop', 'ceil_div', 'DropPath', 'Mlp', 'to_2tuple', 'trunc_normal_']


def ceil_div(size: int, k: int) -> int:
    """ceil(size / k) for a positive size, in the form a strided conv's output size takes ((size - 1) // k + 1), which
    symbolic shapes simplify alike."""
    return (size - 1) // k + 1


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.compiler.is_compiling()


def size_free() -> bool:
    """Tracing, compiling or exporting: the graph must then serve every input size, so the models take their padded
    path even where nothing needs padding (a zero pad and an all-True key mask: the same values). A scripted model
    runs Python's control flow on the real sizes."""
    if torch.jit.is_scripting():
        return False
    return torch.jit.is_tracing() or _exporting()


def crop(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``x[:, :H, :W]`` of an NHWC map; tracing or exporting, a gather (the strides of a view would pin the
    exported graph to whether the example input needed padding)."""
    if not size_free():
        return x[:, :H, :W]
    rows, cols = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
    return x.index_select(1, rows).index_select(2, cols)


def window_partition(x: torch.Tensor, window_size: int, group_size: int = 1) -> torch.Tensor:
    """Split an NHWC map into non-overlapping square windows.

    Windows are ordered group by group: the map is first cut into ``gs x gs``-window groups (raster
    order over groups), then windows are listed in raster order inside their group. ``group_size=1``
    gives plain raster order over windows (Swin's order).

    Args:
        x: (B, H, W, C); H and W must be multiples of ``window_size * group_size``.
        window_size: ws, the window side in tokens.
        group_size: gs, the group side in windows.

    Returns:
        (B, nW, ws*ws, C) with nW = H*W / ws**2 and windows [g * gs**2 + i] = window i of group g.
    """
    B, H, W, C = x.shape
    ws, gs = window_size, group_size
    x = x.view(B, H // (gs * ws), gs, ws, W // (gs * ws), gs, ws, C)  # B, nGh, gs, ws, nGw, gs, ws, C
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # B, nGh, nGw, gs, gs, ws, ws, C
    return x.reshape(B, -1, ws * ws, C)  # B, nW, ws*ws, C


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int, group_size: int = 1) -> torch.Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: (B, nW, ws*ws, C) in the order :func:`window_partition` produces.
        window_size: ws, the window side in tokens.
        H, W: size of the map to rebuild, in tokens.
        group_size: gs, the group side in windows.

    Returns:
        (B, H, W, C), contiguous.
    """
    B, _, _, C = windows.shape
    ws, gs = window_size, group_size
    x = windows.view(B, H // (gs * ws), W // (gs * ws), gs, gs, ws, ws, C)  # B, nGh, nGw, gs, gs, ws, ws, C
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # B, nGh, gs, ws, nGw, gs, ws, C
    return x.reshape(B, H, W, C)  # B, H, W, C


def relative_position_index(window_size: int) -> torch.Tensor:
    """Index into a ((2*ws-1)**2, nH) relative-position bias table for every token pair of a window.

    Same values as Swin's ``relative_position_index`` buffer (row-major tokens; the index of the offset
    (dh, dw) is (dh + ws - 1) * (2*ws - 1) + (dw + ws - 1)).

    Returns:
        (ws*ws, ws*ws) int64.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # 2, ws*ws
    rel = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # 2, ws*ws, ws*ws (offsets shifted to >= 0)
    return rel[0] * (2 * window_size - 1) + rel[1]  # ws*ws, ws*ws


def channels_last_weight_(conv: nn.Conv2d) -> nn.Conv2d:
    """Store ``conv``'s weight channels-last, for a conv that runs on channels-last inputs (NHWC maps seen as
    NCHW): otherwise the convolution backends reorder the weight at every call. The conv's weight gradient then
    has the weight's own strides (DDP compares them literally, even the size-1 dim of a depthwise weight). Same
    shape and values, so state_dicts are unchanged (``load_state_dict`` copies into the existing layout)."""
    w = conv.weight.data
    conv.weight.data = torch.empty_like(w, memory_format=torch.channels_last).copy_(w)  # canonical strides
    return conv
