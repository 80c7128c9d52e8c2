"""MG-SSAF: space-wise separable MSA (SS-MSA), Attention Fusion and multi-scale global MSA (MG-MSA).

Paper: "MG-SSAF: An advanced vision Transformer" (Shuai Yang et al.), official code: github.com/shuaiyang11/MG-SSAF (models/MS-SSAF-{T,S,B}.py). This module computes the same
function as the official code at 224x224 and loads its released checkpoints (see
``convert_official_state_dict``), while deriving every size from the input size and ``window_size``.

Architecture (B batch, H/W height/width of a stage's grid, C channels, nH heads, d = C // nH head width,
ws window size, nW windows per image, N = ws*ws tokens per window):

* ``StemConv``: two stride-2 3x3 convs and a 3x3 conv -> stride 4 (the "patch size"), NCHW in, NHWC out.
* ``MGSSAFBlock`` (NHWC): ``x + attn(norm1(x))`` then ``x + mlp(x)`` (the MLP normalizes its own input).
* ``MultiGranularityAttention``: one 1x1 projection gives q and k (values are the keys). Its heads split into

  - local heads (SS-MSA): inside each ws x ws window every token attends along its row (``row[(i,j), j']``,
    softmax over j') and along its column (``col[(i,j), i']``, softmax over i'). The window attention
    composes the two: ``A[(i,j),(i',j')] = row[(i,j), j'] * col[(i,j'), i']``, a path from the query along
    its row to (i, j') and from there along that column (each row of A sums to 1).
  - global heads (MG-MSA), three equal groups attending to average-pooled keys:
    ``window`` (one key per ws x ws window; SS attention over the pooled grid: for pooled key (r, c) the
    product of the softmax along pooled row r and the softmax along pooled column c), ``strip_h``
    (horizontal strips ``width`` rows high spanning the full map) and ``strip_v`` (vertical strips) with
    plain softmax attention.

  Attention Fusion: each query's SS attention map (a ws x ws, or pooled kh x kw, image with one channel per
  head) passes through a depthwise 3x3 conv, GELU and a 1x1 conv across heads, and is added to the map.
  The head outputs are concatenated [local | window | strip_h | strip_v], passed through GELU and ``proj``.
* ``ConvMlp`` (NHWC): LayerNorm, depthwise 3x3, pointwise expand, GELU, depthwise 7x7, pointwise reduce.
* ``PatchMerging`` (NHWC): norm -> depthwise 3x3 stride 2 -> pointwise -> GELU -> pointwise, plus a shortcut
  2x2 average pool -> the same norm -> pointwise.
* Head: LayerNorm, global average pool, ``head_hidden`` (1x1 conv, 1280 wide) + GELU, classifier.

Layout: the public entry points take NCHW images; everything after the stem runs channels-last (NHWC), so
1x1 convs are ``nn.Linear`` and LayerNorm is ``F.layer_norm`` over the last dim. Depthwise convs run on a
channels-last NCHW view of the NHWC tensor (no copy). ``forward_intermediates`` returns NCHW maps.
On CPU in float32 the 1x1 convs run through oneDNN with the bias fused (``layers.linear``), in eval without
autograd also the MLP's GELU and the residual adds; PatchMerging's 1x1 -> GELU -> 1x1 is ``layers.gelu_mlp``
(``use_onednn = False`` on blocks and merges: plain modules). The convs that ``_conv_nhwc`` runs on channels-last
views (the stem's last conv, the 3x3 depthwise convs) keep channels-last weights (no weight reorder per call,
gradients in the weights' own strides).

Head split: ``global_ratio[i]`` is the share of stage i's heads that attend globally: ``nH * r`` global heads
(a multiple of 3: window / strip_h / strip_v) and ``nH * (1 - r)`` local heads. This is the rule of
MS-SSAF-B.py (r = 0.75); MS-SSAF-T/S.py compute ``local = nH * r`` instead, which coincides at their r = 0.5.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, to_2tuple, trunc_normal_
from timm.models import register_model

from .build import register_model_type
from .layers import channels_last_weight_, gelu_mlp, linear, linear_add, linear_gelu, onednn_ok

__all__ = ['MGSSAF', 'build_mg_ssaf', 'convert_official_state_dict', 'to_official_state_dict',
           'valid_img_sizes_multiple']

LN_EPS = 1e-6               # every LayerNorm of the official model
STEM_STRIDE = 4             # two stride-2 convs: the stem's "patch size"
MERGE_STRIDE = 2            # each PatchMerging halves H and W
FUSION_KERNEL_SIZE = 3      # Attention Fusion's depthwise conv over an attention map
MLP_KERNEL_SIZE = 3         # ConvMlp's depthwise conv before the expansion
MLP_HIDDEN_KERNEL_SIZE = 7  # ConvMlp's depthwise conv on the expanded features
MERGE_KERNEL_SIZE = 3       # PatchMerging's stride-2 depthwise conv
NUM_GLOBAL_GROUPS = 3       # global heads: pooled windows, horizontal strips, vertical strips

_IntPair = Union[int, tuple[int, int]]


def _conv_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv`` on an NHWC tensor through a channels-last NCHW view (no layout copies).

    Args:
        x: (B, H, W, C)
    Returns:
        (B, H', W', C')
    """
    return conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # B, C, H, W (channels-last) -> B, H', W', C'


