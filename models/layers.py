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

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_

from . import kernels

__all__ = ['window_partition', 'window_reverse', 'relative_position_index', 'onednn_ok', 'in_dispatch_mode',
           'plain_only', 'msg_rows_only_ok', 'use_sdpa', 'cpu_choice', 'linear',
           'gelu_mlp', 'linear_gelu', 'linear_add', 'channels_last_weight_',
           'DropPath', 'Mlp', 'to_2tuple', 'trunc_normal_']


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
    NCHW): otherwise oneDNN (and cuDNN) reorder the weight at every call; e.g. MSG-T's last downsample conv at
    batch 8 runs in 0.5 instead of 2.1 ms on this CPU. The conv's weight gradient then has the weight's own
    strides (DDP compares them literally, even the size-1 dim of a depthwise weight). Same shape and values, so
    state_dicts are unchanged (``load_state_dict`` copies into the existing layout)."""
    w = conv.weight.data
    conv.weight.data = torch.empty_like(w, memory_format=torch.channels_last).copy_(w)  # canonical strides
    return conv


# GEMMs through oneDNN with the bias fused (and, without autograd, an exact-erf GELU or a residual add): the
# same function as F.linear (+ F.gelu / + residual) with other rounding, faster than addmm on CPU (which first
# copies the bias into the output). CPU float32 only; the backward below is F.linear's.
_DNNL_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


try:
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode as in_dispatch_mode
except ImportError:  # pragma: no cover
    def in_dispatch_mode() -> bool:
        return False
# Under a ``TorchDispatchMode`` (FLOP counter, fake tensors, ...) the model runs its plain, full path: the
# official ops and MACs (``models.cost`` counts the architecture); the oneDNN ops (and MSG-Transformer's
# MSG-only last block) are implementation shortcuts such modes need not know.

# --- scripting / tracing guard (the one place that decides it; ``onednn_ok`` and the models ask it) -------------
try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover - torch < 2.3
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing


def plain_only() -> bool:
    """True where only the plain modules may run: while TorchScript compiles the model (``torch.jit.script``),
    while ``torch.fx`` (timm / torchvision feature extraction) or ``torch.jit.trace`` trace it, and under a
    ``TorchDispatchMode``. The eager shortcuts (oneDNN ops, custom autograd Functions, in-place writes into
    fresh tensors, the MSG-only last block) are neither scriptable nor traceable; the plain path computes the
    same function. The model switches by itself: callers never choose.

    Scriptable: under TorchScript the first branch is a compile-time constant, so the rest is never compiled."""
    if torch.jit.is_scripting():
        return True
    return _fx_tracing() or torch.jit.is_tracing() or in_dispatch_mode()


def msg_rows_only_ok() -> bool:
    """Whether MSG-Transformer's last block may compute its MSG rows only (plain PyTorch ops, exact): wherever the
    shortcuts may run, and also under ``torch.export`` (ONNX), which traces under a dispatch mode; not under the
    FLOP counter (which counts the official full path), scripting or fx tracing."""
    if torch.jit.is_scripting():
        return False
    return not plain_only() or torch.compiler.is_exporting()
# ------------------------------------------------------------------------------------------------------------


def use_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
             dropout_p: float) -> bool:
    """Whether ``softmax(q @ k^T * scale + mask) @ v`` should run as ``F.scaled_dot_product_attention`` (True) or
    as the caller's explicit matmuls and softmax (False, the same function).

    * TorchScript, fx and ``torch.jit.trace``: SDPA (they cannot read the mask's grad flag);
    * ``torch.export`` (ONNX): explicit (the exporter decomposes SDPA into those ops anyway, and with another
      output layout than the fused kernel's, which breaks the view after it);
    * CPU with a mask that needs a gradient: explicit (no CPU kernel fuses that; SDPA would fall back to its
      slower math kernel);
    * CPU float32 eager inference: whichever is faster here for this shape, measured once (``kernels``: the CPU
      flash kernel wins on AVX-512 Xeons, loses on AVX2 EPYCs); everywhere else (GPU, autocast, compile): SDPA.

    Args: q: (..., Nq, d), k / v: (..., N, d), mask: broadcastable to (..., Nq, N) or None."""
    if torch.jit.is_scripting():  # a compile-time constant there: the eager part is a stub
        return True
    return _use_sdpa_eager(q, k, v, mask, scale, dropout_p)


@torch.jit.unused
def _use_sdpa_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
                    dropout_p: float) -> bool:
    if torch.compiler.is_exporting():
        return False
    if plain_only():
        return True
    if mask is not None and mask.requires_grad and mask.device.type == 'cpu':
        return False
    if (q.device.type != 'cpu' or q.dtype != torch.float32 or dropout_p > 0 or torch.is_autocast_enabled('cpu')
            or torch.compiler.is_compiling()):
        return True

    def explicit() -> torch.Tensor:
        attn = (q * scale) @ k.transpose(-2, -1)
        return (attn if mask is None else attn + mask).softmax(dim=-1) @ v
    return kernels.use_fused('attention', (q, k) if mask is None else (q, k, mask),
                             lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), explicit)


@torch.jit.unused
def cpu_choice(op: str, tensors: tuple[torch.Tensor, ...], fast: Callable[[], object],
               plain: Callable[[], object]) -> bool:
    """Whether an op with two exact formulations should run ``fast`` instead of ``plain`` (the official one): in CPU
    float32 eager code, whichever is faster here for this shape (``kernels.use_fused``, measured once); everywhere
    else ``plain``: under autocast, ``torch.compile``, export, FX, ``torch.jit.trace`` and dispatch modes (the FLOP
    counter counts the official products), on other devices and dtypes. Eager only (callers check
    ``torch.jit.is_scripting()`` first)."""
    t = tensors[0]
    if (plain_only() or torch.compiler.is_exporting() or torch.compiler.is_compiling() or t.device.type != 'cpu'
            or t.dtype != torch.float32 or torch.is_autocast_enabled('cpu')):
        return False
    return kernels.use_fused(op, tensors, fast, plain)


def onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CPU float32 without autocast (which F.linear would follow), outside dispatch modes, and eager only:
    under ``torch.compile`` inductor fuses the epilogues itself (and cannot lower this op on live weights); never
    where ``plain_only()`` (scripting, tracing)."""
    if torch.jit.is_scripting():  # a compile-time constant there: the rest is not compiled (it is not scriptable)
        return False
    return (not plain_only() and _DNNL_LINEAR and x.device.type == 'cpu' and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_autocast_enabled('cpu')
            and not torch.compiler.is_compiling())


def _dnnl_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) as oneDNN's linear of ``a`` with the weight ``b^T`` (strided views, no copies here)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, 'none', [], '')


def _use_dnnl_mm(op: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    return kernels.use_fused(op, (a, b), lambda: _dnnl_mm(a, b), lambda: a.mm(b))


def _grad_gemm(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of a linear layer's backward (``op``: 'grad_input', ``grad @ W``, or 'grad_weight', ``grad^T @ x``)
    through oneDNN or ``torch.mm``, whichever is faster on this CPU for this shape (``kernels.use_fused``): where
    PyTorch's ``mm`` runs MKL's sgemm on an AMD EPYC, oneDNN takes half the time for most shapes, and loses for
    some others."""
    return _dnnl_mm(a, b) if _use_dnnl_mm(op, a, b) else a.mm(b)


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with a oneDNN forward; the backward is F.linear's (two GEMMs and a sum, each GEMM through
    ``_grad_gemm``), saving the same."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, 'none', [], '')

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # M, out
        gx = _grad_gemm('grad_input', grad, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        gw = _grad_gemm('grad_weight', grad.t(), x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _dnnl(x: torch.Tensor, fc: nn.Linear, activation: str = 'none') -> torch.Tensor:
    """oneDNN's linear with the bias (and an exact-erf GELU) fused: the private op, used only in this module."""
    return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, activation, [], '' if activation == 'none'
                                              else 'none')


def _dnnl_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + oneDNN linear, the add fused into the GEMM (a fresh tensor)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, fc.weight, fc.bias, 'add')


def _plain(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    return F.linear(x, fc.weight, fc.bias)


def linear(x: torch.Tensor, fc: nn.Linear, onednn: bool) -> torch.Tensor:
    """fc(x); where ``onednn`` (``onednn_ok`` says when it may), oneDNN's fused linear if it is the faster on this
    CPU for this shape (``kernels.use_fused``)."""
    if not onednn or not kernels.use_fused('linear', (x, fc.weight), lambda: _dnnl(x, fc), lambda: _plain(x, fc)):
        return fc(x)
    if torch.is_grad_enabled() and (x.requires_grad or fc.weight.requires_grad
                                    or (fc.bias is not None and fc.bias.requires_grad)):
        return _OneDNNLinear.apply(x, fc.weight, fc.bias)
    return _dnnl(x, fc)


def linear_gelu(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """Exact (erf) GELU of fc(x), fused into the oneDNN GEMM or not, whichever is faster here (no autograd)."""
    if kernels.use_fused('linear_gelu', (x, fc.weight), lambda: _dnnl(x, fc, 'gelu'),
                         lambda: F.gelu(_plain(x, fc))):
        return _dnnl(x, fc, 'gelu')
    return F.gelu(_plain(x, fc))


def linear_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + fc(x), a fresh tensor, the add fused into the oneDNN GEMM or not, whichever is faster here
    (no autograd)."""
    if kernels.use_fused('linear_add', (x, fc.weight), lambda: _dnnl_add(x, fc, residual),
                         lambda: torch.add(residual, _plain(x, fc))):
        return _dnnl_add(x, fc, residual)
    return torch.add(residual, _plain(x, fc))


class _GeluMlp(torch.autograd.Function):
    """``fc2(gelu(fc1(x)))`` (exact GELU) with oneDNN GEMMs, saving ``x`` and ``fc1(x)`` only.

    The usual autograd graph also keeps ``gelu(fc1(x))`` for ``fc2``'s weight gradient and allocates two
    hidden-size gradients in the backward. Here the backward recomputes the GELU (cheap, bit-identical) into one
    buffer, which then takes the gradient of ``fc2``'s input; the GELU gradient overwrites the saved
    pre-activation. Same gradients as the plain modules; per token it keeps C + 4C values instead of C + 4C + 4C
    (a 4x MLP) and allocates one hidden-size buffer in the backward instead of two. Its buffers are consumed: a
    second backward through the same graph (``retain_graph=True``) is an error.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor]) -> torch.Tensor:
        z = torch.ops.mkldnn._linear_pointwise(x, w1, b1, 'none', [], '')  # ..., hidden
        y = torch.ops.mkldnn._linear_pointwise(F.gelu(z), w2, b2, 'none', [], '')  # ..., out
        ctx.save_for_backward(x, z, w1, w2)
        ctx.has_bias = (b1 is not None, b2 is not None)
        ctx.consumed = False
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if ctx.consumed:
            raise RuntimeError('a second backward through a fused MLP (retain_graph=True) is not supported: '
                               'set use_onednn = False on the model\'s blocks for that')
        ctx.consumed = True
        x, z, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # M, out
        z2 = z.view(-1, z.shape[-1])  # M, hidden
        buf = F.gelu(z2)  # M, hidden: fc2's input again
        gw2 = _grad_gemm('grad_weight', g.t(), buf) if need[3] else None
        gb2 = g.sum(0) if ctx.has_bias[1] and need[4] else None
        # The gradient of fc2's input: into the same buffer (torch.mm), or into a new one once it is freed (oneDNN).
        if _use_dnnl_mm('grad_input', g, w2):
            del buf
            buf = _dnnl_mm(g, w2)
        else:
            torch.mm(g, w2, out=buf)
        gz = torch.ops.aten.gelu_backward.grad_input(buf, z2, grad_input=z2)  # into the pre-activation's buffer
        x2 = x.reshape(-1, x.shape[-1])
        gw1 = _grad_gemm('grad_weight', gz.t(), x2) if need[1] else None
        gb1 = gz.sum(0) if ctx.has_bias[0] and need[2] else None
        gx = _grad_gemm('grad_input', gz, w1).view(x.shape) if need[0] else None
        return gx, gw1, gb1, gw2, gb2


def gelu_mlp(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fc2(gelu(fc1(x)))`` (``+ residual`` if given), only where ``onednn_ok``. With autograd the memory-saving
    ``_GeluMlp`` if oneDNN's GEMMs are the faster here, else the plain modules; without autograd the GELU and the
    residual add fused into the GEMMs, each op as fast as this CPU runs it."""
    if torch.is_grad_enabled():
        # Ties go to _GeluMlp: it keeps no GELU output (~10% less peak training memory).
        if kernels.use_fused('mlp', (x, fc1.weight, fc2.weight), lambda: _dnnl(F.gelu(_dnnl(x, fc1)), fc2),
                             lambda: _plain(F.gelu(_plain(x, fc1)), fc2), prefer_fused=True):
            y = _GeluMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        else:
            y = fc2(F.gelu(fc1(x)))
        return y if residual is None else residual + y
    h = linear_gelu(x, fc1)
    return linear(h, fc2, True) if residual is None else linear_add(h, fc2, residual)
