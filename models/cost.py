"""Parameter and compute cost of a model, counted one way for every backbone.

``model_cost`` runs one forward pass under ``torch.utils.flop_counter.FlopCounterMode`` and reports
multiply-accumulates (MACs = FLOPs / 2, the papers' "FLOPs" convention). The counter sees matrix products and
convolutions (including those inside ``scaled_dot_product_attention``); element-wise work (softmax, norms,
activations) is not counted, as in fvcore and the papers' tables.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def _count_cpu_sdpa_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU attention kernels.

    It counts the CUDA ``scaled_dot_product_attention`` kernels but not the CPU flash kernel that
    ``F.scaled_dot_product_attention`` runs on CPU, so attention matmuls would go uncounted there (2.5% of
    MSG-B). Count them with the formulas torch uses for the CUDA kernels; a torch that knows them is left alone.
    """
    from torch.utils import flop_counter
    aten = torch.ops.aten
    for op, formula in ((aten._scaled_dot_product_flash_attention_for_cpu, flop_counter.sdpa_flop),
                        (aten._scaled_dot_product_flash_attention_for_cpu_backward, flop_counter.sdpa_backward_flop)):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # formula is already shape-wrapped


_count_cpu_sdpa_flops()


class ModelCost(NamedTuple):
    params: int
    macs: int


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def model_cost(model: nn.Module, img_size: Union[int, tuple[int, int]] = 224, in_chans: int = 3) -> ModelCost:
    """Parameters and MACs of one image of ``img_size`` through ``model`` (eval mode, float32, on its device)."""
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    p = next(model.parameters())
    x = torch.zeros(1, in_chans, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    # The architecture's count, as the papers give it: MSG-Transformer's last block then computes every row, not only
    # the MSG rows its head reads (``msg_rows_only``, an exact shortcut the official code does not take).
    rows_only = getattr(model, 'msg_rows_only', None)
    model.eval()
    try:
        if rows_only is not None:
            model.msg_rows_only = False
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        if rows_only is not None:
            model.msg_rows_only = rows_only
    return ModelCost(params=count_params(model), macs=counter.get_total_flops() // 2)
