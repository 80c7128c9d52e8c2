"""Op-level CPU implementations shared by the accelerators, and the one test of where they may run.

* ``applies(x)``: eager CPU float32 work on a plain tensor, outside autocast, ``torch.compile``, export, tracing,
  scripting and dispatch modes (FLOP counter, fake tensors). Everything else takes the models' own forwards.
* oneDNN's linear with the bias fused (``torch.ops.mkldnn._linear_pointwise``), and, without autograd, with the
  exact-erf GELU or the residual add fused too: the same function as ``F.linear`` (+ ``F.gelu`` / + residual)
  with other rounding. With autograd, ``F.linear``'s backward, each GEMM through oneDNN or ``torch.mm``.
* ``gelu_mlp``: ``fc2(gelu(fc1(x)))`` that keeps no GELU output for the backward (it recomputes it).
* ``attention``: ``softmax(q @ k^T * scale + mask) @ v`` through ``F.scaled_dot_product_attention`` or explicit
  matmuls, whichever is faster here.

Each choice between two exact implementations is measured once per shape (``kernels.use_fused``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import kernels

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _fx_tracing
except ImportError:  # pragma: no cover - torch < 2.3
    from torch.fx._symbolic_trace import is_fx_tracing as _fx_tracing

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')


def applies(x: torch.Tensor) -> bool:
    """Whether an accelerator may run on input ``x``: eager CPU float32 on a plain tensor (not a fake, functional or
    other subclass), without autocast, outside ``torch.compile`` (inductor fuses by itself), export, fx and jit
    tracing, scripting and dispatch modes; these all see the models' own forwards."""
    return (ONEDNN_LINEAR and type(x) is torch.Tensor and x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_autocast_enabled('cpu') and not torch.jit.is_scripting() and not torch.jit.is_tracing()
            and not _fx_tracing() and not torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            and not is_in_torch_dispatch_mode())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              scale: float) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` (no dropout): SDPA or explicit products, whichever is faster here for
    this shape; explicit where the mask needs a gradient (no CPU kernel of SDPA returns it, SDPA would fall back to
    its slower math kernel).

    Args: q: (..., Nq, d), k / v: (..., N, d), mask: broadcastable to (..., Nq, N) or None. Returns: (..., Nq, d).
    """
    def explicit() -> torch.Tensor:
        attn = (q * scale) @ k.transpose(-2, -1)  # ..., Nq, N
        return (attn if mask is None else attn + mask).softmax(dim=-1) @ v

    def fused() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    if mask is not None and mask.requires_grad:
        return explicit()
    return fused() if kernels.use_fused('attention', (q, k) if mask is None else (q, k, mask), fused, explicit) \
        else explicit()


def _dnnl_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (2-D) as oneDNN's linear of ``a`` with the weight ``b^T`` (strided views, no copies here)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, 'none', [], '')


def _use_dnnl_mm(op: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    return kernels.use_fused(op, (a, b), lambda: _dnnl_mm(a, b), lambda: a.mm(b))


def _grad_gemm(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of a linear layer's backward (``op``: 'grad_input', ``grad @ W``, or 'grad_weight', ``grad^T @ x``)
    through oneDNN or ``torch.mm``, whichever is faster on this CPU for this shape: which one wins depends on the
    CPU and the shape."""
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
    """oneDNN's linear with the bias (and an exact-erf GELU) fused."""
    return torch.ops.mkldnn._linear_pointwise(x, fc.weight, fc.bias, activation, [], '' if activation == 'none'
                                              else 'none')


def _dnnl_add(x: torch.Tensor, fc: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """residual + oneDNN linear, the add fused into the GEMM (a fresh tensor)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, fc.weight, fc.bias, 'add')


def _plain(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    return F.linear(x, fc.weight, fc.bias)


def linear(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """fc(x), through oneDNN's fused linear if it is the faster on this CPU for this shape."""
    if not kernels.use_fused('linear', (x, fc.weight), lambda: _dnnl(x, fc), lambda: _plain(x, fc)):
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
                               'call models.cpu.uninstall(model) first, or set MSGSSAF_CPU_KERNELS=plain')
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
    """``fc2(gelu(fc1(x)))`` (``+ residual`` if given). With autograd the memory-saving
    ``_GeluMlp`` if oneDNN's GEMMs are the faster here, else the plain modules; without autograd the GELU and the
    residual add fused into the GEMMs, each op as fast as this CPU runs it."""
    if torch.is_grad_enabled():
        # Ties go to _GeluMlp: it keeps no GELU output, so the peak training memory is lower.
        if kernels.use_fused('mlp', (x, fc1.weight, fc2.weight), lambda: _dnnl(F.gelu(_dnnl(x, fc1)), fc2),
                             lambda: _plain(F.gelu(_plain(x, fc1)), fc2), prefer_fused=True):
            y = _GeluMlp.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        else:
            y = fc2(F.gelu(fc1(x)))
        return y if residual is None else residual + y
    h = linear_gelu(x, fc1)
    return linear(h, fc2) if residual is None else linear_add(h, fc2, residual)
