"""MSG-Transformer at any input size: padded group grids, masked padding keys, features at ceil(H / stride)."""
import math
import warnings

import pytest
import timm
import torch

import models  # noqa: F401  (registers the timm names)
import models.msg_transformer as msg
from models.msg_transformer import MessengerAttention, MSGTransformer

SMALL = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), num_classes=10)


def ceil_maps(h, w):
    return [(math.ceil(h / s), math.ceil(w / s)) for s in (4, 8, 16, 32)]


@pytest.mark.parametrize('variant', ['tiny', 'small', 'base'])
def test_features_are_nchw_at_ceil_of_the_stride(variant):
    # One block per stage: the widths, heads, windows and groups (the geometry) are the variant's.
    model = timm.create_model(f'msg_transformer_{variant}', depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        for h, w in ((512, 512), (800, 1088), (333, 500)):
            feats = model.forward_intermediates(torch.randn(1, 3, h, w), intermediates_only=True)
            assert [f.shape[-2:] for f in feats] == ceil_maps(h, w)
            assert [f.shape[1] for f in feats] == [i['num_chs'] for i in model.feature_info]
            assert all(f.is_contiguous() and torch.isfinite(f).all() for f in feats)
        logits = model(torch.randn(2, 3, 333, 500))
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all()


def test_padding_keys_reach_no_real_token():
    """Whatever the padded tokens hold, the real tokens' attention outputs (and every MSG token's) are the same."""
    torch.manual_seed(0)
    attn = MessengerAttention(32, num_heads=2, window_size=3).eval()
    torch.nn.init.normal_(attn.rel_pos_msg)
    x = torch.randn(2, 4, 10, 32)  # B, nW, N, C
    key_mask = torch.rand(4, 10) > 0.4
    key_mask[:, 0] = True  # the MSG key is never padding
    other = torch.where(key_mask[None, :, :, None], x, torch.randn_like(x) * 100)
    for msg_only in (False, True):
        a, b = attn(x, msg_only, key_mask), attn(other, msg_only, key_mask)
        rows = key_mask[None, :, :a.shape[2], None].expand_as(a)
        torch.testing.assert_close(a[rows], b[rows])
    assert not torch.equal(attn(x), attn(other))  # (without the mask they differ)


@pytest.mark.parametrize('size', [(50, 70), (225, 225)])
def test_model_outputs_ignore_what_the_padding_holds(monkeypatch, size):
    torch.manual_seed(0)
    model = MSGTransformer(**SMALL).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x), *model.forward_intermediates(x, intermediates_only=True)
    real = msg.stage_tokens
    padded = []

    def noisy(patches, msgs, ws, gs):
        tokens, key_mask = real(patches, msgs, ws, gs)
        if key_mask is not None:
            padded.append(1)
            tokens = torch.where(key_mask[None, :, :, None], tokens, torch.randn_like(tokens) * 10)
        return tokens, key_mask

    monkeypatch.setattr(msg, 'stage_tokens', noisy)
    with torch.no_grad():
        got = model(x), *model.forward_intermediates(x, intermediates_only=True)
    assert padded
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_a_size_that_needs_padding_trains():
    torch.manual_seed(0)
    model = MSGTransformer(**SMALL, drop_path_rate=0.1).train()
    loss = model(torch.randn(2, 3, 225, 225)).logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_export_and_trace_follow_the_input_size():
    """torch.export with dynamic H and W, and torch.jit.trace, match eager at sizes other than the example's."""
    torch.manual_seed(0)
    model = MSGTransformer(**SMALL).eval()
    dynamic = {'x': {2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}}
    program = torch.export.export(model, (torch.randn(1, 3, 333, 500),), dynamic_shapes=dynamic).module()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', torch.jit.TracerWarning)
        traced = torch.jit.trace(model, torch.randn(1, 3, 224, 224))
    with torch.no_grad():
        for h, w in ((256, 320), (449, 300)):
            x = torch.randn(1, 3, h, w)
            ref = model(x)
            torch.testing.assert_close(program(x), ref, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(traced(x), ref, rtol=1e-4, atol=1e-5)