class _DepthwiseConvSame(torch.autograd.Function):
    """Stride-1 depthwise conv with odd kernel and "same" padding, channels-last, with a faster backward.

    PyTorch's CPU weight gradient of a large-kernel depthwise conv is ~15x slower than its forward (e.g. 7x7 on
    8x768x14x14: 30 ms vs 2 ms). Both gradients here are forward depthwise convs, computing the same sums:

    * input: the conv of the output gradient with the flipped kernel (stride 1, padding k // 2 on both sides);
    * weight: ``dW[c, i, j] = sum_{b,y,x} xpad[b, c, y+i, x+j] g[b, c, y, x]``, a depthwise conv of the
      B*C maps ``x[b, c]`` with the B*C kernels ``g[b, c]`` (output k x k), summed over b.
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
        # Under autocast the forward ran in grad's dtype: so do the gradients (then cast back, like autocast's).
        grad = grad.contiguous(memory_format=torch.channels_last)  # B, C, H, W (memory B, H, W, C)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.to(grad.dtype).flip(-2, -1), padding=k // 2, groups=C).to(x.dtype)
        if ctx.needs_input_grad[1]:
            maps = x.to(grad.dtype).permute(2, 3, 0, 1).reshape(1, H, W, B * C).permute(0, 3, 1, 2)  # 1, B*C, H, W
            kernels = grad.reshape(B * C, 1, H, W)
            grad_w = F.conv2d(maps, kernels, padding=k // 2, groups=B * C)  # 1, B*C, k, k
            grad_w = grad_w.view(B, C, k, k).sum(0).unsqueeze(1).to(weight.dtype)  # C, 1, k, k
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3)).to(weight.dtype)
        return grad_x, grad_w, grad_b


def _depthwise_conv_nhwc(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``_conv_nhwc`` for a stride-1, "same"-padded depthwise ``conv`` with an odd kernel (faster backward).

    Args:
        x: (B, H, W, C)
    Returns:
        (B, H, W, C)
    """
    return _DepthwiseConvSame.apply(x.permute(0, 3, 1, 2), conv.weight, conv.bias).permute(0, 2, 3, 1)


def _avg_pool_nhwc(x: torch.Tensor, kernel_size: tuple[int, int], stride: Optional[int] = None) -> torch.Tensor:
    """Average pooling of an NHWC tensor (through a channels-last NCHW view; ``stride`` defaults to the kernel).

    Args:
        x: (B, H, W, C)
    Returns:
        (B, H', W', C)
    """
    return F.avg_pool2d(x.permute(0, 3, 1, 2), kernel_size, stride).permute(0, 2, 3, 1)  # B, H', W', C


class StemConv(nn.Module):
    """Conv stem of stride 4: conv3x3/2 -> GELU -> conv3x3/2 -> LN -> GELU -> conv3x3. NCHW in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.conv3 = channels_last_weight_(nn.Conv2d(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, H/4, W/4, C)."""
        x = F.gelu(self.conv1(x))
        x = self.conv2(x).permute(0, 2, 3, 1)  # B, H/4, W/4, C
        x = F.gelu(self.norm(x))
        return _conv_nhwc(x, self.conv3)


