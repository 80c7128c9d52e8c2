"""The CPU accelerator of MSG-Transformer's block (``models.msg_transformer.MSGBlock``).

The same function as the stock block, with the GEMMs through oneDNN (``ops.linear``: bias fused; in training
``F.linear``'s backward), the attention through SDPA or explicit products (``ops.attention``), and

* in eval without autograd: the exact GELU after ``fc1`` and the residual adds after ``proj`` and ``fc2`` fused into
  the GEMMs;
* in training without dropout: the MLP as one autograd function that keeps no GELU output (``ops.gelu_mlp``);
* drop path and its residual add as one ``addcmul`` (timm's ``DropPath`` random draws).

It runs the stock ``shuffle_msg_`` and ``attn_bias`` and the block's own norms and dropouts, so edits there take
effect; it stands in for the functions in ``PINS``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..layers import DropPath, Mlp
from ..msg_transformer import MessengerAttention, MSGBlock, padded_bias, shuffle_msg_
from . import ACCELERATORS, Accelerator
from .ops import attention, gelu_mlp, linear, linear_add


def _attend(attn: MessengerAttention, qkv: torch.Tensor, msg_only: bool,
            key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``MessengerAttention.attend`` without attention dropout. Args: qkv: (B, nW, N, 3C). Returns: (B, nW, Nq, C)."""
    B, nW, N, C3 = qkv.shape
    C = C3 // 3
    qkv = qkv.view(B * nW, N, 3, attn.num_heads, C // attn.num_heads)  # B*nW, N, 3, nH, hd
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each B*nW, nH, N, hd
    bias = attn.attn_bias()  # nH, N, N
    if msg_only:
        q, bias = q[:, :, :1], bias[:, :1]  # B*nW, nH, 1, hd; nH, 1, N
    Nq = q.shape[2]
    x = attention(q, k, v, padded_bias(bias, key_mask, B, q.dtype), attn.scale)  # B*nW, nH, Nq, hd
    return x.transpose(1, 2).reshape(B, nW, Nq, C)  # B, nW, Nq, C


def _residual(block: MSGBlock, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """x + drop_path(branch), a fresh tensor; timm's DropPath (the same random draws) as one addcmul."""
    dp = block.drop_path
    if not isinstance(dp, DropPath) or not block.training or dp.drop_prob == 0.:
        return x + dp(branch)
    keep = 1. - dp.drop_prob
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)  # B, 1, 1, 1
    if keep > 0. and dp.scale_by_keep:
        mask.div_(keep)
    return torch.addcmul(x, branch, mask)


def block_forward(block: MSGBlock, x: torch.Tensor, msg_only: bool = False,
                  key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``MSGBlock.forward``. Args: x: (B, nW, N, C), key_mask: (nW, N) or None. Returns: (B, nW, N or 1, C)."""
    attn, mlp = block.attn, block.mlp
    res = x[:, :, :1] if msg_only else x  # B, nW, Nq, C
    a = _attend(attn, linear(block.norm1(x), attn.qkv), msg_only, key_mask)  # B, nW, Nq, C
    plain_mlp = (type(mlp.act) is nn.GELU and mlp.act.approximate == 'none' and isinstance(mlp.norm, nn.Identity)
                 and (not block.training or mlp.drop1.p == mlp.drop2.p == 0.))  # fc1 -> exact GELU -> fc2
    if plain_mlp and not block.training and not torch.is_grad_enabled():
        x = linear_add(a, attn.proj, res)  # a fresh tensor: the shuffle may write into it
        x = shuffle_msg_(x, block.shuffle_size)
        return gelu_mlp(block.norm2(x), mlp.fc1, mlp.fc2, residual=x)
    x = _residual(block, res, attn.proj_drop(linear(a, attn.proj)))  # fresh (for the shuffle)
    x = shuffle_msg_(x, block.shuffle_size)
    if plain_mlp:
        return _residual(block, x, gelu_mlp(block.norm2(x), mlp.fc1, mlp.fc2))
    h = mlp.norm(mlp.drop1(mlp.act(linear(block.norm2(x), mlp.fc1))))  # timm's Mlp, step by step
    return _residual(block, x, mlp.drop2(linear(h, mlp.fc2)))


def _no_attention_dropout(block: MSGBlock) -> bool:
    return not (block.training and block.attn.attn_drop.p > 0)


ACCELERATORS.append(Accelerator(
    cls=MSGBlock,
    method='forward',
    fast=block_forward,
    pins={
        MSGBlock.forward: 'dec59b35c4c9f40f',
        MessengerAttention.forward: '30d144285468077a',
        MessengerAttention.attend: '6e9e148558cdb411',
        Mlp.forward: '6dade48223cfc248',
    },
    parts={'attn': MessengerAttention, 'mlp': Mlp},
    applies=_no_attention_dropout,
))
