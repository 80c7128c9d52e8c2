"""The CPU accelerators of MG-SSAF (``models.mg_ssaf``): its block, its patch merging and its SS-MSA scores.

The same functions as the stock modules:

* ``MGSSAFBlock``: the 1x1 convs (``nn.Linear``) through oneDNN (``ops.linear``); in eval without autograd the MLP's
  GELU and the residual adds fused into the GEMMs; in training the MLP's 7x7 depthwise conv with a cheaper backward
  (``_DepthwiseConvSame``). The stock ``attend`` (everything between ``proj_qk`` and ``proj``) runs as it is.
* ``PatchMerging``: its 1x1 -> GELU -> 1x1 as ``ops.gelu_mlp`` (no GELU output kept), the shortcut through oneDNN.
* ``MultiGranularityAttention._ss_scores``: the row and column scores as the diagonals of one full-window product
  where that is the faster here (more FLOPs, fewer and larger GEMMs).
* ``AttentionFusion.spatial_conv``: its depthwise conv over the key grid as a channels-last conv2d with one channel per
  (head, query) (oneDNN's depthwise kernel, several times faster here than the stock conv3d in training); the group
  count follows the input size, which is why the stock module, whose graphs must serve every size, does not.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..mg_ssaf import (AttentionFusion, ConvMlp, ConvNHWC, MGSSAFBlock, MultiGranularityAttention, PatchMerging,
                       _avg_pool_nhwc)
from . import ACCELERATORS, Accelerator, kernels
from .ops import gelu_mlp, linear, linear_add, linear_gelu


class _DepthwiseConvSame(torch.autograd.Function):
    """Stride-1 depthwise conv with an odd kernel and "same" padding, channels-last, with a cheaper backward.

    PyTorch's CPU weight gradient of a large-kernel depthwise conv is much slower than its forward. Here both
    gradients are forward depthwise convs, computing the same sums:

    * input: the conv of the output gradient with the flipped kernel (stride 1, padding k // 2 on both sides);
    * weight: ``dW[c, i, j] = sum_{b,y,x} xpad[b, c, y+i, x+j] g[b, c, y, x]``, a depthwise conv of the B*C maps
      ``x[b, c]`` with the B*C kernels ``g[b, c]`` (output k x k), summed over b.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        k = weight.shape[-1]
        grad = grad.contiguous(memory_format=torch.channels_last)  # B, C, H, W (memory B, H, W, C)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.flip(-2, -1), padding=k // 2, groups=C)
        if ctx.needs_input_grad[1]:
            maps = x.permute(2, 3, 0, 1).reshape(1, H, W, B * C).permute(0, 3, 1, 2)  # 1, B*C, H, W
            kernels = grad.reshape(B * C, 1, H, W)
            grad_w = F.conv2d(maps, kernels, padding=k // 2, groups=B * C)  # 1, B*C, k, k
            grad_w = grad_w.view(B, C, k, k).sum(0).unsqueeze(1)  # C, 1, k, k
            grad_w = torch.empty_like(weight).copy_(grad_w)  # in the weight's own strides, as DDP expects
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def depthwise_conv_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` (stride 1, "same" padding, depthwise, odd kernel) on an NHWC tensor, with the cheaper backward.

    Args: x: (B, H, W, C). Returns: (B, H, W, C).
    """
    return _DepthwiseConvSame.apply(x.permute(0, 3, 1, 2), conv.weight, conv.bias).permute(0, 2, 3, 1)


def _mlp(mlp: ConvMlp, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``ConvMlp.forward`` (``residual +`` it, fused, if given: eval without autograd only). NHWC in and out."""
    x = mlp.dwconv(mlp.norm(x))
    if residual is not None:
        x = mlp.hidden_dwconv(linear_gelu(x, mlp.pwconv1))
        return linear_add(x, mlp.pwconv2, residual)
    x = F.gelu(linear(x, mlp.pwconv1))
    x = depthwise_conv_nhwc(x, mlp.hidden_dwconv) if torch.is_grad_enabled() else mlp.hidden_dwconv(x)
    return mlp.drop(linear(x, mlp.pwconv2))


def block_forward(block: MGSSAFBlock, x: torch.Tensor) -> torch.Tensor:
    """``MGSSAFBlock.forward``. Args: x: (B, H, W, C). Returns: (B, H, W, C)."""
    attn = block.attn
    a = attn.attend(linear(block.norm1(x), attn.proj_qk))  # B, H, W, C
    if not block.training and not torch.is_grad_enabled():  # eval: no dropout or drop path
        x = linear_add(a, attn.proj, x)
        return _mlp(block.mlp, x, residual=x)
    x = x + block.drop_path(attn.proj_drop(linear(a, attn.proj)))
    return x + block.drop_path(_mlp(block.mlp, x))


def merge_forward(merge: PatchMerging, x: torch.Tensor) -> torch.Tensor:
    """``PatchMerging.forward``. Args: x: (B, H, W, C). Returns: (B, ceil(H/2), ceil(W/2), 2C)."""
    shortcut = linear(merge.norm(_avg_pool_nhwc(x, (merge.stride, merge.stride))), merge.shortcut)
    return gelu_mlp(merge.dwconv(merge.norm(x)), merge.pwconv1, merge.pwconv2, residual=shortcut)


def _ss_scores_full(attn: MultiGranularityAttention, q: torch.Tensor,
                    k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``MultiGranularityAttention._ss_scores`` from one product of all ws*ws queries with all ws*ws keys of each
    window, whose diagonals they are: row[(i, j), j'] = S[(i, j), (i, j')], col[(i, j), i'] = S[(i, j), (i', j)].
    More FLOPs, but one N x N GEMM per head can run faster on a CPU than 2 ws products of ws x ws. The same dot
    products, so the same values up to float rounding.

    Args: q, k: (B*nW, nH, ws(i), ws(j), d). Returns: row, col in ``_ss_scores``' layouts.
    """
    Bw, nH, ws, _, d = q.shape
    N = ws * ws
    s = q.reshape(Bw, nH, N, d) @ k.reshape(Bw, nH, N, d).transpose(-2, -1)  # B*nW, nH, N, N
    s = s.view(Bw, nH, ws, ws, ws, ws)  # B*nW, nH, i, j, i', j'
    row = s.diagonal(dim1=2, dim2=4).permute(0, 1, 3, 4, 2)  # B*nW, nH, j', i, j (i = i')
    col = s.diagonal(dim1=3, dim2=5).permute(0, 1, 3, 4, 2)  # B*nW, nH, i', j, i (j = j')
    return (row * attn.scale).contiguous(), (col * attn.scale).contiguous()


def _same(t: torch.Tensor) -> torch.Tensor:
    """The identity, as a saved-tensor pack / unpack hook."""
    return t


def ss_scores(attn: MultiGranularityAttention, q: torch.Tensor,
              k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``_ss_scores`` through whichever of the two products is the faster here for these shapes: with autograd
    timed forward and backward (where the full product gains most), on detached copies of q and k."""
    stock = type(attn)._ss_scores
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)):
        full = kernels.use_fused('ss_scores', (q, k), lambda: _ss_scores_full(attn, q, k),
                                     lambda: stock(attn, q, k))
        return _ss_scores_full(attn, q, k) if full else stock(attn, q, k)

    def forward_backward(scores: Callable[..., Tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:  # runs only while the choice is measured (once per shape)
            q1, k1 = q.detach().requires_grad_(), k.detach().requires_grad_()
            # Its own graph, saved as is: not through the hooks of an enclosing region (activation checkpointing
            # counts the tensors a forward saves, and would see these only the first time).
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
                row, col = scores(attn, q1, k1)
                torch.autograd.backward((row, col), (row.detach(), col.detach()))
        return run
    full = kernels.use_fused('ss_scores_train', (q, k), forward_backward(_ss_scores_full),
                                 forward_backward(stock))
    return _ss_scores_full(attn, q, k) if full else stock(attn, q, k)


def fusion_spatial(fusion: AttentionFusion, attn: torch.Tensor) -> torch.Tensor:
    """``AttentionFusion.spatial_conv``: the (k, k) depthwise conv of every (head, query) map, as a channels-last
    conv2d with one channel per (head, query). Args: attn: (B', nH, kh, kw, Nq). Returns: the same shape."""
    Bq, nH, kh, kw, Nq = attn.shape
    conv = fusion.spatial
    maps = attn.permute(0, 2, 3, 1, 4).reshape(Bq, kh, kw, nH * Nq).permute(0, 3, 1, 2)  # channels-last NCHW
    bias = None if conv.bias is None else conv.bias.repeat_interleave(Nq)
    out = F.conv2d(maps, conv.weight.repeat_interleave(Nq, dim=0), bias, padding=conv.padding, groups=nH * Nq)
    return out.permute(0, 2, 3, 1).reshape(Bq, kh, kw, nH, Nq).permute(0, 3, 1, 2, 4)  # B', nH, kh, kw, Nq


ACCELERATORS.extend([
    Accelerator(
        cls=AttentionFusion,
        method='spatial_conv',
        fast=fusion_spatial,
        pins={AttentionFusion.spatial_conv: '653b52f3252e3553'},
    ),
    Accelerator(
        cls=MGSSAFBlock,
        method='forward',
        fast=block_forward,
        pins={
            MGSSAFBlock.forward: '278e5b80b7804174',
            MultiGranularityAttention.forward: 'd8a5d10fdd23d706',
            ConvMlp.forward: '139721a9a075f7f8',
            ConvNHWC.forward: 'b65d758926e19fc7',
        },
        parts={'attn': MultiGranularityAttention, 'mlp': ConvMlp},
    ),
    Accelerator(
        cls=PatchMerging,
        method='forward',
        fast=merge_forward,
        pins={PatchMerging.forward: 'a70cdd5b7d1e4c2a'},
    ),
    Accelerator(
        cls=MultiGranularityAttention,
        method='_ss_scores',
        fast=ss_scores,
        pins={MultiGranularityAttention._ss_scores: '3722c3cd5e1185ed'},
    ),
])