class AttentionFusion(nn.Module):
    """Attention Fusion and the value product: ``(attn + mix(GELU(spatial(attn)))) @ v``.

    ``spatial`` is a depthwise conv over the (kh, kw) key grid, one channel per head; ``mix`` is a 1x1 conv
    across heads (a Linear on the head dim). The maps arrive key-major, (B', kh, kw, nH, Nq): as an NCHW
    tensor with nH*Nq channels that is channels-last, so ``spatial`` runs as one channels-last depthwise conv
    (kernel repeated per query) and ``mix`` as a batched matmul, without transposing the attention.
    """

    def __init__(self, num_heads: int, kernel_size: int = FUSION_KERNEL_SIZE, attn_drop: float = 0.) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(num_heads, num_heads, kernel_size, padding=kernel_size // 2, groups=num_heads)
        self.mix = nn.Linear(num_heads, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """
        Args:
            attn: (B', kh, kw, nH, Nq) attention weights, key-major.
            v: (B', nH, kh*kw, d) values.
        Returns:
            (B', nH, Nq, d)
        """
        Bq, kh, kw, nH, Nq = attn.shape
        weight = self.spatial.weight.repeat_interleave(Nq, dim=0)  # nH*Nq, 1, k, k
        bias = self.spatial.bias.repeat_interleave(Nq)
        maps = attn.reshape(Bq, kh, kw, nH * Nq).permute(0, 3, 1, 2)  # B', nH*Nq, kh, kw (channels-last)
        fused = F.gelu(F.conv2d(maps, weight, bias, padding=self.spatial.padding, groups=nH * Nq))
        fused = fused.permute(0, 2, 3, 1).reshape(Bq * kh * kw, nH, Nq)  # B'*kh*kw, nH, Nq
        attn = torch.baddbmm(attn.reshape(Bq * kh * kw, nH, Nq), self.mix.weight.expand(Bq * kh * kw, nH, nH), fused)
        attn = attn.view(Bq, kh * kw, nH, Nq).permute(0, 2, 3, 1)  # B', nH, Nq, kh*kw
        mix_bias = self.mix.bias[:, None, None]  # nH, 1, 1
        if self.training and self.attn_drop.p > 0:
            return self.attn_drop(attn + mix_bias) @ v
        # mix's bias adds b_h to every weight of head h, i.e. b_h * sum(v) to every output: cheaper there.
        return attn @ v + mix_bias * v.sum(dim=-2, keepdim=True)


def _separable_attention(logits: torch.Tensor) -> torch.Tensor:
    """SS attention on a (kh, kw) key grid: softmax along each key row times softmax along each key column.

    Args:
        logits: (..., kh, kw, Nq) query-key scores on the key grid, queries innermost.
    Returns:
        (..., kh, kw, Nq) attention weights.
    """
    return logits.softmax(dim=-2) * logits.softmax(dim=-3)


class MultiGranularityAttention(nn.Module):
    """SS-MSA on local windows plus MG-MSA on pooled keys, with Attention Fusion. NHWC in and out.

    Values are the keys (the projection makes only q and k). Channel layout of ``proj_qk``'s output:
    ``[q_local | k_local | q_window | k_window | q_strip_h | k_strip_h | q_strip_v | k_strip_v]``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_global_heads: int,
            window_size: int,
            strip_width: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.local_heads = num_heads - num_global_heads
        self.group_heads = num_global_heads // NUM_GLOBAL_GROUPS  # heads per global group
        self.window_size = window_size
        self.strip_width = strip_width
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn

        self.proj_qk = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.local_fusion = AttentionFusion(self.local_heads, attn_drop=attn_drop) if self.local_heads else None
        self.global_fusion = AttentionFusion(self.group_heads, attn_drop=attn_drop) if self.group_heads else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _local(self, qk: torch.Tensor) -> torch.Tensor:
        """SS-MSA in ws x ws windows. Args: qk: (B, H, W, 2*nH_l*d). Returns: (B, H, W, nH_l*d)."""
        B, H, W, _ = qk.shape
        ws, nH, d = self.window_size, self.local_heads, self.head_dim
        qk = qk.view(B, H // ws, ws, W // ws, ws, 2, nH, d)  # B, H/ws, ws, W/ws, ws, 2, nH, d
        qk = qk.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(2, -1, nH, ws, ws, d)  # 2, B*nW, nH, ws(i), ws(j), d
        q, k = qk.unbind(0)
        # Softmax dims are put outside a contiguous block (fast softmax over a short dim); maps key-major.
        row = (q @ k.transpose(-2, -1)).mul_(self.scale)  # B*nW, nH, i, j, j'
        row = row.permute(0, 4, 1, 2, 3).contiguous().softmax(dim=1)  # B*nW, j', nH, i, j
        col = (q.transpose(-3, -2) @ k.permute(0, 1, 3, 4, 2)).mul_(self.scale)  # B*nW, nH, j, i, i'
        col = col.permute(0, 4, 2, 1, 3).contiguous().softmax(dim=1)  # B*nW, i', j, nH, i
        # Two hops: (i, j) -> (i, j') along its row, then (i, j') -> (i', j') along that column.
        attn = row.unsqueeze(1) * col.unsqueeze(-1)  # B*nW, i', j', nH, i, j
        attn = attn.view(-1, ws, ws, nH, ws * ws)  # B*nW, ws(i'), ws(j'), nH, N
        out = self.local_fusion(attn, k.reshape(-1, nH, ws * ws, d))  # B*nW, nH, N, d
        out = out.view(B, H // ws, W // ws, nH, ws, ws, d)  # B, H/ws, W/ws, nH, ws, ws, d
        return out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, nH * d)  # B, H, W, nH*d

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, ..., nH_g*d) with nH_g = group_heads. Returns: (B, nH_g, L, d), L = prod(...)."""
        return x.reshape(x.shape[0], -1, self.group_heads, self.head_dim).transpose(1, 2)  # B, nH_g, L, d

    def _pooled_window(self, qk: torch.Tensor) -> torch.Tensor:
        """SS attention to one average-pooled key per ws x ws window, with fusion.

        Args:
            qk: (B, H, W, 2*nH_g*d)
        Returns:
            (B, H, W, nH_g*d)
        """
        B, H, W, C2 = qk.shape
        ws, kh, kw = self.window_size, H // self.window_size, W // self.window_size
        q, k = qk.split(C2 // 2, dim=-1)
        k = _avg_pool_nhwc(k, (ws, ws))  # B, kh, kw, nH_g*d
        q, k = self._split_heads(q), self._split_heads(k)  # B, nH_g, H*W, d / B, nH_g, kh*kw, d
        logits = (k @ q.transpose(-2, -1)).mul_(self.scale)  # B, nH_g, kh*kw, H*W
        attn = _separable_attention(logits.view(B, self.group_heads, kh, kw, H * W))  # B, nH_g, kh, kw, H*W
        out = self.global_fusion(attn.permute(0, 2, 3, 1, 4), k)  # B, nH_g, H*W, d
        return out.transpose(1, 2).reshape(B, H, W, -1)  # B, H, W, nH_g*d

    def _pooled_strips(self, qk: torch.Tensor, horizontal: bool) -> torch.Tensor:
        """Softmax attention to average-pooled strips ``strip_width`` thick spanning the whole map.

        Args:
            qk: (B, H, W, 2*nH_g*d)
        Returns:
            (B, H, W, nH_g*d)
        """
        B, H, W, C2 = qk.shape
        s = self.strip_width
        q, k = qk.split(C2 // 2, dim=-1)
        k = _avg_pool_nhwc(k, (s, W) if horizontal else (H, s), stride=s)  # B, H/s, 1, nH_g*d or B, 1, W/s, nH_g*d
        q, k = self._split_heads(q), self._split_heads(k)  # B, nH_g, H*W, d / B, nH_g, M, d
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, k, dropout_p=self.attn_drop.p if self.training else 0.,
                                                 scale=self.scale)  # B, nH_g, H*W, d
        else:
            attn = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # B, nH_g, H*W, M
            out = self.attn_drop(attn) @ k  # B, nH_g, H*W, d
        return out.transpose(1, 2).reshape(B, H, W, -1)  # B, H, W, nH_g*d

    def attend(self, x: torch.Tensor, onednn: bool = False) -> torch.Tensor:
        """Everything but ``proj`` (so that ``MGSSAFBlock`` can fuse it with the residual add).

        Args:
            x: (B, H, W, C) normed tokens.
            onednn: ``proj_qk`` through oneDNN (see ``layers.linear``).
        Returns:
            (B, H, W, C), the GELU of the concatenated head outputs.
        """
        qk = linear(x, self.proj_qk, onednn)  # B, H, W, 2C
        local_dim, group_dim = 2 * self.local_heads * self.head_dim, 2 * self.group_heads * self.head_dim
        # One split (its backward is one cat; slicing would zero-fill a full-size gradient per slice).
        local, window, strip_h, strip_v = qk.split([local_dim] + [group_dim] * NUM_GLOBAL_GROUPS, dim=-1)
        outs = []
        if self.local_heads:
            outs.append(self._local(local))
        if self.group_heads:
            outs += [self._pooled_window(window),
                     self._pooled_strips(strip_h, horizontal=True),
                     self._pooled_strips(strip_v, horizontal=False)]
        return F.gelu(torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0])  # B, H, W, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H, W, C)."""
        return self.proj_drop(self.proj(self.attend(x)))


class ConvMlp(nn.Module):
    """LN -> depthwise 3x3 -> pointwise expand -> GELU -> depthwise 7x7 -> pointwise reduce. NHWC in and out."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dwconv = channels_last_weight_(
            nn.Conv2d(dim, dim, MLP_KERNEL_SIZE, padding=MLP_KERNEL_SIZE // 2, groups=dim))  # channels-last input
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.hidden_dwconv = nn.Conv2d(hidden_dim, hidden_dim, MLP_HIDDEN_KERNEL_SIZE,
                                       padding=MLP_HIDDEN_KERNEL_SIZE // 2, groups=hidden_dim)
        self.pwconv2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, onednn: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C)
            onednn: the pointwise convs through oneDNN (see ``layers.linear``).
            residual: (B, H, W, C), only with ``onednn`` and without autograd (eval): return ``residual + mlp(x)``
                with the GELU and the add fused into the GEMMs.
        Returns:
            (B, H, W, C)
        """
        x = _conv_nhwc(self.norm(x), self.dwconv)
        if residual is not None:
            x = _depthwise_conv_nhwc(linear_gelu(x, self.pwconv1), self.hidden_dwconv)
            return linear_add(x, self.pwconv2, residual)
        x = F.gelu(linear(x, self.pwconv1, onednn))
        x = _depthwise_conv_nhwc(x, self.hidden_dwconv)  # 7x7: its weight gradient dominates the backward
        return self.drop(linear(x, self.pwconv2, onednn))


class MGSSAFBlock(nn.Module):
    """``x + attn(norm1(x))``, then ``x + mlp(x)``. NHWC in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_global_heads: int,
            window_size: int,
            strip_width: int,
            mlp_ratio: float = 2.,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiGranularityAttention(
            dim,
            num_heads=num_heads,
            num_global_heads=num_global_heads,
            window_size=window_size,
            strip_width=strip_width,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            fused_attn=fused_attn,
        )
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # CPU float32: 1x1 convs through oneDNN (bias fused; in eval without autograd also the MLP's GELU and the
        # residual adds). False: the plain modules (for tests).
        self.use_onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H, W, C)."""
        onednn = self.use_onednn and onednn_ok(x, self.attn.proj.weight)
        a = self.attn.attend(self.norm1(x), onednn)
        if onednn and not self.training and not torch.is_grad_enabled():  # eval: no dropout or drop path
            x = linear_add(a, self.attn.proj, x)
            return self.mlp(x, onednn, residual=x)
        x = x + self.drop_path(self.attn.proj_drop(linear(a, self.attn.proj, onednn)))
        return x + self.drop_path(self.mlp(x, onednn))


class PatchMerging(nn.Module):
    """Halve H and W, double C: conv path plus pooled shortcut, sharing one LayerNorm. NHWC in and out."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dwconv = channels_last_weight_(nn.Conv2d(  # channels-last input
            dim, dim, MERGE_KERNEL_SIZE, stride=MERGE_STRIDE, padding=MERGE_KERNEL_SIZE // 2, groups=dim))
        self.pwconv1 = nn.Linear(dim, out_dim)
        self.pwconv2 = nn.Linear(out_dim, out_dim)
        self.shortcut = nn.Linear(dim, out_dim)
        self.use_onednn = True  # as in MGSSAFBlock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H/2, W/2, 2C)."""
        onednn = self.use_onednn and onednn_ok(x, self.pwconv1.weight)
        shortcut = linear(self.norm(_avg_pool_nhwc(x, (MERGE_STRIDE, MERGE_STRIDE))), self.shortcut, onednn)
        x = _conv_nhwc(self.norm(x), self.dwconv)  # B, H/2, W/2, C
        if onednn:
            return gelu_mlp(x, self.pwconv1, self.pwconv2, residual=shortcut)
        return self.pwconv2(F.gelu(self.pwconv1(x))) + shortcut


class MGSSAFStage(nn.Module):
    """Blocks at one resolution, then (except in the last stage) a PatchMerging. NHWC in and out."""

    def __init__(self, blocks: Sequence[MGSSAFBlock], downsample: Optional[PatchMerging]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H, W, C), before the downsample."""
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H/2, W/2, 2C), or (B, H, W, C) in the last stage."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def valid_img_sizes_multiple(
        num_stages: int,
        window_size: int,
        strip_width: Sequence[int],
        global_ratio: Sequence[float],
) -> int:
    """The input sizes (height and width alike) the model takes are exactly the multiples of this number.

    Stage i's grid is ``size / (4 * 2**i)``; it must be divisible by ``window_size`` (local windows and the
    pooled-window keys), by the strip width where the stage has global heads, and by 2 before each merging
    (the stride-2 conv and the 2x2 pool must agree).
    """
    multiple = 1
    for i in range(num_stages):
        divisor = window_size
        if global_ratio[i] > 0:
            divisor = math.lcm(divisor, strip_width[i])
        if i < num_stages - 1:
            divisor = math.lcm(divisor, MERGE_STRIDE)
        multiple = math.lcm(multiple, STEM_STRIDE * MERGE_STRIDE ** i * divisor)
    return multiple


def _global_heads(num_heads: int, ratio: float, stage: int) -> int:
    """Number of globally attending heads: ``num_heads * ratio``, which must be a multiple of 3."""
    exact = num_heads * ratio
    heads = round(exact)
    if not 0. <= ratio <= 1. or abs(exact - heads) > 1e-6 or heads % NUM_GLOBAL_GROUPS:
        raise ValueError(f'stage {stage}: global_ratio {ratio} of {num_heads} heads must give a whole multiple of '
                         f'{NUM_GLOBAL_GROUPS} global heads (window / horizontal strip / vertical strip), '
                         f'got {exact:g}')
    return heads


class MGSSAF(nn.Module):
    """MG-SSAF backbone and classifier. Takes NCHW images; stages run NHWC.

    ``forward_features`` returns the pooled, 1x1-projected features (B, head_hidden_dim) as the official
    ``forward_features`` does; ``forward_intermediates`` gives the spatial maps.
    """

    def __init__(
            self,
            img_size: _IntPair = 224,
            patch_size: int = STEM_STRIDE,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            global_ratio: Sequence[float] = (0., 0.5, 0.5, 0.),
            width: Sequence[int] = (0, 2, 2, 0),
            window_size: int = 7,
            mlp_ratio: float = 2.,
            qkv_bias: bool = True,
            head_hidden_dim: int = 1280,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.2,
            fused_attn: bool = True,
            use_checkpoint: bool = False,
    ) -> None:
        """
        Args:
            img_size: input (H, W) or side; each must be a multiple of ``valid_img_sizes_multiple(...)``
                (224 for the released models with window 7).
            patch_size: stride of the conv stem; must be 4 (two stride-2 convs).
            global_ratio: per stage, the share of heads attending to pooled keys (0 = all local).
            width: per stage, thickness of the pooled horizontal / vertical strips (used where ratio > 0).
            window_size: side of the local windows and of the pooled windows.
            head_hidden_dim: width of the 1x1 conv between pooling and classifier.
            fused_attn: use ``scaled_dot_product_attention`` for the strip heads (exact; False: matmuls).
        """
        super().__init__()
        num_stages = len(depths)
        if not (len(num_heads) == len(global_ratio) == len(width) == num_stages):
            raise ValueError(f'depths, num_heads, global_ratio and width need one entry per stage; got lengths '
                             f'{len(depths)}, {len(num_heads)}, {len(global_ratio)}, {len(width)}')
        if patch_size != STEM_STRIDE:
            raise ValueError(f'patch_size must be {STEM_STRIDE} (the conv stem is two stride-2 convs), '
                             f'got {patch_size}')
        for i, h in enumerate(num_heads):
            dim = embed_dim * 2 ** i
            if h <= 0 or dim % h:
                raise ValueError(f'stage {i}: num_heads {h} must divide its {dim} channels '
                                 f'(embed_dim {embed_dim} x 2**{i})')
        num_global = [_global_heads(h, r, i) for i, (h, r) in enumerate(zip(num_heads, global_ratio))]
        for i, (g, s) in enumerate(zip(num_global, width)):
            if g and s <= 0:
                raise ValueError(f'stage {i} has global heads, so width[{i}] must be positive, got {s}')
        self.img_size = to_2tuple(img_size)
        self.size_multiple = multiple = valid_img_sizes_multiple(num_stages, window_size, width, global_ratio)
        if any(side <= 0 or side % multiple for side in self.img_size):
            raise ValueError(f'img_size {self.img_size} is not supported with window_size {window_size} and '
                             f'width {tuple(width)}: height and width must be positive multiples of {multiple} '
                             f'(e.g. {multiple}, {2 * multiple}, {3 * multiple})')
        self.num_classes = num_classes
        self.window_size = window_size
        self.num_features = self.head_hidden_dim = head_hidden_dim
        dims = [embed_dim * MERGE_STRIDE ** i for i in range(num_stages)]
        self.feature_info = [dict(num_chs=dims[i], reduction=STEM_STRIDE * MERGE_STRIDE ** i, module=f'layers.{i}')
                             for i in range(num_stages)]

        self.patch_embed = StemConv(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()  # stochastic depth, rising per block
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            blocks = [MGSSAFBlock(
                dims[i],
                num_heads=num_heads[i],
                num_global_heads=num_global[i],
                window_size=window_size,
                strip_width=width[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]) + j],
                fused_attn=fused_attn,
            ) for j in range(depths[i])]
            downsample = PatchMerging(dims[i], dims[i + 1]) if i < num_stages - 1 else None
            self.layers.append(MGSSAFStage(blocks, downsample))
        self.norm = nn.LayerNorm(dims[-1], eps=LN_EPS)
        self.head_hidden = nn.Linear(dims[-1], head_hidden_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_hidden_dim, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights()
        self.set_grad_checkpointing(use_checkpoint)
        self.register_load_state_dict_pre_hook(_accept_official_keys)

    def _init_weights(self) -> None:
        """The official initialisation: He-normal (fan-out) for the stem and merging layers, truncated normal
        for the classifier, PyTorch defaults elsewhere (a 1x1 conv's default equals its Linear's)."""
        for module in (self.patch_embed, *(s.downsample for s in self.layers if s.downsample is not None)):
            for m in module.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    fan_out = m.weight.shape[0] * m.weight[0, 0].numel() // getattr(m, 'groups', 1)
                    nn.init.normal_(m.weight, 0., math.sqrt(2. / fan_out))
                    nn.init.zeros_(m.bias)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """No parameter is exempted by name: norms and biases are 1-D, which the optimizer already skips."""
        return set()

    @torch.jit.ignore
    def official_no_weight_decay(self) -> set[str]:
        """The names the official optimizer exempted (none): for reading official checkpoints' optimizer state."""
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier (``num_classes=0``: none; ``forward`` then returns the features)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.head_hidden_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert an official or our state_dict to ours; returns it and the unused official keys it dropped."""
        return convert_official_state_dict(state_dict)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, H/4, W/4, C). Any size the model admits, not only img_size."""
        H, W = x.shape[-2:]
        if H % self.size_multiple or W % self.size_multiple:
            raise ValueError(f'input {H}x{W}: height and width must be multiples of {self.size_multiple}')
        return self.pos_drop(self.patch_embed(x))

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-scale features for dense heads.

        Args:
            x: (B, C_in, H, W) images.
        Returns:
            one NCHW map per stage, (B, C_i, H / s_i, W / s_i) with strides s_i = 4, 8, 16, 32 and
            C_i = embed_dim * 2**i: the output of stage i's blocks, before its PatchMerging and before the final
            norm. The maps are channels-last in memory (``.contiguous()`` if a consumer needs NCHW strides).
        """
        x = self._embed(x)
        features = []
        for stage in self.layers:
            x = stage.forward_blocks(x)
            features.append(x.permute(0, 3, 1, 2))  # B, C, H, W
            if stage.downsample is not None:
                x = stage.downsample(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, head_hidden_dim), pooled, projected and activated."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x).mean(dim=(1, 2))  # B, C
        return F.gelu(self.head_hidden(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: x: (B, head_hidden_dim). Returns: (B, num_classes), or x after dropout if ``pre_logits``."""
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------------------------------
# One key map, official <-> ours (substrings of full keys). Besides renames, the official 1x1 convs are Linear
# layers here: every official [out, in, 1, 1] kernel is our [out, in] weight, and every 2-D weight of ours except
# the classifier ``head.weight`` is a 1x1 kernel there.
KEY_MAP: tuple[tuple[str, str], ...] = (
    ('patch_embed.Conv2Down.', 'patch_embed.conv1.'),
    ('patch_embed.Conv4Down.', 'patch_embed.conv2.'),
    ('patch_embed.ConvFuse.', 'patch_embed.conv3.'),
    ('.attn.proj_qkv.', '.attn.proj_qk.'),            # it projects to q and k only
    ('.attn.attn_local_win.0.', '.attn.local_fusion.spatial.'),
    ('.attn.attn_local_win.2.', '.attn.local_fusion.mix.'),
    ('.attn.attn_global_win.0.', '.attn.global_fusion.spatial.'),
    ('.attn.attn_global_win.2.', '.attn.global_fusion.mix.'),
    ('.attn.proj_concat.', '.attn.proj.'),
    ('.mlp.branch_dw.', '.mlp.hidden_dwconv.'),
    ('.downsample.Fuse1x1.', '.downsample.shortcut.'),
    ('last_conv.', 'head_hidden.'),
)
# Official parameters its forward never reads (each attention's LayerNorm); dropped on load.
UNUSED_OFFICIAL_KEYS = re.compile(r'^layers\.\d+\.blocks\.\d+\.attn\.norm\.(weight|bias)$')


def _rename(key: str, to_ours: bool) -> str:
    for official, ours in KEY_MAP:
        old, new = (official, ours) if to_ours else (ours, official)
        if old in key:
            return key.replace(old, new)
    return key


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official MG-SSAF state_dict (keys of MS-SSAF-{T,S,B}.py) -> ours, plus the unused keys dropped.

    Keys already in our layout pass through unchanged, so this is safe on either format. Unknown keys are kept
    (``load_state_dict(strict=True)`` then names them).
    """
    converted, dropped = {}, []
    for key, value in state_dict.items():
        if UNUSED_OFFICIAL_KEYS.match(key):
            dropped.append(key)
            continue
        if value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)  # out, in (1x1 conv -> Linear)
        converted[_rename(key, to_ours=True)] = value
    return converted, dropped


def to_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state_dict -> the official key layout (without the unused ``attn.norm`` entries)."""
    converted = {}
    for key, value in state_dict.items():
        if value.dim() == 2 and key != 'head.weight':
            value = value[:, :, None, None]  # out, in, 1, 1 (Linear -> 1x1 conv)
        converted[_rename(key, to_ours=False)] = value
    return converted


def _accept_official_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: convert official keys in place so a strict load accepts them as is."""
    ours = {k[len(prefix):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix)}
    converted, _ = convert_official_state_dict(ours)
    state_dict.update({prefix + k: v for k, v in converted.items()})


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------
@register_model_type('mg_ssaf', 'mg-ssaf', 'mgssaf')
def build_mg_ssaf(config: Any) -> MGSSAF:
    """Build from a config's ``MODEL.MGSSAF`` section, ``DATA.IMG_SIZE`` and the shared MODEL/TRAIN keys."""
    c = config.MODEL.MGSSAF
    return MGSSAF(
        img_size=config.DATA.IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        in_chans=c.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=c.EMBED_DIM,
        depths=tuple(c.DEPTHS),
        num_heads=tuple(c.NUM_HEADS),
        global_ratio=tuple(c.GLOBAL_RATIO),
        width=tuple(c.WIDTH),
        window_size=c.WINDOW_SIZE,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        head_hidden_dim=c.HEAD_HIDDEN_DIM,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        fused_attn=config.MODEL.FUSED_ATTN,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
    )


_TIMM_FACTORY_ARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')  # passed by timm.create_model


def _create_mg_ssaf(variant: str, pretrained: bool, defaults: dict[str, Any], **kwargs: Any) -> MGSSAF:
    if pretrained:
        raise ValueError(f'{variant}: no pretrained weights are downloaded; build with pretrained=False and load '
                         f'an official checkpoint with model.load_state_dict(torch.load(path)["model"])')
    for name in _TIMM_FACTORY_ARGS:
        kwargs.pop(name, None)
    return MGSSAF(**{**defaults, **kwargs})


@register_model
def mg_ssaf_tiny(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-T (19.6M params); kwargs override the defaults."""
    return _create_mg_ssaf('mg_ssaf_tiny', pretrained, dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), global_ratio=(0., 0.5, 0.5, 0.),
        drop_path_rate=0.2), **kwargs)


@register_model
def mg_ssaf_small(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-S (32.5M params); kwargs override the defaults."""
    return _create_mg_ssaf('mg_ssaf_small', pretrained, dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), global_ratio=(0., 0.5, 0.5, 0.),
        drop_path_rate=0.2), **kwargs)


@register_model
def mg_ssaf_base(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-B (55.9M params); kwargs override the defaults."""
    return _create_mg_ssaf('mg_ssaf_base', pretrained, dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), global_ratio=(0., 0.75, 0.75, 0.),
        drop_path_rate=0.3), **kwargs)
