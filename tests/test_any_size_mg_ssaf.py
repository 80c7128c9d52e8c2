"""MG-SSAF at any input size: feature-map sizes, the classifier, padded local windows that cannot leak, training at an
odd size, and a traced graph that serves other sizes. (Parity at the sizes taken before: tests/test_mg_ssaf.py.)"""
from __future__ import annotations

import math
import warnings

import pytest
import timm
import torch

import models  # noqa: F401  (registers the models)
from models.mg_ssaf import MGSSAF, MultiGranularityAttention

STRIDES = (4, 8, 16, 32)
# Reduced depths for the larger variants (every stage and branch kept; one block each is enough for shapes).
SHORT = dict(depths=(1, 1, 1, 1))


@pytest.mark.parametrize('name', ['mg_ssaf_tiny', 'mg_ssaf_small', 'mg_ssaf_base'])
def test_features_at_any_size(name) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, **SHORT).eval()
    with torch.no_grad():
        for hw in ((512, 512), (800, 1088), (333, 500)):
            feats = model.forward_intermediates(torch.randn(1, 3, *hw), intermediates_only=True)
            for f, s, info in zip(feats, STRIDES, model.feature_info):
                assert f.shape == (1, info['num_chs'], math.ceil(hw[0] / s), math.ceil(hw[1] / s)), (hw, s)
                assert torch.isfinite(f).all()
        logits = model(torch.randn(1, 3, 333, 500))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def _attention(window_size: int = 4, local_heads: int = 2) -> MultiGranularityAttention:
    torch.manual_seed(0)
    return MultiGranularityAttention(16 * local_heads, num_heads=local_heads, num_global_heads=0,
                                     window_size=window_size, strip_width=2).eval()


def test_padded_tokens_cannot_leak_into_valid_outputs() -> None:
    """Noise written into the padded part of q leaves the valid outputs unchanged (a padded query column reaches a
    valid output only through a row weight, which the mask makes 0), and each window's output depends on its valid
    tokens only: the bottom-right window computed alone, as a map of its own, gives the same values."""
    attn = _attention()
    H, W, ws, qdim = 6, 7, attn.window_size, 2 * 16
    qk = torch.randn(1, H, W, 2 * qdim)
    ref = attn._local(qk)
    assert ref.shape == (1, H, W, qdim) and torch.isfinite(ref).all()
    real_pad = torch.nn.functional.pad

    def pad_q_with_noise(x, pad, *args, **kwargs):
        out = real_pad(x, pad, *args, **kwargs)
        if not x.is_floating_point():  # the masks of which rows and columns are padding
            return out
        valid = real_pad(torch.ones_like(x), pad, *args, **kwargs).bool()
        noise = torch.randn_like(out) * 100
        noise[..., qdim:] = 0  # keys (= values) stay zero: the scheme's requirement
        return torch.where(valid, out, noise)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, 'pad', pad_q_with_noise)
        noisy = attn._local(qk)
    torch.testing.assert_close(noisy, ref, rtol=1e-5, atol=1e-6)
    corner = attn._local(qk[:, ws:, ws:])  # a 2 x 3 map: one window, padded
    torch.testing.assert_close(corner, ref[:, ws:, ws:], rtol=1e-5, atol=1e-6)


def test_local_softmax_never_sees_a_padded_key() -> None:
    """The row / column softmax at a valid query gives the padded keys exactly zero weight."""
    attn = _attention()
    seen = {}
    stock = MultiGranularityAttention._ss_scores

    def record(self, q, k):
        row, col = stock(self, q, k)
        seen['row'], seen['col'] = row, col
        return row, col

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MultiGranularityAttention, '_ss_scores', record)
        attn._local(torch.randn(1, 6, 7, 64))  # ws 4: pads 2 rows and 1 column
    row = seen['row'].softmax(dim=2).view(1, 2, 2, 2, 4, 4, 4)  # B, nWh, nWw, nH, j', i, j
    col = seen['col'].softmax(dim=2).view(1, 2, 2, 2, 4, 4, 4)  # B, nWh, nWw, nH, i', j, i
    assert (row[:, :, 1, :, 3] == 0).all()  # column 7 of the map (j' = 3 of the right windows) is padded
    assert (col[:, 1, :, :, 2:] == 0).all()  # rows 6, 7 (i' = 2, 3 of the bottom windows) are padded
    assert torch.isfinite(row).all() and torch.isfinite(col).all()


def test_one_pixel_larger_input_trains() -> None:
    torch.manual_seed(0)
    model = timm.create_model('mg_ssaf_tiny', num_classes=10, **SHORT).train()
    out = model(torch.randn(2, 3, 225, 225))
    out.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_traced_at_224_serves_other_sizes() -> None:
    torch.manual_seed(0)
    model = timm.create_model('mg_ssaf_tiny', **SHORT).eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(model, torch.randn(1, 3, 224, 224), check_trace=False)
    for hw in ((256, 320), (333, 500)):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)


def test_exported_with_dynamic_size_serves_other_sizes() -> None:
    torch.manual_seed(0)
    model = timm.create_model('mg_ssaf_tiny', **SHORT).eval()
    dynamic = {'x': {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    program = torch.export.export(model, (torch.randn(1, 3, 333, 500),), dynamic_shapes=dynamic).module()
    for hw in ((256, 320), (449, 300)):
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-4, atol=1e-5)
