"""MSG-Transformer: window attention whose windows talk through messenger (MSG) tokens.

Paper: Jiemin Fang, Lingxi Xie, Xinggang Wang, Xiaopeng Zhang, Wenyu Liu, Qi Tian, "MSG-Transformer:
Exchanging Local Spatial Information by Manipulating Messenger Tokens", CVPR 2022 (arXiv:2105.15168).
Official code: github.com/hustvl/MSG-Transformer (models/msg_transformer.py); this is an independent
implementation of the same function with the same state_dict, so official checkpoints load strictly.

What it computes
----------------
* Stem: a 7x7 conv with stride ``patch_size`` (overlapping patches) + LayerNorm gives a patch map of
  (H, W) = img / patch_size tokens.
* Every window of ws x ws patches carries one MSG token (token 0), so a stage holds (B, nW, N, C) tokens.
  At the first stage every group of gs x gs windows starts from the learned ``msg_tokens`` (one per window
  of a group, shared by all groups).
* Block: pre-norm window attention over the N tokens of each window with a relative-position bias between
  patches plus two learned per-head biases (``rel_pos_msg[:, 0]``: patch -> MSG, ``rel_pos_msg[:, 1]``:
  MSG -> every token), residual; then the MSG tokens are shuffled inside each group of G = gs*gs windows
  (channel chunk j of window i's MSG moves to chunk i of window j; ``manip_type='shuf'``); then a pre-norm
  MLP, residual.
* Between stages one 3x3 stride-2 conv + LayerNorm (shared weights) halves the patch map and, separately,
  the MSG map (the MSG tokens laid out as an (H/ws, W/ws) map). The window side stays ws, so each stage has
  4x fewer windows; the groups are re-cut with the next stage's gs.
* Head: final LayerNorm of the last stage's MSG tokens, mean over that stage's windows, linear classifier.
  At 224 (ws 7) the last stage is one window, so this is exactly the official output; the official code
  returns one row per window at larger sizes, this averages them. In timm's terms ``forward_features`` gives the
  normed MSG tokens as a (B, H/ws, W/ws, C) map (H, W the last stage's patch grid; 1 x 1 at 224) and
  ``forward_head`` pools it; ``forward_head(..., pre_logits=True)`` is the official ``forward_features``.

Layout
------
NCHW at the input, NHWC maps between the stem / downsample convs and the windows, (B, nW, N, C) token
tensors inside stages with the batch leading (so ``DropPath`` drops per image; the official batches
groups of windows and so drops per group wherever a stage has several, e.g. the first stage at 224: a
training-time difference only). Windows
are ordered group by group (``models.layers.window_partition`` with ``group_size=gs``), so each group
is G consecutive windows.

Abbreviations: B batch, C channels, H/W map height/width in tokens, ws window side, N = 1 + ws*ws tokens
per window, nW windows per image, nH heads, hd head dim, gs shuffle group side (``shuffle_size``),
G = gs*gs windows per group, nG groups per image.

Input sizes
-----------
Any size (the padding scheme of Swin's detection and segmentation forks, with the padding keys masked):

* the image is zero-padded at the bottom and right to whole patches, so the first patch map is
  ceil(H / patch_size) x ceil(W / patch_size);
* each stage zero-pads its patch map to whole shuffle groups of windows (multiples of ws * gs); a window that holds
  no real patch gets a zero MSG token (at the first stage the learned one, as every group does). In the attention
  the padding patches are masked out as keys (-inf), so real tokens and MSG tokens never read them; padded windows'
  MSG tokens are part of the function (they take part in the shuffle of their group);
* after each stage the maps are cropped back to the real patches and to the MSG tokens of the windows that hold
  one (ceil(H / ws) x ceil(W / ws)); the 3x3 stride-2 downsample conv (padding 1) halves odd sides upwards;
* so the stage maps are ceil(H / (patch_size * 2**i)) on each side: strides 4, 8, 16, 32 for the released models.

Sizes that are multiples of ``size_multiple(patch_size, ws, shuffle_size)`` (224 for the released models) need no
padding: nothing is padded or masked and the function is the official one. Masking costs little at detection size
(MSG-T, 800x1344, batch 2: +8% forward time, +8% saved-for-backward bytes under fp16; docs/dense.md) and makes
each real token's output independent of how much padding the grid needed. Tracing and exporting take the padded
path at every size (``size_free``), so a traced or exported graph holds at other sizes. ``ape=True`` fixes the size
to ``img_size`` (its position table); the official ``ape=True`` fails: it adds its (1, H*W, C) table to an NHWC
map; here the table is viewed as (1, H, W, C), with the official parameter shape.

Gradients
---------
Every parameter is in the graph of the logits, but in the very last block the patch queries' biases (its
``relative_position_bias_table`` and ``rel_pos_msg[:, 0]``) only reach patch tokens the head discards, so
their gradient is exactly zero (as in the official model); ``forward_intermediates`` does use them.

Shortcuts (exact, same function)
--------------------------------
* The head reads only the last stage's MSG tokens, so ``forward`` / ``forward_features`` run the very last
  block for the MSG query rows only (keys and values from every token; ``msg_only``; ``msg_rows_only = False`` on
  the model turns it off, as ``models.cost`` does to count the official MACs). ``forward_intermediates`` runs it in
  full where it returns the last stage's map (and, for its final features, once more for the MSG rows: they are
  then ``forward_features``' bit for bit). With ``drop_rate > 0`` that block's dropout draws masks for fewer rows.
* The downsample convs, which read channels-last views, keep channels-last weights (no reorder per call).
* Faster CPU implementations of the stock blocks live apart (``models/cpu``) and are installed on a built model by
  ``models.cpu.install``; this file is the reference and the GPU path.

Swapping parts
--------------
``attn_layer`` (default ``MessengerAttention``) and ``mlp_layer`` (default timm's ``Mlp``) are the classes each
block builds: ``attn_layer(dim, num_heads, window_size, qkv_bias=, qk_scale=, attn_drop=, proj_drop=, fused_attn=)``
whose ``forward(x, msg_only=False, key_mask=None)`` maps (B, nW, N, C) normed tokens to (B, nW, N or 1, C)
(``key_mask``: (nW, N) bool, False on the padding keys it must mask, at sizes that need padding; "Input sizes"), and
``mlp_layer(in_features=, hidden_features=, act_layer=, drop=)``. ``timm.create_model(name, attn_layer=MyAttention)``
passes them through.

Weight decay
------------
``no_weight_decay()`` follows the official recipe by default: the official lists ``'msg_token'``, which matches no
parameter, so the MSG tokens are decayed, and the published accuracies were trained that way. With
``decay_msg_tokens=False`` (config ``MODEL.MSG.DECAY_MSG_TOKENS False``) they are exempt, the evident intent, like
``cls_token`` / ``pos_embed`` in DeiT/Swin (gs_0**2 * C = 16 * C numbers). ``'absolute_pos_embed'`` is exempt (with
ape), and ``no_weight_decay_keywords()`` is the official ``{'relative_position_bias_table', 'rel_pos_msg'}``.
"""

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_device_dtype, register_notrace_function, register_notrace_module, resample_abs_pos_embed
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .build import register_model_type
from .layers import (DropPath, Mlp, ceil_div, channels_last_weight_, crop, relative_position_index, size_free,
                     to_2tuple, trunc_normal_, window_partition, window_reverse)
