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
1x1 convs are ``nn.Linear`` and LayerNorm is ``F.layer_norm`` over the last dim. Depthwise convs (``ConvNHWC``)
run on a channels-last NCHW view of the NHWC tensor (no copy). ``forward_features`` returns the normed last map
(NHWC, timm's unpooled features), ``forward_head`` pools it and applies ``head_hidden`` + GELU (the official
``forward_features`` output: ``forward_head(..., pre_logits=True)``) and the classifier;
``forward_intermediates`` returns NCHW maps.
The convs that run on channels-last views (the stem's last conv, the 3x3 depthwise convs) keep channels-last
weights (no weight reorder per call, gradients in the weights' own strides). This file is the reference and the GPU
path; faster CPU implementations of the stock blocks live apart (``models/cpu``) and are installed on a built model
by ``models.cpu.install``.

Swapping parts: ``attn_layer`` (default ``MultiGranularityAttention``) and ``mlp_layer`` (default ``ConvMlp``) are
the classes each block builds, ``attn_layer(dim, num_heads=, num_global_heads=, window_size=, strip_width=,
qkv_bias=, attn_drop=, proj_drop=, fused_attn=)`` and ``mlp_layer(dim, hidden_dim, drop=)``, both mapping NHWC
(B, H, W, C) to (B, H, W, C) (the attention gets the normed tokens, the MLP the block's input: it normalizes
itself). ``timm.create_model(name, attn_layer=MyAttention)`` passes them through.

Input sizes: any positive H x W. The stem (stride-2 convs, padding 1) gives ceil(H/4) x ceil(W/4), each
``PatchMerging`` ceil of half; blocks, ``ConvMlp`` and the residuals run on that valid map, and
``forward_intermediates`` returns maps of ceil(H/s) x ceil(W/s), s = 4, 8, 16, 32. Where a stage's map is not a
multiple of ws (and only there):

* local heads: the projected q / k are zero-padded at the bottom / right to a multiple of ws, so a padded token
  has q = k = v = 0. In the row softmax the keys of a padded column j' are masked (-inf), in the column softmax
  those of a padded row i'. The padding is narrower than a window, so every softmax keeps a valid key; a padded
  key gets weight 0, and Attention Fusion's fused weight there multiplies a zero value, so valid outputs depend
  on valid tokens only (the fusion conv sees zero attention at padded keys, as at its own zero border). The
  output is cropped back to H x W. At sizes that need no padding none of this runs (no copy, no mask).
* global heads: nothing is padded; the queries are the valid tokens. Pooled windows are ceil-mode average pools:
  a partial edge window is the mean of its in-bounds tokens (ceil(H/ws) x ceil(W/ws) keys); likewise a strip
  at the bottom / right edge is the mean of its in-bounds rows / columns (the mean across the map, then a
  ceil-mode pool of s rows / columns: no kernel depends on the map size).
* ``PatchMerging``: the stride-2 conv gives ceil(H/2); the shortcut's 2x2 average pool is ceil-mode, so on an
  odd side the last row / column is the mean of its in-bounds elements.

No op argument depends on the input size, so ``torch.jit.trace`` at one size gives a graph that serves every
size, and ``torch.export`` with dynamic H and W (``Dim.DYNAMIC``) one that serves other sizes: while tracing or
exporting the local heads always take the padded path (``models.layers.size_free``; a no-op at sizes that need
none) and crop by a gather (``models.layers.crop``). Export at an example with at least two windows per side in
every stage (e.g. 333x500): torch.export specializes a count it sees as 1 (docs/dense.md).

Head split: ``global_ratio[i]`` is the share of stage i's heads that attend globally: ``nH * r`` global heads
(a multiple of 3: window / strip_h / strip_v) and ``nH * (1 - r)`` local heads. This is the rule of
MS-SSAF-B.py (r = 0.75); MS-SSAF-T/S.py compute ``local = nH * r`` instead, which coincides at their r = 0.5.
"""

import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import (DropPath, get_device_dtype, register_notrace_function, register_notrace_module, to_2tuple,
                         trunc_normal_)
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from .build import register_model_type
from .layers import ceil_div, channels_last_weight_, crop, size_free
from .pretrained import (TRAIN_SIZE, checkpoint_filter_fn, create, pretrained_cfg,
                         update_model_input_size)  # timm's tests look checkpoint_filter_fn up in this module

__all__ = ['MGSSAF', 'build_mg_ssaf', 'convert_official_state_dict', 'to_official_state_dict',
           'checkpoint_filter_fn']

LN_EPS = 1e-6               # every LayerNorm of the official model
STEM_STRIDE = 4             # two stride-2 convs: the stem's "patch size"
MERGE_STRIDE = 2            # each PatchMerging halves H and W
FUSION_KERNEL_SIZE = 3      # Attention Fusion's depthwise conv over an attention map
MLP_KERNEL_SIZE = 3         # ConvMlp's depthwise conv before the expansion
MLP_HIDDEN_KERNEL_SIZE = 7  # ConvMlp's depthwise conv on the expanded features
MERGE_KERNEL_SIZE = 3       # PatchMerging's stride-2 depthwise conv
NUM_GLOBAL_GROUPS = 3       # global heads: pooled windows, horizontal strips, vertical strips
GLOBAL_POOLS = ('avg', '')  # 'avg': mean over the final map; '': keep the map (head_hidden and head per position)

_IntPair = Union[int, tuple[int, int]]


class ConvNHWC(nn.Conv2d):
    """``nn.Conv2d`` on NHWC tensors, through a channels-last NCHW view (no layout copies); same parameters and
    state_dict entries as the ``nn.Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H', W', C')."""
        return self._conv_forward(x.permute(0, 3, 1, 2), self.weight, self.bias).permute(0, 2, 3, 1)  # B, H', W', C'


def _avg_pool_nhwc(x: torch.Tensor, kernel_size: Tuple[int, int]) -> torch.Tensor:
    """Average pooling of an NHWC tensor with stride = kernel, through a channels-last NCHW view. ``ceil_mode``: a
    partial window at the bottom / right edge is the mean of its in-bounds elements (no padding is counted); where
    the kernel divides the map, the plain pool.

    Args:
        x: (B, H, W, C)
    Returns:
        (B, ceil(H / kh), ceil(W / kw), C)
    """
    return F.avg_pool2d(x.permute(0, 3, 1, 2), kernel_size, kernel_size,
                        ceil_mode=True).permute(0, 2, 3, 1)  # B, H', W', C


class StemConv(nn.Module):
    """Conv stem of stride 4: conv3x3/2 -> GELU -> conv3x3/2 -> LN -> GELU -> conv3x3. NCHW in, NHWC out."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        hidden = embed_dim // 2
        self.conv1 = nn.Conv2d(in_chans, hidden, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(hidden, embed_dim, kernel_size=3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.conv3 = channels_last_weight_(ConvNHWC(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, ceil(H/4), ceil(W/4), C)."""
        x = F.gelu(self.conv1(x))
        x = self.conv2(x).permute(0, 2, 3, 1)  # B, H/4, W/4, C
        x = F.gelu(self.norm(x))
        return self.conv3(x)


class AttentionFusion(nn.Module):
    """Attention Fusion and the value product: ``(attn + mix(GELU(spatial(attn)))) @ v``.

    ``spatial`` is a depthwise conv over the (kh, kw) key grid, one channel per head; ``mix`` is a 1x1 conv
    across heads. The maps arrive head-major, (B', nH, kh, kw, Nq): an NCDHW tensor with one channel per head, so
    ``spatial`` runs as one depthwise conv3d with the kernel (k, k, 1) (the query axis is a depth the kernel does
    not mix) and ``mix`` as one batched matmul over the heads. No op argument depends on the input size (kh, kw,
    Nq), so a traced or exported graph serves every size.
    """

    def __init__(self, num_heads: int, kernel_size: int = FUSION_KERNEL_SIZE, attn_drop: float = 0.) -> None:
        super().__init__()
        self.spatial = nn.Conv2d(num_heads, num_heads, kernel_size, padding=kernel_size // 2, groups=num_heads)
        self.padding = kernel_size // 2  # of the conv3d's two key axes (an attribute: TorchScript reads no globals)
        self.mix = nn.Linear(num_heads, num_heads)
        self.attn_drop = nn.Dropout(attn_drop)

    def spatial_conv(self, attn: torch.Tensor) -> torch.Tensor:
        """``spatial`` on every (head, query) map: a depthwise conv3d whose kernel (k, k, 1) leaves the query axis
        alone. Args: attn: (B', nH, kh, kw, Nq). Returns: (B', nH, kh, kw, Nq)."""
        # Flattened and viewed, not unsqueezed: a channels-last conv weight (``model.to(memory_format=channels_last)``)
        # would give a channels-last-3d kernel, and the conv would copy the attention maps to that layout and back
        # (and PyTorch's CPU bfloat16 weight gradient in that layout is garbage: tests/test_precision.py).
        w = self.spatial.weight  # nH, 1, k, k
        weight = w.flatten(1).view(list(w.shape) + [1])  # nH, 1, k, k, 1 with contiguous strides
        return F.conv3d(attn, weight, self.spatial.bias, padding=(self.padding, self.padding, 0), groups=attn.shape[1])

    def forward(self, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """
        Args:
            attn: (B', nH, kh, kw, Nq) attention weights, head-major, queries innermost.
            v: (B', nH, kh*kw, d) values.
        Returns:
            (B', nH, Nq, d)
        """
        Bq, nH, kh, kw, Nq = attn.shape
        mix_bias = self.mix.bias
        assert mix_bias is not None  # built with a bias (TorchScript needs it said)
        fused = F.gelu(self.spatial_conv(attn)).reshape(Bq, nH, kh * kw * Nq)
        attn = torch.baddbmm(attn.view(Bq, nH, kh * kw * Nq), self.mix.weight.expand(Bq, nH, nH), fused)
        attn = attn.view(Bq, nH, kh * kw, Nq).transpose(-2, -1)  # B', nH, Nq, kh*kw
        # In the attention's dtype: a float32 bias would lift everything after it out of float16 under autocast.
        mix_bias = mix_bias.to(attn.dtype)[:, None, None]  # nH, 1, 1
        if self.training and self.attn_drop.p > 0:
            return self.attn_drop(attn + mix_bias) @ v
        # mix's bias adds b_h to every weight of head h, i.e. b_h * sum(v) to every output: cheaper there.
        out = attn @ v  # B', nH, Nq, d
        return out + mix_bias * v.sum(dim=-2, keepdim=True).to(out.dtype)


def _separable_attention(logits: torch.Tensor) -> torch.Tensor:
    """SS attention on a (kh, kw) key grid: softmax along each key row times softmax along each key column.

    Args:
        logits: (..., kh, kw, Nq) query-key scores on the key grid, queries innermost.
    Returns:
        (..., kh, kw, Nq) attention weights.
    """
    return logits.softmax(dim=-2) * logits.softmax(dim=-3)


@register_notrace_module  # one node of a traced graph (a feature extractor needs none of its ~200 ops)
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
        """SS-MSA in ws x ws windows. Args: qk: (B, H, W, 2*nH_l*d). Returns: (B, H, W, nH_l*d).

        A map whose sides are not multiples of ws is zero-padded at the bottom / right (q = k = v = 0 there) and
        the padded keys are masked out of both softmaxes (see "Input sizes" in the module docstring).
        """
        B, H, W, _ = qk.shape
        ws, nH, d = self.window_size, self.local_heads, self.head_dim
        nWh, nWw = ceil_div(H, ws), ceil_div(W, ws)
        padded = size_free() or nWh * ws != H or nWw * ws != W
        real = qk  # what the padding masks are made from (no device argument: fake CUDA tensors stay fake)
        if padded:
            qk = F.pad(qk, (0, 0, 0, nWw * ws - W, 0, nWh * ws - H))  # B, nWh*ws, nWw*ws, 2*nH*d
        qk = qk.view(B, nWh, ws, nWw, ws, 2, nH, d)  # B, nWh, ws, nWw, ws, 2, nH, d
        qk = qk.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(2, -1, nH, ws, ws, d)  # 2, B*nW, nH, ws(i), ws(j), d
        q, k = qk.unbind(0)
        row, col = self._ss_scores(q, k)  # B*nW, nH, j', i, j / B*nW, nH, i', j, i
        if padded:
            row, col = self._mask_padded_keys(row, col, real[0, :, 0, 0], real[0, 0, :, 0])
        row, col = row.softmax(dim=2), col.softmax(dim=2)
        # Two hops: (i, j) -> (i, j') along its row, then (i, j') -> (i', j') along that column.
        attn = row.unsqueeze(2) * col.unsqueeze(-1)  # B*nW, nH, i', j', i, j
        attn = attn.view(-1, nH, ws, ws, ws * ws)  # B*nW, nH, ws(i'), ws(j'), N
        out = self.local_fusion(attn, k.reshape(-1, nH, ws * ws, d))  # B*nW, nH, N, d
        out = out.view(B, nWh, nWw, nH, ws, ws, d)  # B, nWh, nWw, nH, ws, ws, d
        out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nWh * ws, nWw * ws, nH * d)  # B, Hp, Wp, nH*d
        return crop(out, H, W) if padded else out  # B, H, W, nH*d

    def _mask_padded_keys(self, row: torch.Tensor, col: torch.Tensor, rows: torch.Tensor,
                          cols: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """-inf at the padded keys of the windows of an (H, W) map padded to (Hp, Wp): in the row scores the keys of
        a padded column j', in the column scores those of a padded row i'. Every row or column of a window holds a
        valid key (the padding is narrower than a window), so no softmax is all -inf.

        Args:
            row: (B*nW, nH, ws(j'), ws(i), ws(j)), col: (B*nW, nH, ws(i'), ws(j), ws(i)), as ``_ss_scores`` gives.
            rows: (H,), cols: (W,): any tensors as long as the map's real rows and columns.
        Returns:
            row, col, the same shapes, masked in place.
        """
        ws, nH = self.window_size, row.shape[1]
        H, W = rows.shape[0], cols.shape[0]
        nWh, nWw = ceil_div(H, ws), ceil_div(W, ws)
        pad_rows = F.pad(torch.zeros_like(rows, dtype=torch.bool), (0, nWh * ws - H), value=True)  # Hp
        pad_cols = F.pad(torch.zeros_like(cols, dtype=torch.bool), (0, nWw * ws - W), value=True)  # Wp
        # In place on views of the fresh score tensors (no copy): row as B, nWh, nWw, nH, j', i, j and col as
        # B, nWh, nWw, nH, i', j, i, the masks broadcast over the rest.
        row.view(-1, nWh, nWw, nH, ws, ws, ws).masked_fill_(pad_cols.view(nWw, 1, ws, 1, 1), float('-inf'))
        col.view(-1, nWh, nWw, nH, ws, ws, ws).masked_fill_(pad_rows.view(nWh, 1, 1, ws, 1, 1), float('-inf'))
        return row, col

    def _ss_scores(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The scaled SS scores of every query along its row and its column, as the official code computes them:
        ws x ws products per window row and per window column. Head-major, the softmax dim (the key) outside a
        contiguous block (fast softmax over a short dim).

        Args:
            q, k: (B*nW, nH, ws(i), ws(j), d)
        Returns:
            row: (B*nW, nH, ws(j'), ws(i), ws(j)) with row[:, h, j', i, j] the score of query (i, j), key (i, j');
            col: (B*nW, nH, ws(i'), ws(j), ws(i)) with col[:, h, i', j, i] that of query (i, j), key (i', j).
        """
        row = (q @ k.transpose(-2, -1)).mul_(self.scale)  # B*nW, nH, i, j, j'
        col = (q.transpose(-3, -2) @ k.permute(0, 1, 3, 4, 2)).mul_(self.scale)  # B*nW, nH, j, i, i'
        return row.permute(0, 1, 4, 2, 3).contiguous(), col.permute(0, 1, 4, 2, 3).contiguous()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, ..., nH_g*d) with nH_g = group_heads. Returns: (B, nH_g, L, d), L = prod(...)."""
        return x.reshape(x.shape[0], -1, self.group_heads, self.head_dim).transpose(1, 2)  # B, nH_g, L, d

    def _pooled_window(self, qk: torch.Tensor) -> torch.Tensor:
        """SS attention to one average-pooled key per ws x ws window, with fusion. A partial window at the bottom /
        right edge pools its in-bounds tokens: kh, kw = ceil(H / ws), ceil(W / ws).

        Args:
            qk: (B, H, W, 2*nH_g*d)
        Returns:
            (B, H, W, nH_g*d)
        """
        B, H, W, C2 = qk.shape
        ws = self.window_size
        q, k = qk.split(C2 // 2, dim=-1)
        k = _avg_pool_nhwc(k, (ws, ws))  # B, kh, kw, nH_g*d
        kh, kw = k.shape[1], k.shape[2]
        q, k = self._split_heads(q), self._split_heads(k)  # B, nH_g, H*W, d / B, nH_g, kh*kw, d
        logits = (k @ q.transpose(-2, -1)).mul_(self.scale)  # B, nH_g, kh*kw, H*W
        attn = _separable_attention(logits.view(B, self.group_heads, kh, kw, H * W))  # B, nH_g, kh, kw, H*W
        out = self.global_fusion(attn, k)  # B, nH_g, H*W, d
        return out.transpose(1, 2).reshape(B, H, W, -1)  # B, H, W, nH_g*d

    def _pooled_strips(self, qk: torch.Tensor, horizontal: bool) -> torch.Tensor:
        """Softmax attention to average-pooled strips ``strip_width`` thick spanning the whole map. A strip at the
        bottom (right) edge may be thinner: the mean of its in-bounds rows (columns); ceil(H / s) (ceil(W / s)) keys.

        Args:
            qk: (B, H, W, 2*nH_g*d)
        Returns:
            (B, H, W, nH_g*d)
        """
        B, H, W, C2 = qk.shape
        s = self.strip_width
        q, k = qk.split(C2 // 2, dim=-1)
        # The mean across the map, then over s rows (columns): no kernel of the map's size, which would pin a traced
        # or exported graph to it.
        if horizontal:
            k = _avg_pool_nhwc(k.mean(dim=2, keepdim=True), (s, 1))  # B, ceil(H/s), 1, nH_g*d
        else:
            k = _avg_pool_nhwc(k.mean(dim=1, keepdim=True), (1, s))  # B, 1, ceil(W/s), nH_g*d
        q, k = self._split_heads(q), self._split_heads(k)  # B, nH_g, H*W, d / B, nH_g, M, d
        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.
            out = F.scaled_dot_product_attention(q, k, k, dropout_p=dropout_p, scale=self.scale)  # B, nH_g, H*W, d
        else:
            attn = (q @ k.transpose(-2, -1)).mul_(self.scale).softmax(dim=-1)  # B, nH_g, H*W, M
            out = self.attn_drop(attn) @ k  # B, nH_g, H*W, d
        return out.transpose(1, 2).reshape(B, H, W, -1)  # B, H, W, nH_g*d

    def attend(self, qk: torch.Tensor) -> torch.Tensor:
        """Everything between ``proj_qk`` and ``proj``.

        Args:
            qk: (B, H, W, 2C), ``proj_qk`` of the normed tokens.
        Returns:
            (B, H, W, C), the GELU of the concatenated head outputs.
        """
        local_dim, group_dim = 2 * self.local_heads * self.head_dim, 2 * self.group_heads * self.head_dim
        # One split (its backward is one cat; slicing would zero-fill a full-size gradient per slice).
        local, window, strip_h, strip_v = qk.split([local_dim, group_dim, group_dim, group_dim], dim=-1)
        outs: List[torch.Tensor] = []
        if self.local_fusion is not None:  # local heads
            outs.append(self._local(local))
        if self.global_fusion is not None:  # global heads
            outs += [self._pooled_window(window),
                     self._pooled_strips(strip_h, horizontal=True),
                     self._pooled_strips(strip_v, horizontal=False)]
        return F.gelu(torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0])  # B, H, W, C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C) normed tokens. Returns: (B, H, W, C)."""
        return self.proj_drop(self.proj(self.attend(self.proj_qk(x))))


@register_notrace_module  # one node of a traced graph
class ConvMlp(nn.Module):
    """LN -> depthwise 3x3 -> pointwise expand -> GELU -> depthwise 7x7 -> pointwise reduce. NHWC in and out."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dwconv = channels_last_weight_(
            ConvNHWC(dim, dim, MLP_KERNEL_SIZE, padding=MLP_KERNEL_SIZE // 2, groups=dim))  # channels-last input
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.hidden_dwconv = channels_last_weight_(ConvNHWC(hidden_dim, hidden_dim, MLP_HIDDEN_KERNEL_SIZE,
                                                            padding=MLP_HIDDEN_KERNEL_SIZE // 2, groups=hidden_dim))
        self.pwconv2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H, W, C)."""
        x = F.gelu(self.pwconv1(self.dwconv(self.norm(x))))
        return self.drop(self.pwconv2(self.hidden_dwconv(x)))



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
            attn_layer: Callable[..., nn.Module] = MultiGranularityAttention,
            mlp_layer: Callable[..., nn.Module] = ConvMlp,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = attn_layer(
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
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(x))


class PatchMerging(nn.Module):
    """Halve H and W (odd sides round up), double C: conv path plus pooled shortcut, sharing one LayerNorm. NHWC in
    and out. The stride-2 conv (padding 1) gives ceil(H/2) x ceil(W/2); so does the shortcut's 2x2 pool
    (``ceil_mode``: on an odd side the last row / column is the mean of its in-bounds elements)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.dwconv = channels_last_weight_(ConvNHWC(  # channels-last input
            dim, dim, MERGE_KERNEL_SIZE, stride=MERGE_STRIDE, padding=MERGE_KERNEL_SIZE // 2, groups=dim))
        self.stride = MERGE_STRIDE  # of the shortcut's pool too (an attribute: TorchScript reads no globals)
        self.pwconv1 = nn.Linear(dim, out_dim)
        self.pwconv2 = nn.Linear(out_dim, out_dim)
        self.shortcut = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, ceil(H/2), ceil(W/2), 2C)."""
        shortcut = self.shortcut(self.norm(_avg_pool_nhwc(x, (self.stride, self.stride))))  # B, H/2, W/2, 2C
        x = self.dwconv(self.norm(x))  # B, H/2, W/2, C (sides rounded up)
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
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, H/2, W/2, 2C), or (B, H, W, C) in the last stage."""
        x = self.forward_blocks(x)
        return x if self.downsample is None else self.downsample(x)


def _check_geometry(img_size: tuple[int, int], window_size: int) -> None:
    """Raise ValueError unless the sides of ``img_size`` and ``window_size`` are positive (any such pair works)."""
    if any(side < 1 for side in img_size):
        raise ValueError(f'img_size {img_size}: height and width must be positive')
    if window_size < 1:
        raise ValueError(f'window_size must be positive, got {window_size}')


def _global_heads(num_heads: int, ratio: float, stage: int) -> int:
    """Number of globally attending heads: ``num_heads * ratio``, which must be a multiple of 3."""
    exact = num_heads * ratio
    heads = round(exact)
    if not 0. <= ratio <= 1. or abs(exact - heads) > 1e-6 or heads % NUM_GLOBAL_GROUPS:
        raise ValueError(f'stage {stage}: global_ratio {ratio} of {num_heads} heads must give a whole multiple of '
                         f'{NUM_GLOBAL_GROUPS} global heads (window / horizontal strip / vertical strip), '
                         f'got {exact:g}')
    return heads


@register_notrace_function  # one node of a traced graph, so that it checks the real input size there
def check_input_size(H: int, W: int) -> None:
    """Raise ValueError unless the input's height and width are positive (every positive size is taken)."""
    if H < 1 or W < 1:
        raise ValueError(f'input {H}x{W}: height and width must be positive')


class MGSSAF(nn.Module):
    """MG-SSAF backbone and classifier, with timm's model API. Takes NCHW images; stages run NHWC.

    ``forward_features`` gives the normed last-stage map, NHWC (``output_fmt``), (B, H/32, W/32, C);
    ``forward_head`` pools it (``global_pool='avg'``), applies ``head_hidden`` (the official 1x1 conv, 1280 wide)
    and GELU -- the official ``forward_features`` output, the pre-logits -- and the classifier.
    ``forward_intermediates`` gives the maps of the stages (timm's signature and return value).
    """

    def __init__(
            self,
            img_size: _IntPair = 224,
            patch_size: int = STEM_STRIDE,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
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
            attn_layer: Callable[..., nn.Module] = MultiGranularityAttention,
            mlp_layer: Callable[..., nn.Module] = ConvMlp,
    ) -> None:
        """
        Args:
            img_size: nominal input (H, W) or side (timm's cfg; ``forward`` takes any positive size, see "Input
                sizes" in the module docstring).
            patch_size: stride of the conv stem; must be 4 (two stride-2 convs).
            num_classes: classifier outputs; 0 for no classifier (``forward`` returns the pre-logits).
            global_pool: 'avg' or '' (no pooling: ``forward`` returns a map, head_hidden / head per position).
            global_ratio: per stage, the share of heads attending to pooled keys (0 = all local).
            width: per stage, thickness of the pooled horizontal / vertical strips (used where ratio > 0).
            window_size: side of the local windows and of the pooled windows.
            head_hidden_dim: width of the 1x1 conv between pooling and classifier.
            fused_attn: use ``scaled_dot_product_attention`` for the strip heads (exact; False: matmuls).
            attn_layer: the attention class of every block (see "Swapping parts" in the module docstring).
            mlp_layer: the MLP class of every block.
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
        _check_pool(global_pool)
        self.width, self.global_ratio = tuple(width), tuple(global_ratio)
        self.img_size = to_2tuple(img_size)
        _check_geometry(self.img_size, window_size)
        self.size_multiple = 1  # every input side is taken (timm's min_input_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'  # of forward_features
        self.window_size = window_size
        dims = [embed_dim * MERGE_STRIDE ** i for i in range(num_stages)]
        self.num_features = dims[-1]
        self.head_hidden_size = self.head_hidden_dim = head_hidden_dim
        # module: the map's block (for timm's hook / fx feature extractors; features_only uses forward_intermediates)
        self.feature_info = [dict(num_chs=dims[i], reduction=STEM_STRIDE * MERGE_STRIDE ** i,
                                  module=f'layers.{i}.blocks.{depths[i] - 1}') for i in range(num_stages)]

        self.patch_embed = StemConv(in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()  # stochastic depth, per block
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
                attn_layer=attn_layer,
                mlp_layer=mlp_layer,
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

    # ------------------------------------------------------------------------------------------- timm model API
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
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order (timm's layer-wise LR decay): the stem, then each block; a stage's
        PatchMerging and the final norm join the group of the block before them (timm's 99999 suffix);
        head_hidden and the classifier last."""
        return dict(
            stem=r'^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.downsample', (99999,)),
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0``: none; ``forward`` then returns the pre-logits), on the
        model's device and dtype and in its train/eval mode; ``global_pool`` ('avg' or '') if given."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = (nn.Linear(self.head_hidden_size, num_classes, **get_device_dtype(self))
                     if num_classes > 0 else nn.Identity())
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=.02)
            nn.init.zeros_(self.head.bias)
        self.head.train(self.training)

    def set_input_size(self, img_size: Optional[_IntPair] = None, window_size: Optional[int] = None) -> None:
        """Change the nominal input size and/or the window size (no weight depends on either; the pooled windows
        and strips follow the grid). ``forward`` takes any positive size anyway. Raises ValueError (the model
        unchanged) for a side or window below 1."""
        hw = self.img_size if img_size is None else to_2tuple(img_size)
        ws = self.window_size if window_size is None else window_size
        _check_geometry(hw, ws)
        for m in self.modules():
            if isinstance(m, MultiGranularityAttention):
                m.window_size = ws
        self.img_size, self.window_size = hw, ws
        update_model_input_size(self, hw, window_size=ws)

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """Convert an official or our state_dict to ours; returns it and the unused official keys it dropped."""
        return convert_official_state_dict(state_dict)

    # ------------------------------------------------------------------------------------------- forward passes
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, ceil(H/4), ceil(W/4), C). Any positive size, not only img_size."""
        check_input_size(x.shape[-2], x.shape[-1])
        return self.pos_drop(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, ceil(H/32), ceil(W/32), C), the normed last-stage map (NHWC)."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: x: (B, h, w, C) from forward_features. Returns: (B, num_classes) logits, or the pre-logits
        (B, head_hidden_dim) after dropout if ``pre_logits``; with global_pool='' per position, (B, h, w, ...)."""
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))  # B, C
        x = self.head_drop(F.gelu(self.head_hidden(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, C_in, H, W). Returns: (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Multi-scale features for dense heads (timm's API, as its Swin).

        Args:
            x: (B, C_in, H, W) images.
            indices: stages to return: the last n if an int, these (negative from the end) if a list, all if None.
            norm: apply the final norm to the last stage's map.
            stop_early: run no stage after the last one asked for.
            output_fmt: 'NCHW' or 'NHWC' maps.
            intermediates_only: return the maps only.

        Returns:
            (final, maps), or maps: stage i's map is the output of its blocks, before its PatchMerging,
            (B, C_i, ceil(H / s_i), ceil(W / s_i)) in NCHW with strides s_i = 4, 8, 16, 32 and
            C_i = embed_dim * 2**i; NCHW
            maps are channels-last in memory (``.contiguous()`` if a consumer needs NCHW strides). ``final`` is
            ``forward_features(x)``, or the last computed stage's map (NHWC) if stopped early.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stop = max_index if stop_early else last
        x = self._embed(x)
        intermediates = []
        for i, stage in enumerate(self.layers[:stop + 1]):
            x = stage.forward_blocks(x)
            if i in take_indices:
                fmap = self.norm(x) if norm and i == last else x
                intermediates.append(fmap.permute(0, 3, 1, 2) if output_fmt == 'NCHW' else fmap)  # B, C, H, W
            if i < stop and stage.downsample is not None:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if stop == last else x), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and that stage's PatchMerging), and the final norm /
        head (``head_hidden`` and the classifier) if asked (always when stages are dropped). Returns the absolute
        indices kept (timm's API)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.head_hidden = nn.Identity()
            self.head_hidden_size = self.num_features
            self.reset_classifier(0, '')
        return take_indices


def _check_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')


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


# T/S/B as data; window 7, width (0, 2, 2, 0), head 1280 are the constructor's defaults.
_VARIANTS = {
    'tiny': dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), global_ratio=(0., 0.5, 0.5, 0.),
                 drop_path_rate=0.2),
    'small': dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), global_ratio=(0., 0.5, 0.5, 0.),
                  drop_path_rate=0.2),
    'base': dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), global_ratio=(0., 0.75, 0.75, 0.),
                 drop_path_rate=0.3),
}
_RELEASED_FILES = {'tiny': 'MG-SSAF-T.pth', 'small': 'MG-SSAF-S.pth', 'base': 'MG-SSAF-B.pth'}
_NUM_STAGES = 4  # the constructor's default, for the cfgs


def _cfg(variant: str) -> dict[str, Any]:
    side = TRAIN_SIZE // (STEM_STRIDE * MERGE_STRIDE ** (_NUM_STAGES - 1))  # the last stage's grid: 7 at 224
    return pretrained_cfg(
        size_multiple=1,  # any input size
        pool_size=(side, side),
        first_conv='patch_embed.conv1',
        license='mit',
        origin_url='https://github.com/shuaiyang11/MG-SSAF',
        paper_name='MG-SSAF: An advanced vision Transformer (J. Vis. Commun. Image Represent., 2025)',
        weights=f'the released {_RELEASED_FILES[variant]}, official layout, linked from the official README',
    )


default_cfgs = generate_default_cfgs({f'mg_ssaf_{v}.in1k': _cfg(v) for v in _VARIANTS})


def _create_mg_ssaf(variant: str, pretrained: bool, **kwargs: Any) -> MGSSAF:
    """The variant through timm's ``build_model_with_cfg`` (``models.pretrained.create``); kwargs override the
    variant's defaults, unknown ones raise TypeError."""
    return create(MGSSAF, f'mg_ssaf_{variant}', pretrained, _NUM_STAGES, **{**_VARIANTS[variant], **kwargs})


@register_model
def mg_ssaf_tiny(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-T (19.6M params)."""
    return _create_mg_ssaf('tiny', pretrained, **kwargs)


@register_model
def mg_ssaf_small(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-S (32.5M params)."""
    return _create_mg_ssaf('small', pretrained, **kwargs)


@register_model
def mg_ssaf_base(pretrained: bool = False, **kwargs: Any) -> MGSSAF:
    """MG-SSAF-B (55.9M params)."""
    return _create_mg_ssaf('base', pretrained, **kwargs)