from .pretrained import (TRAIN_SIZE, checkpoint_filter_fn, create, pretrained_cfg, resize_rel_pos_table,
                         update_model_input_size)  # timm's tests look checkpoint_filter_fn up in this module

__all__ = ['MSGTransformer', 'build_msg', 'checkpoint_filter_fn']

PATCH_EMBED_KERNEL = 7   # official stem: 7x7 conv, stride patch_size
MERGE_KERNEL = 3         # downsample conv between stages: 3x3, stride 2, padding 1 (halves even sizes)
MERGE_STRIDE = 2
INIT_STD = .02           # trunc-normal std of linear weights, bias tables and MSG tokens (official)
MANIP_TYPES = ('shuf', 'none')


# The in-place writes below are one node each for torch.fx (``register_notrace_function``): traced op by op,
# their writes would have no output and timm's feature extraction would drop them as dead code.
@register_notrace_function
def shuffle_msg_(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Shuffle the MSG tokens inside each group of G = gs*gs windows, writing into ``x``.

    Channel chunk j (of C/G channels) of window i's MSG goes to chunk i of window j. ``x`` must be a
    fresh tensor (nothing else holds it); only its MSG rows are rewritten, instead of copying all tokens.

    Args:
        x: (B, nW, N, C), token 0 of each window is its MSG.
        group_size: gs.

    Returns:
        ``x``.
    """
    G = group_size * group_size
    if G == 1:
        return x
    B, nW, _, C = x.shape
    msg = x[:, :, 0].reshape(B, nW // G, G, G, C // G)  # B, nG, G (window), G (chunk), C/G
    x[:, :, 0] = msg.transpose(2, 3).reshape(B, nW, C)  # B, nW, C (a copy: the transpose is not viewable)
    return x


@register_notrace_function
def window_tokens(patches: torch.Tensor, msgs: torch.Tensor, window_size: int, group_size: int) -> torch.Tensor:
    """Windows with their MSG tokens in front, written in one pass (no partition copy then concatenation).

    Same as ``torch.cat((window_partition(msg_map, 1, gs), window_partition(patches, ws, gs)), dim=2)``.

    Args:
        patches: (B, H, W, C) patch map.
        msgs: the (H/ws, W/ws) MSG map split into groups, (B, H/(ws*gs), gs, W/(ws*gs), gs, C), or a tensor
            that broadcasts to it (e.g. (1, 1, gs, 1, gs, C): every group alike).
        window_size: ws.
        group_size: gs.

    Returns:
        (B, nW, 1 + ws*ws, C), windows in ``window_partition`` order, token 0 of each its MSG.
    """
    B, H, W, C = patches.shape
    ws, gs = window_size, group_size
    nGh, nGw = H // (ws * gs), W // (ws * gs)
    out = patches.new_empty(B, nGh * nGw * gs * gs, 1 + ws * ws, C)  # B, nW, N, C
    # The explicit expand (a view: same speed) is for the ONNX exporter, whose copy_ keeps the source's shape
    # instead of broadcasting it (onnxscript's aten_copy is CastLike(src, self)): the first stage's shared MSG
    # tokens (batch 1, not B) met a Reshape to (B, nW, C), and ONNX Runtime rejected the file.
    out[:, :, 0].view(B, nGh, nGw, gs, gs, C).copy_(msgs.expand(B, nGh, gs, nGw, gs, C).permute(0, 1, 3, 2, 4, 5))
    out[:, :, 1:].view(B, nGh, nGw, gs, gs, ws, ws, C).copy_(
        patches.view(B, nGh, gs, ws, nGw, gs, ws, C).permute(0, 1, 4, 2, 5, 3, 6, 7))
    return out


@register_notrace_function  # one node of a traced graph: it branches on the map's size
def stage_tokens(patches: torch.Tensor, msgs: torch.Tensor, window_size: int,
                 group_size: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A stage's windows over its patch map padded to whole groups, the MSG tokens in front, and the key mask.

    Args:
        patches: (B, H, W, C) patch map.
        msgs: (B, ceil(H/ws), ceil(W/ws), C) MSG map (one token per window that holds a real patch), or a
            (1, 1, gs, 1, gs, C) tensor, one group's MSG map shared by all groups (the first stage).
        window_size: ws.
        group_size: gs.

    Returns:
        tokens (B, nW, 1 + ws*ws, C) over the map zero-padded at the bottom and right to (Hp, Wp), H and W rounded
        up to multiples of ws*gs; the MSG map zero-padded alike (the first stage's shared map covers every group).
        key_mask (nW, 1 + ws*ws) bool, False on the padding patches; None if nothing is padded.
    """
    B, H, W, C = patches.shape
    ws, gs = window_size, group_size
    if not size_free() and H % (ws * gs) == 0 and W % (ws * gs) == 0:
        key_mask = None
    else:
        Hp, Wp = ceil_div(H, ws * gs) * ws * gs, ceil_div(W, ws * gs) * ws * gs
        real = F.pad(torch.ones_like(patches[:1, :, :, :1], dtype=torch.bool), (0, 0, 0, Wp - W, 0, Hp - H))
        key_mask = F.pad(window_partition(real, ws, gs)[0, :, :, 0], (1, 0), value=True)  # nW, N
        patches = F.pad(patches, (0, 0, 0, Wp - W, 0, Hp - H))  # B, Hp, Wp, C
        if msgs.dim() == 4:
            msgs = F.pad(msgs, (0, 0, 0, Wp // ws - msgs.shape[2], 0, Hp // ws - msgs.shape[1]))
    if msgs.dim() == 4:  # B, Hp/ws, Wp/ws, C -> grouped
        B, h, w, C = msgs.shape
        msgs = msgs.view(B, h // gs, gs, w // gs, gs, C)
    return window_tokens(patches, msgs, ws, gs), key_mask


@register_notrace_function
def patch_map(tokens: torch.Tensor, H: int, W: int, window_size: int, group_size: int) -> torch.Tensor:
    """The real patches of a stage's tokens (``stage_tokens``' inverse). Returns: (B, H, W, C)."""
    ws, gs = window_size, group_size
    Hp, Wp = ceil_div(H, ws * gs) * ws * gs, ceil_div(W, ws * gs) * ws * gs
    x = window_reverse(tokens[:, :, 1:], ws, Hp, Wp, gs)  # B, Hp, Wp, C
    if not size_free() and Hp == H and Wp == W:
        return x
    return crop(x, H, W)


@register_notrace_function
def msg_map(tokens: torch.Tensor, H: int, W: int, window_size: int, group_size: int) -> torch.Tensor:
    """The MSG tokens of the windows that hold a real patch. Returns: (B, ceil(H/ws), ceil(W/ws), C)."""
    ws, gs = window_size, group_size
    Hp, Wp = ceil_div(H, ws * gs) * ws * gs, ceil_div(W, ws * gs) * ws * gs
    h, w = ceil_div(H, ws), ceil_div(W, ws)
    x = window_reverse(tokens[:, :, :1], 1, Hp // ws, Wp // ws, gs)  # B, Hp/ws, Wp/ws, C
    if not size_free() and Hp // ws == h and Wp // ws == w:
        return x
    return crop(x, h, w)


def padded_bias(bias: torch.Tensor, key_mask: Optional[torch.Tensor], batch: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of a window attention: the bias, with -inf on each window's padding keys if any.

    Args:
        bias: (nH, Nq, N), the same for every window.
        key_mask: (nW, N) bool, False on padding keys (never the MSG key, so no row is all -inf); or None.
        batch: B.
        dtype: the attention's dtype (a padded mask is per window: made in it, not cast after the copy).

    Returns:
        (1, nH, Nq, N) without key_mask, else (B*nW, nH, Nq, N) (SDPA on a GPU fuses 4-D masks only).
    """
    if key_mask is None:
        return bias.unsqueeze(0)  # 4-D (with a 3-D mask the CPU dispatcher takes the slow math kernel)
    nW, N = key_mask.shape
    masked = bias.to(dtype).expand(nW, -1, -1, -1).masked_fill(~key_mask.view(nW, 1, 1, N), float('-inf'))
    return masked.expand(batch, -1, -1, -1, -1).reshape(batch * nW, bias.shape[0], bias.shape[1], N)


class PatchEmbed(nn.Module):
    """Overlapping stem: 7x7 conv with stride patch_size, then (optionally) LayerNorm. NCHW in, NHWC out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool) -> None:
        super().__init__()
        # (kernel - patch + 1) // 2 makes the grid exactly img / patch (the official's 2 for patch 4).
        self.proj = nn.Conv2d(in_chans, embed_dim, PATCH_EMBED_KERNEL, stride=patch_size,
                              padding=(PATCH_EMBED_KERNEL - patch_size + 1) // 2)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: (B, H/patch, W/patch, C), contiguous."""
        # (contiguous first: LayerNorm copies a permuted input anyway, and Identity must return a contiguous map)
        return self.norm(self.proj(x).permute(0, 2, 3, 1).contiguous())  # B, H, W, C


@register_notrace_module  # one node of a traced graph (a feature extractor needs none of its ops)
class MessengerAttention(nn.Module):
    """Multi-head self-attention inside each window of 1 MSG + ws*ws patch tokens.

    The additive bias is the Swin relative-position bias between patches, ``rel_pos_msg[:, 0]`` on every
    patch query's MSG key and ``rel_pos_msg[:, 1]`` on every key of the MSG query (official layout).
    ``fused_attn`` runs ``F.scaled_dot_product_attention`` with the bias as a float mask (on a GPU a fused kernel
    that also returns the bias gradient); otherwise plain matmuls + softmax (the same function).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.fused_attn = fused_attn

        num_rel = (2 * window_size - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))  # (2ws-1)^2, nH
        self.rel_pos_msg = nn.Parameter(torch.zeros(num_heads, 2, 1, 1))  # nH, (patch->MSG, MSG->all), 1, 1
        self._init_index()

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _init_index(self) -> None:
        """The index buffers of ``window_size``, on the table's device."""
        num_heads, device = self.num_heads, self.relative_position_bias_table.device
        num_rel = (2 * self.window_size - 1) ** 2
        index = relative_position_index(self.window_size).to(device)  # ws*ws, ws*ws
        # Persistent only so that official checkpoints (which carry it) load strictly.
        self.register_buffer('relative_position_index', index)
        # Every (head, query, key) of the N tokens as an index into the flattened parameters
        # [relative_position_bias_table (num_rel, nH); rel_pos_msg (nH, 2)]. Flat, so that the parameters' gradients
        # come back in their own layout (a transposed table would hand DDP a gradient of other strides).
        pair = F.pad(index, (1, 0, 1, 0), value=-1)  # N, N; row 0 = MSG query (-1), column 0 = MSG key (-2)
        pair[1:, 0] = -2
        heads = torch.arange(num_heads, device=device).view(num_heads, 1, 1)
        bias_index = torch.where(pair >= 0, pair * num_heads + heads,  # table[offset, h]
                                 num_rel * num_heads + heads * 2 + (pair == -1).long())  # rel_pos_msg[h, 0 or 1]
        self.register_buffer('bias_index', bias_index.flatten(), persistent=False)  # nH*N*N

    @torch.jit.ignore
    def set_window_size(self, window_size: int) -> None:
        """Another window: the relative-position table resized bicubically (as loading weights of another window
        does, ``models.pretrained.fit_state_dict``), the index buffers recomputed."""
        old = self.relative_position_bias_table
        with torch.no_grad():
            table = resize_rel_pos_table(old, (2 * window_size - 1) ** 2)  # (2ws-1)^2, nH
        self.relative_position_bias_table = nn.Parameter(table, requires_grad=old.requires_grad)
        self.window_size = window_size
        self._init_index()

    def attn_bias(self) -> torch.Tensor:
        """Returns: (nH, N, N) additive attention bias."""
        N = self.window_size * self.window_size + 1
        table = torch.cat((self.relative_position_bias_table.reshape(-1), self.rel_pos_msg.reshape(-1)))
        return table.index_select(0, self.bias_index).view(self.num_heads, N, N)  # nH, N, N

    def attend(self, qkv: torch.Tensor, msg_only: bool = False,
               key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention output before ``proj``.

        Args:
            qkv: (B, nW, N, 3C), ``qkv`` of the normed tokens.
            msg_only: queries of the MSG tokens only (keys and values from all tokens); exact for those rows.
            key_mask: (nW, N) bool, False on the padding keys of each window (see ``padded_bias``); None: none.

        Returns:
            (B, nW, Nq, C) with Nq = 1 if msg_only else N.
        """
        B, nW, N, C3 = qkv.shape
        C = C3 // 3
        qkv = qkv.view(B * nW, N, 3, self.num_heads, C // self.num_heads)  # B*nW, N, 3, nH, hd
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B*nW, nH, N, hd
        bias = self.attn_bias()  # nH, N, N
        if msg_only:  # the MSG query row; the full bias keeps every bias parameter in the graph (zero gradient)
            q, bias = q[:, :, :1], bias[:, :1]  # B*nW, nH, 1, hd; nH, 1, N
        Nq = q.shape[2]
        mask = padded_bias(bias, key_mask, B, q.dtype)  # 1 or B*nW, nH, Nq, N
        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + mask  # B*nW, nH, Nq, N
            x = self.attn_drop(attn.softmax(dim=-1)) @ v  # B*nW, nH, Nq, hd
        return x.transpose(1, 2).reshape(B, nW, Nq, C)  # B, nW, Nq, C

    def forward(self, x: torch.Tensor, msg_only: bool = False,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: x: (B, nW, N, C) normed tokens, msg_only and key_mask: see ``attend``.
        Returns: (B, nW, N or 1, C)."""
        return self.proj_drop(self.proj(self.attend(self.qkv(x), msg_only, key_mask)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, '
                f'fused_attn={self.fused_attn}')


class MSGBlock(nn.Module):
    """Pre-norm window attention, MSG shuffle, pre-norm MLP. Tokens (B, nW, N, C) in and out."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            shuffle_size: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            fused_attn: bool = True,
            attn_layer: Callable[..., nn.Module] = MessengerAttention,
            mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.shuffle_size = shuffle_size  # 1: no shuffle (manip_type 'none' or a one-window group)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn_layer(dim, num_heads, window_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=drop, fused_attn=fused_attn)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor, msg_only: bool = False,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: x: (B, nW, N, C); msg_only: return the MSG tokens only, (B, nW, 1, C), computing attention
        outputs, projection and MLP for those rows only (exact: tokens only mix inside the attention);
        key_mask: (nW, N) bool, False on padding keys (``stage_tokens``), or None."""
        res = x[:, :, :1] if msg_only else x  # B, nW, Nq, C
        x = res + self.drop_path(self.attn(self.norm1(x), msg_only, key_mask))  # fresh: the shuffle may write into it
        x = shuffle_msg_(x, self.shuffle_size)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """Halve the patch map and the MSG map with one shared 3x3 stride-2 conv + LayerNorm (C -> 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = channels_last_weight_(
            nn.Conv2d(dim, 2 * dim, MERGE_KERNEL, MERGE_STRIDE, padding=MERGE_KERNEL // 2))  # channels-last input
        self.stride = MERGE_STRIDE  # an attribute: TorchScript reads no globals
        self.norm = nn.LayerNorm(2 * dim)

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, H, W, C). Returns: (B, ceil(H/2), ceil(W/2), 2C)."""
        # The NHWC tensor seen as NCHW is channels_last, which the conv keeps: both permutes are free.
        x = self.reduction(x.permute(0, 3, 1, 2))  # B, 2C, H/2, W/2
        return self.norm(x.permute(0, 2, 3, 1))  # B, H/2, W/2, 2C

    def forward(self, patches: torch.Tensor, msgs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Args: patches: (B, H, W, C) patch map, msgs: (B, h, w, C) MSG map.
        Returns: both halved (rounded up: the conv pads by 1), with 2C channels."""
        return self._reduce(patches), self._reduce(msgs)


class MSGStage(nn.Module):
    """``depth`` MSG blocks, and (except for the last stage) the downsample to the next stage.

    Tokens are ordered in groups of shuffle_size x shuffle_size windows; ``shuffle_msgs`` says whether the
    blocks shuffle MSG tokens inside those groups (manip_type 'shuf') or not ('none'). ``forward`` runs the
    blocks only: the model reads the stage's output map before it applies ``downsample`` (which lives here
    for the official state_dict names, ``layers.i.downsample``).
    """

    def __init__(
            self,
            dim: int,
            depth: int,
            num_heads: int,
            window_size: int,
            shuffle_size: int,
            next_shuffle_size: Optional[int],
            shuffle_msgs: bool,
            mlp_ratio: float,
            qkv_bias: bool,
            qk_scale: Optional[float],
            drop: float,
            attn_drop: float,
            drop_path: Sequence[float],
            fused_attn: bool,
            attn_layer: Callable[..., nn.Module] = MessengerAttention,
            mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.group_size = shuffle_size  # window grouping of the token order, also with shuffle_msgs=False
        self.blocks = nn.ModuleList([
            MSGBlock(dim, num_heads, window_size, shuffle_size if shuffle_msgs else 1, mlp_ratio=mlp_ratio,
                     qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i],
                     fused_attn=fused_attn, attn_layer=attn_layer, mlp_layer=mlp_layer)
            for i in range(depth)])
        self.downsample = None if next_shuffle_size is None else PatchMerging(dim)

    def forward(self, x: torch.Tensor, msg_only: bool = False,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args: x: (B, nW, N, C); msg_only: the last block returns the MSG tokens only; key_mask: see
        ``stage_tokens``. Returns: (B, nW, N, C), or (B, nW, 1, C) with msg_only."""
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(block, x, msg_only=msg_only and i == last, key_mask=key_mask, use_reentrant=False)
            else:
                x = block(x, msg_only=msg_only and i == last, key_mask=key_mask)
        return x

    @torch.jit.unused
    def forward_twice_last(self, x: torch.Tensor,
                           key_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The blocks, the last one both in full and for the MSG rows only.

        ``forward_intermediates`` takes the patch map from the first and the final features from the second,
        so that these are ``forward_features``' bit for bit (the MSG-only block rounds differently).

        Args: x: (B, nW, N, C), key_mask: see ``stage_tokens``. Returns: (B, nW, N, C) and (B, nW, 1, C).
        """
        *blocks, last = self.blocks
        for block in blocks:
            x = self._run(block, x, False, key_mask)
        return self._run(last, x, False, key_mask), self._run(last, x, True, key_mask)

    def _run(self, block: nn.Module, x: torch.Tensor, msg_only: bool,
             key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, msg_only=msg_only, key_mask=key_mask, use_reentrant=False)
        return block(x, msg_only=msg_only, key_mask=key_mask)


GLOBAL_POOLS = ('avg', '')  # 'avg': mean over the final map; '': keep the map (the head, if any, per position)


def size_multiple(patch_size: int, window_size: int, shuffle_size: Sequence[int]) -> int:
    """Input sides that are multiples of this need no padding: each stage's map splits exactly into groups of
    windows (224 for the released models)."""
    return patch_size * math.lcm(*(2 ** i * window_size * gs for i, gs in enumerate(shuffle_size)))


@register_notrace_function  # one node of a traced graph, so that it checks the real input size there
def check_size(H: int, W: int, fixed: Optional[Tuple[int, int]] = None) -> None:
    """Raise ValueError unless H and W are positive (and equal ``fixed``, if given)."""
    if H <= 0 or W <= 0:
        raise ValueError(f'input size {H}x{W}: height and width must be positive')
    if fixed is not None and (H != fixed[0] or W != fixed[1]):
        raise ValueError(f'input size {H}x{W} differs from img_size {fixed[0]}x{fixed[1]}, which ape=True fixes')


@register_notrace_function
def pad_to_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Zero-pad an NCHW image at the bottom and right to whole patches (itself if it has whole patches)."""
    H, W = x.shape[-2], x.shape[-1]
    if not size_free() and H % patch_size == 0 and W % patch_size == 0:
        return x
    return F.pad(x, (0, ceil_div(W, patch_size) * patch_size - W, 0, ceil_div(H, patch_size) * patch_size - H))


class MSGTransformer(nn.Module):
    """MSG-Transformer (see the module docstring), with timm's model API.

    ``forward_features`` gives the final features as a map, NHWC (``output_fmt``): the normed MSG tokens of the
    last stage, (B, H/ws, W/ws, C) with H, W its patch grid (1 x 1 at 224); ``forward_head`` averages them
    (``global_pool='avg'``) and applies the classifier. ``forward_intermediates`` gives the patch maps of the
    stages (timm's signature and return value). After ``prune_intermediate_layers`` below the last stage the final
    features are the last kept stage's patch map.

    Args:
        img_size: input size (int or (H, W)); checked against the geometry, fixes the size only with ape.
        patch_size: stride of the 7x7 stem conv.
        in_chans: input image channels.
        num_classes: classifier outputs; 0 for no head (``forward`` returns the pooled features).
        global_pool: 'avg' (mean of the final map) or '' (no pooling: ``forward`` returns a map).
        embed_dim: channels of the first stage (doubled at each stage).
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: ws, window side in patches (every stage).
        mlp_ratio: MLP hidden width / channels.
        qkv_bias: bias in the qkv projection.
        qk_scale: attention scale; None for head_dim ** -0.5.
        drop_rate: dropout after the stem, in the MLP and after the attention projection.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over all blocks.
        ape: learned absolute position embedding added after the stem (fixes the input size to img_size).
        patch_norm: LayerNorm after the stem conv.
        shuffle_size: gs per stage, the side of a shuffle group in windows.
        manip_type: 'shuf' (shuffle MSG tokens) or 'none' (MSG tokens stay in their window).
        fused_attn: attention through ``F.scaled_dot_product_attention``; False: plain matmuls.
        use_checkpoint: gradient checkpointing per block (see ``set_grad_checkpointing``).
        decay_msg_tokens: weight decay on the MSG tokens, as the official recipe has it (see the module docstring).
        attn_layer: the attention class of every block (see "Swapping parts" in the module docstring).
        mlp_layer: the MLP class of every block.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            ape: bool = False,
            patch_norm: bool = True,
            shuffle_size: Sequence[int] = (4, 4, 2, 1),
            manip_type: str = 'shuf',
            fused_attn: bool = True,
            use_checkpoint: bool = False,
            decay_msg_tokens: bool = True,
            attn_layer: Callable[..., nn.Module] = MessengerAttention,
            mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        depths, num_heads, shuffle_size = tuple(depths), tuple(num_heads), tuple(shuffle_size)
        num_stages = len(depths)
        dims = tuple(embed_dim * 2 ** i for i in range(num_stages))
        _check_arch(patch_size, dims, depths, num_heads, window_size, shuffle_size, manip_type)
        _check_pool(global_pool)
        self.img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.window_size = window_size
        self.shuffle_size = shuffle_size
        self.size_multiple = size_multiple(patch_size, window_size, shuffle_size)  # sizes without padding
        check_size(self.img_size[0], self.img_size[1])
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'  # of forward_features
        self.num_features = self.head_hidden_size = dims[-1]
        self.ape = ape
        self.decay_msg_tokens = decay_msg_tokens
        # The final features are the last stage's MSG tokens (False after pruning below the last stage: then
        # they are the last kept stage's patch map).
        self.msg_features = True
        # The last block computes only the MSG rows the head reads (exact; see the module docstring).
        self.msg_rows_only = True
        self.feature_info = [dict(num_chs=d, reduction=patch_size * 2 ** i, module=f'layers.{i}')
                             for i, d in enumerate(dims)]

        self.msg_tokens = nn.Parameter(torch.zeros(1, shuffle_size[0] ** 2, 1, embed_dim))  # 1, G, 1, C
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            grid = (ceil_div(self.img_size[0], patch_size), ceil_div(self.img_size[1], patch_size))
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))  # 1, H*W, C
        else:
            self.register_parameter('absolute_pos_embed', None)  # (not in the state_dict)
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            self.layers.append(MSGStage(
                dim=dims[i],
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                shuffle_size=shuffle_size[i],
                next_shuffle_size=shuffle_size[i + 1] if i + 1 < num_stages else None,
                shuffle_msgs=manip_type == 'shuf',
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                fused_attn=fused_attn,
                attn_layer=attn_layer,
                mlp_layer=mlp_layer,
            ))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self.apply(self._init_weights)
        trunc_normal_(self.msg_tokens, std=INIT_STD)
        if self.absolute_pos_embed is not None:
            trunc_normal_(self.absolute_pos_embed, std=INIT_STD)
        for m in self.modules():
            if isinstance(m, MessengerAttention):
                trunc_normal_(m.relative_position_bias_table, std=INIT_STD)
                trunc_normal_(m.rel_pos_msg, std=INIT_STD)
        self.set_grad_checkpointing(use_checkpoint)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------------- timm model API
    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Parameter names exempt from weight decay (see the module docstring)."""
        return self.official_no_weight_decay() | (set() if self.decay_msg_tokens else {'msg_tokens'})

    @torch.jit.ignore
    def official_no_weight_decay(self) -> Set[str]:
        """The names the official optimizer exempted (its 'msg_token' named no parameter), for reading the
        optimizer state of official checkpoints."""
        return {'absolute_pos_embed'} if self.ape else set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> Set[str]:
        return {'relative_position_bias_table', 'rel_pos_msg'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order (timm's layer-wise LR decay): the stem and learned tokens, then each
        block; a stage's downsample and the final norm join the group of the block before them (timm's 99999
        suffix); the head last."""
        return dict(
            stem=r'^msg_tokens|^absolute_pos_embed|^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.downsample', (99999,)),
                (r'^layers\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of keeping its activations."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh one for ``num_classes`` (0: no head), on the model's device and dtype and
        in its train/eval mode; ``global_pool`` ('avg' or '') if given."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = (nn.Linear(self.num_features, num_classes, **get_device_dtype(self))
                     if num_classes > 0 else nn.Identity())
        if num_classes > 0:
            self._init_weights(self.head)
        self.head.train(self.training)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       window_size: Optional[int] = None) -> None:
        """Change the nominal input size and/or the window size.

        ``forward`` takes any size anyway (``img_size`` only fixes it with ape, whose table is then resampled
        bicubically); a new window size resizes every relative-position table bicubically (as loading weights of
        another window does) and changes the sizes that need no padding. Raises ValueError (the model unchanged)
        for a size below 1.
        """
        hw = self.img_size if img_size is None else to_2tuple(img_size)
        ws = self.window_size if window_size is None else window_size
        if ws < 1:
            raise ValueError(f'window_size must be >= 1, got {ws}')
        check_size(hw[0], hw[1])
        if ws != self.window_size:
            for m in self.modules():
                if isinstance(m, MessengerAttention):
                    m.set_window_size(ws)
            self.window_size, self.size_multiple = ws, size_multiple(self.patch_size, ws, self.shuffle_size)
        if self.absolute_pos_embed is not None and hw != self.img_size:
            old = self.absolute_pos_embed
            grid = (ceil_div(hw[0], self.patch_size), ceil_div(hw[1], self.patch_size))
            old_grid = (ceil_div(self.img_size[0], self.patch_size), ceil_div(self.img_size[1], self.patch_size))
            with torch.no_grad():
                new = resample_abs_pos_embed(old, grid, old_grid, num_prefix_tokens=0)  # 1, H*W, C
            self.absolute_pos_embed = nn.Parameter(new, requires_grad=old.requires_grad)
        self.img_size = hw
        update_model_input_size(self, hw, window_size=ws)

    # ------------------------------------------------------------------------------------------- forward passes
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W) NCHW image. Returns: the first stage's patch map (B, ceil(H/patch),
        ceil(W/patch), C): the image zero-padded at the bottom and right to whole patches, then the stem."""
        check_size(x.shape[-2], x.shape[-1], self.img_size if self.absolute_pos_embed is not None else None)
        x = self.patch_embed(pad_to_patches(x, self.patch_size))  # B, H, W, C
        if self.absolute_pos_embed is not None:
            B, H, W, C = x.shape
            x = x + self.absolute_pos_embed.view(1, H, W, C)  # B, H, W, C
        return self.pos_drop(x)

    def _first_msgs(self) -> torch.Tensor:
        """One group's MSG map, the same for all groups of the first stage: (1, 1, gs, 1, gs, C)."""
        gs = self.shuffle_size[0]
        return self.msg_tokens.view(1, 1, gs, 1, gs, self.msg_tokens.shape[-1])

    def _final(self, x: torch.Tensor, H: int, W: int, group_size: int, msgs: bool) -> torch.Tensor:
        """Normed final features, NHWC. Args: x: (B, nW, N or 1, C) last-stage tokens, H, W its patch map.
        Returns: the MSG map (B, ceil(H/ws), ceil(W/ws), C) if ``msgs``, else the patch map (B, H, W, C)."""
        if msgs:
            return self.norm(msg_map(x, H, W, self.window_size, group_size))
        return self.norm(patch_map(x, H, W, self.window_size, group_size))

    def _forward_stages(self, x: torch.Tensor, msg_only: bool) -> Tuple[torch.Tensor, int, int, int]:
        """Args: x: (B, in_chans, H, W); msg_only: the very last block computes the MSG rows only.
        Returns: the last stage's tokens, (B, nW, N, C) or (B, nW, 1, C), its patch map's H, W and group side."""
        patches, msgs = self._embed(x), self._first_msgs()
        last = len(self.layers) - 1
        ws = self.window_size
        for i, stage in enumerate(self.layers):
            H, W, gs = patches.shape[1], patches.shape[2], stage.group_size
            x, key_mask = stage_tokens(patches, msgs, ws, gs)
            x = stage(x, msg_only and i == last, key_mask)
            if stage.downsample is not None:
                patches, msgs = stage.downsample(patch_map(x, H, W, ws, gs), msg_map(x, H, W, ws, gs))
        return x, H, W, gs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W). Returns: the final features, NHWC (see the class docstring)."""
        # The head reads the last stage's MSG tokens only: its last block computes just those rows (exact).
        x, H, W, gs = self._forward_stages(x, msg_only=self.msg_features and self.msg_rows_only)
        return self._final(x, H, W, gs, self.msg_features)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Args: x: (B, h, w, C) from forward_features. Returns: (B, num_classes) logits, or the pooled features if
        pre_logits; with global_pool='' the map, the head applied per position."""
        if self.global_pool == 'avg':
            x = x.mean((1, 2))  # B, C
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, in_chans, H, W) NCHW. Returns: (B, num_classes) logits."""
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
        """Multi-scale patch maps for dense heads (timm's API, as its Swin).

        Args:
            x: (B, in_chans, H, W).
            indices: stages to return: the last n if an int, these (negative from the end) if a list, all if None.
            norm: apply the final norm to the last stage's map.
            stop_early: run no stage after the last one asked for.
            output_fmt: 'NCHW' or 'NHWC' maps.
            intermediates_only: return the maps only.

        Returns:
            (final, maps), or maps: stage i's map is its patch tokens after its last block, before the downsample
            (MSG tokens left out), (B, embed_dim * 2**i, H / (patch_size * 2**i), W / (patch_size * 2**i)) in
            NCHW, i.e. strides 4/8/16/32 for patch 4. ``final`` is ``forward_features(x)``, exactly, or the last
            computed stage's patch map (NHWC) if stopped early.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        last = len(self.layers) - 1
        stop = max_index if stop_early else last
        shortcuts = self.msg_rows_only
        ws = self.window_size
        patches, msgs = self._embed(x), self._first_msgs()
        intermediates = []
        for i, stage in enumerate(self.layers[:stop + 1]):
            H, W, gs = patches.shape[1], patches.shape[2], stage.group_size
            x, key_mask = stage_tokens(patches, msgs, ws, gs)
            final_msgs = self.msg_features and i == last and not intermediates_only
            if final_msgs and i in take_indices and shortcuts:
                x, msg_tokens = stage.forward_twice_last(x, key_mask)  # the map from the full block, forward's rows
            else:
                # The last block needs its MSG rows only if its patch map is not asked for.
                x = msg_tokens = stage(x, final_msgs and shortcuts and i not in take_indices, key_mask)
            if i in take_indices:
                fmap = patch_map(x, H, W, ws, gs)  # B, H, W, C
                if norm and i == last:
                    fmap = self.norm(fmap)
                intermediates.append(fmap.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW' else fmap)
            if i < stop and stage.downsample is not None:
                patches, msgs = stage.downsample(patch_map(x, H, W, ws, gs), msg_map(x, H, W, ws, gs))
        if intermediates_only:
            return intermediates
        if stop < last:  # stopped early: the last computed stage's patch map, without the final norm
            return patch_map(x, H, W, ws, gs), intermediates
        return self._final(msg_tokens, H, W, gs, self.msg_features), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the stages after the last of ``indices`` (and that stage's downsample), and the final norm / head
        if asked (always when stages are dropped). Returns the absolute indices kept (timm's API)."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        prune_end = max_index < len(self.layers) - 1
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.layers = self.layers[:max_index + 1]
            self.layers[-1].downsample = None
            self.msg_features = False  # the final features become the last kept stage's patch map
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices


def _check_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f'global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}')


def _check_arch(patch_size: int, dims: Tuple[int, ...], depths: Tuple[int, ...], num_heads: Tuple[int, ...],
                window_size: int, shuffle_size: Tuple[int, ...], manip_type: str) -> None:
    """Raise ValueError for an architecture the model cannot build."""
    if not 1 <= patch_size <= PATCH_EMBED_KERNEL + 1:
        raise ValueError(f'patch_size must be in 1..{PATCH_EMBED_KERNEL + 1} (stem kernel {PATCH_EMBED_KERNEL}), '
                         f'got {patch_size}')
    if window_size < 1:
        raise ValueError(f'window_size must be >= 1, got {window_size}')
    if not len(dims) == len(num_heads) == len(shuffle_size) or not dims:
        raise ValueError(f'depths {list(depths)}, num_heads {list(num_heads)} and shuffle_size {list(shuffle_size)} '
                         f'need one entry per stage')
    if manip_type not in MANIP_TYPES:
        raise ValueError(f"manip_type must be one of {MANIP_TYPES}, got {manip_type!r}")
    for i, (dim, heads, gs) in enumerate(zip(dims, num_heads, shuffle_size)):
        if heads < 1 or dim % heads:
            raise ValueError(f'stage {i}: num_heads {heads} does not divide its {dim} channels')
        if gs < 1:
            raise ValueError(f'stage {i}: shuffle_size must be >= 1, got {gs}')
        if manip_type == 'shuf' and dim % (gs * gs):
            raise ValueError(f'stage {i}: the MSG shuffle splits {dim} channels into shuffle_size**2 = {gs * gs} '
                             f'chunks; {gs * gs} does not divide {dim}')


@register_model_type('msg', 'msg_transformer')
def build_msg(config) -> MSGTransformer:
    """Build from ``MODEL.MSG.*``, ``DATA.IMG_SIZE``, ``MODEL.{NUM_CLASSES, DROP_RATE, DROP_PATH_RATE,
    FUSED_ATTN}`` and ``TRAIN.USE_CHECKPOINT``."""
    c = config.MODEL.MSG
    return MSGTransformer(
        img_size=config.DATA.IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        in_chans=c.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=c.EMBED_DIM,
        depths=c.DEPTHS,
        num_heads=c.NUM_HEADS,
        window_size=c.WINDOW_SIZE,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        qk_scale=c.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=c.APE,
        patch_norm=c.PATCH_NORM,
        shuffle_size=c.SHUF_SIZE,
        manip_type=c.MANIP_TYPE,
        fused_attn=config.MODEL.FUSED_ATTN,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        decay_msg_tokens=c.DECAY_MSG_TOKENS,
    )


# T/S/B as data (configs/msg_*_p4_win7_224.yaml); window 7, patch 4, shuffle (4, 4, 2, 1) are the defaults.
_VARIANTS = {
    'tiny': dict(embed_dim=64, depths=(2, 4, 12, 4), num_heads=(2, 4, 8, 16), drop_path_rate=0.1),
    'small': dict(embed_dim=96, depths=(2, 4, 12, 4), num_heads=(3, 6, 12, 24), drop_path_rate=0.3),
    'base': dict(embed_dim=96, depths=(2, 4, 28, 4), num_heads=(3, 6, 12, 24), drop_path_rate=0.5),
}
_PATCH, _WINDOW, _SHUFFLE, _NUM_STAGES = 4, 7, (4, 4, 2, 1), 4  # the constructor's defaults, for the cfgs


def _cfg() -> Dict[str, Any]:
    final_stride = _PATCH * MERGE_STRIDE ** (_NUM_STAGES - 1)
    side = TRAIN_SIZE // (final_stride * _WINDOW)  # the MSG map of the last stage: 1 x 1 at 224
    return pretrained_cfg(
        size_multiple=size_multiple(_PATCH, _WINDOW, _SHUFFLE),
        pool_size=(side, side),
        first_conv='patch_embed.proj',
        license='apache-2.0',
        origin_url='https://github.com/hustvl/MSG-Transformer',
        paper_name='MSG-Transformer: Exchanging Local Spatial Information by Manipulating Messenger Tokens',
        paper_ids='arXiv:2105.15168',
        weights='an official MSG-Transformer ImageNet-1k checkpoint (its keys are ours)',
    )


default_cfgs = generate_default_cfgs({f'msg_transformer_{v}.in1k': _cfg() for v in _VARIANTS})


def _create_msg_transformer(variant: str, pretrained: bool, **kwargs: Any) -> MSGTransformer:
    """The variant through timm's ``build_model_with_cfg`` (``models.pretrained.create``); kwargs override the
    variant's defaults, unknown ones raise TypeError."""
    return create(MSGTransformer, f'msg_transformer_{variant}', pretrained, _NUM_STAGES,
                             **{**_VARIANTS[variant], **kwargs})


@register_model
def msg_transformer_tiny(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-T (25.1M params)."""
    return _create_msg_transformer('tiny', pretrained, **kwargs)


@register_model
def msg_transformer_small(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-S (56.0M params)."""
    return _create_msg_transformer('small', pretrained, **kwargs)


@register_model
def msg_transformer_base(pretrained: bool = False, **kwargs: Any) -> MSGTransformer:
    """MSG-Transformer-B (84.4M params)."""
    return _create_msg_transformer('base', pretrained, **kwargs)
