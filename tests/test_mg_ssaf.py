"""MG-SSAF: official checkpoints and outputs, any-resolution rules, training features, builders and cost."""
from __future__ import annotations

import json
import math
import os

import pytest
import timm
import torch

import config as config_lib
from fill import fill_
from models.build import build_model
from models.cost import model_cost
from models.mg_ssaf import (MGSSAF, UNUSED_OFFICIAL_KEYS, convert_official_state_dict, mg_ssaf_base,
                            mg_ssaf_small, mg_ssaf_tiny, to_official_state_dict)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
VARIANTS = {'tiny': mg_ssaf_tiny, 'small': mg_ssaf_small, 'base': mg_ssaf_base}
YAMLS = {'tiny': 'MG-SSAF-T.yaml', 'small': 'MG-SSAF-S.yaml', 'base': 'MG-SSAF-B.yaml'}
PARITY_TOL = 1e-5
# A small config that still has every branch: local-only, mixed and global-only stages.
TINY = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 6, 3, 4),
            global_ratio=(0., 0.5, 1., 0.), width=(0, 2, 2, 0), window_size=2, num_classes=10)


def _manifest(variant: str) -> dict:
    with open(os.path.join(FIXTURES, f'mgssaf_{variant}.manifest.json')) as f:
        return json.load(f)


class _StateDictHolder:
    """Duck-typed for ``fill_``, which only calls ``state_dict()``: fills tensors under the official names."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._sd = state_dict

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._sd


def _official_filled(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """An official-layout state_dict (unused keys included) filled exactly as the fixtures were made."""
    sd = {name: torch.zeros(shape, dtype=getattr(torch, dtype)) for name, shape, dtype in
          _manifest(variant)['state_dict']}
    fill_(_StateDictHolder(sd), seed)
    return sd


@pytest.fixture(scope='module')
def models() -> dict[str, MGSSAF]:
    """Each released variant, built once, with the parity weights loaded from an official-layout dict."""
    out = {}
    for variant, factory in VARIANTS.items():
        torch.manual_seed(0)
        net = factory().eval()
        net.load_state_dict(_official_filled(variant))
        out[variant] = net
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_manifest_keys_and_shapes(variant: str, models: dict[str, MGSSAF]) -> None:
    manifest = _manifest(variant)
    official = {name: torch.Size(shape) for name, shape, _ in manifest['state_dict']}
    ours = {k: v.shape for k, v in models[variant].state_dict().items()}
    converted, dropped = convert_official_state_dict({k: torch.empty(s) for k, s in official.items()})
    # The only dropped keys are each attention's unused norm: one weight and one bias per block.
    depths = manifest['ctor_kwargs']['depths']
    assert len(dropped) == 2 * sum(depths)
    assert all(UNUSED_OFFICIAL_KEYS.match(k) and '.attn.norm.' in k for k in dropped)
    assert {k: v.shape for k, v in converted.items()} == ours
    dropped_numel = sum(official[k].numel() for k in dropped)
    assert sum(p.numel() for p in models[variant].parameters()) + dropped_numel == manifest['num_params']
    # ... and back: our layout maps onto every official key but the dropped ones, with the official shapes.
    back = to_official_state_dict(models[variant].state_dict())
    assert {k: v.shape for k, v in back.items()} == {k: s for k, s in official.items() if k not in dropped}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_parity_with_official(variant: str, models: dict[str, MGSSAF]) -> None:
    ref = torch.load(os.path.join(FIXTURES, f'mgssaf_{variant}.parity.pt'), weights_only=False)
    x = torch.randn(ref['input_shape'], generator=torch.Generator().manual_seed(ref['input_seed']))
    with torch.inference_mode():
        fmap = models[variant].forward_features(x)  # timm: the unpooled final features; the official's are pooled
        features, logits = models[variant].forward_head(fmap, pre_logits=True), models[variant].forward_head(fmap)
    assert features.shape == ref['features'].shape and logits.shape == ref['logits'].shape
    assert _rel(features, ref['features']) <= PARITY_TOL
    assert _rel(logits, ref['logits']) <= PARITY_TOL


def test_head_split_rule(models: dict[str, MGSSAF]) -> None:
    """global = num_heads * global_ratio (3 groups), local = the rest; B is the variant where the rules differ."""
    for variant, (local, per_group) in {'tiny': (3, 1), 'base': (2, 2)}.items():
        attn = models[variant].layers[1].blocks[0].attn
        assert (attn.local_heads, attn.group_heads) == (local, per_group)
        assert attn.local_fusion.mix.weight.shape == (local, local)
        assert attn.global_fusion.mix.weight.shape == (per_group, per_group)
    assert models['base'].layers[0].blocks[0].attn.global_fusion is None


def test_official_file_loads_strict(tmp_path, models: dict[str, MGSSAF]) -> None:
    official = _official_filled('tiny', seed=3)
    path = tmp_path / 'official.pth'
    torch.save({'model': official}, path)
    loaded = torch.load(path, map_location='cpu', weights_only=True)['model']
    net = mg_ssaf_tiny()
    assert str(net.load_state_dict(loaded)) == '<All keys matched successfully>'
    # Same weights as through the explicit converter, and the loader-facing method reports the unused keys.
    converted, dropped = net.adapt_state_dict(loaded)
    assert sorted(dropped) == sorted(k for k in official if '.attn.norm.' in k)
    for k, v in net.state_dict().items():
        assert torch.equal(v, converted[k]), k
    # The caller's dict is left as it was.
    assert set(loaded) == set(official)


def test_unexpected_and_missing_keys_are_named() -> None:
    net = mg_ssaf_tiny()
    sd = _official_filled('tiny')
    sd['layers.0.blocks.0.attn.bogus.weight'] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r'layers\.0\.blocks\.0\.attn\.bogus\.weight'):
        net.load_state_dict(sd)
    sd = _official_filled('tiny')
    del sd['layers.2.blocks.1.attn.proj_qkv.weight']
    with pytest.raises(RuntimeError, match=r'layers\.2\.blocks\.1\.attn\.proj_qk\.weight'):
        net.load_state_dict(sd)


def test_export_official_round_trip(tmp_path, models: dict[str, MGSSAF]) -> None:
    from tools.export_official import export_official
    src, dst = tmp_path / 'ours.pth', tmp_path / 'official.pth'
    torch.save({'model': models['tiny'].state_dict(), 'epoch': 3}, src)
    export_official(str(src), str(dst))
    official = torch.load(dst, weights_only=True)['model']
    shapes = {name: shape for name, shape, _ in _manifest('tiny')['state_dict'] if '.attn.norm.' not in name}
    assert {k: list(v.shape) for k, v in official.items()} == shapes
    net = mg_ssaf_tiny()
    net.load_state_dict(official)
    for k, v in models['tiny'].state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k


# --------------------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('img_size', [384, 230, 112, (224, 300)])
def test_sizes_that_are_no_multiple_of_224_are_taken(img_size) -> None:
    expected = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert MGSSAF(img_size=img_size, depths=(1, 1, 1, 1)).img_size == expected


@pytest.mark.parametrize('img_size,window_size', [(0, 7), ((224, -1), 7), (224, 0)])
def test_nonsense_size_raises(img_size, window_size) -> None:
    with pytest.raises(ValueError, match='must be positive'):
        MGSSAF(img_size=img_size, window_size=window_size)


def test_invalid_head_split_and_patch_size_raise() -> None:
    with pytest.raises(ValueError, match='multiple of 3 global heads'):
        MGSSAF(global_ratio=(0., 0.25, 0.5, 0.))
    with pytest.raises(ValueError, match='patch_size must be 4'):
        MGSSAF(patch_size=8)
    with pytest.raises(ValueError, match=r'width\[1\] must be positive'):
        MGSSAF(width=(0, 0, 2, 0))


def test_other_resolutions_shapes() -> None:
    torch.manual_seed(0)
    for img_size in ((128, 128), (64, 192)):
        net = MGSSAF(**{**TINY, 'img_size': img_size}).eval()
        x = torch.randn(2, 3, *img_size)
        with torch.inference_mode():
            feats = net.forward_intermediates(x, intermediates_only=True)
            logits = net(x)
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()
        for i, f in enumerate(feats):
            stride = 4 * 2 ** i
            assert f.shape == (2, TINY['embed_dim'] * 2 ** i, img_size[0] // stride, img_size[1] // stride)
    # Inputs may take any positive size, not only the one given at construction.
    net = MGSSAF(**TINY).eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 128, 64)).shape == (1, 10)
        assert net(torch.randn(1, 3, 96, 64)).shape == (1, 10)
        with pytest.raises(ValueError, match='must be positive'):
            net(torch.randn(1, 3, 0, 64))
    # 384 is not a multiple of 224, but it is one of 192: window 6 takes it (the weights do not depend on it).
    net = MGSSAF(img_size=384, window_size=6, embed_dim=24, depths=(1, 1, 1, 1), num_classes=5).eval()
    with torch.inference_mode():
        assert net(torch.randn(1, 3, 384, 384)).shape == (1, 5)


def test_global_keys_follow_the_input_size() -> None:
    """Pooled windows and full-width strips are derived from the grid, not from a fixed 56x56 layout."""
    seen = []
    for img_size, grid in ((64, 8), (128, 16)):
        net = MGSSAF(**{**TINY, 'img_size': img_size}).eval()
        net.layers[1].blocks[0].attn.global_fusion.register_forward_hook(
            lambda module, args, output: seen.append(args[0].shape))
        with torch.inference_mode():
            net(torch.randn(1, 3, img_size, img_size))
        kh = grid // TINY['window_size']
        assert seen[-1] == (1, 1, kh, kh, grid * grid)  # B, nH, kh, kw, queries


@pytest.mark.parametrize('horizontal', [True, False])
def test_strips_span_the_whole_map(horizontal: bool) -> None:
    """Strip keys are the official AvgPool2d((width, W)) / ((H, width)) with H, W the actual grid (not 56)."""
    torch.manual_seed(0)
    attn = MGSSAF(**{**TINY, 'img_size': (128, 192)}).layers[1].blocks[0].attn
    B, H, W, nH, d, s = 2, 16, 24, attn.group_heads, attn.head_dim, attn.strip_width
    qk = torch.randn(B, H, W, 2 * nH * d)
    q, k = qk.permute(0, 3, 1, 2).chunk(2, dim=1)  # B, nH*d, H, W each
    keys = torch.nn.functional.avg_pool2d(k, (s, W) if horizontal else (H, s), stride=s)  # B, nH*d, kh, kw
    keys = keys.flatten(2).view(B, nH, d, -1).transpose(-2, -1)  # B, nH, M, d
    assert keys.shape[2] == (H if horizontal else W) // s
    q = q.flatten(2).view(B, nH, d, H * W).transpose(-2, -1)  # B, nH, H*W, d
    ref = ((q @ keys.transpose(-2, -1)) * d ** -0.5).softmax(-1) @ keys  # B, nH, H*W, d
    ref = ref.transpose(-2, -1).reshape(B, nH * d, H, W).permute(0, 2, 3, 1)  # B, H, W, nH*d
    torch.testing.assert_close(attn._pooled_strips(qk, horizontal=horizontal), ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Training features
# --------------------------------------------------------------------------------------------------------------
def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    net = MGSSAF(**TINY, drop_path_rate=0.1).train()
    loss = torch.nn.functional.cross_entropy(net(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradients_have_their_parameters_strides() -> None:
    """What DDP checks (it warns on any stride difference, size-1 dims included, e.g. depthwise weights)."""
    net = MGSSAF(**TINY).train()
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    for n, p in net.named_parameters():
        assert p.grad.stride() == p.stride(), n


def test_channels_last_stem_weight_keeps_the_state_dict() -> None:
    """The stem's last conv reads a channels-last view and stores a channels-last weight; loading a contiguous
    state_dict keeps that layout and the values, and the output is the plain modules' output."""
    torch.manual_seed(0)
    net, ref = MGSSAF(**TINY).eval(), MGSSAF(**TINY).eval()
    ref.patch_embed.conv3.weight.data = ref.patch_embed.conv3.weight.data.contiguous()
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    net.load_state_dict(sd)
    weight = net.patch_embed.conv3.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and weight.equal(sd['patch_embed.conv3.weight'])
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert _rel(net(x), ref(x)) < 1e-6


def test_grad_checkpointing_same_gradients(monkeypatch) -> None:
    torch.manual_seed(0)
    ref = MGSSAF(**TINY, drop_path_rate=0.).train()
    ckpt = MGSSAF(**TINY, drop_path_rate=0., use_checkpoint=True).train()
    ckpt.load_state_dict(ref.state_dict())
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 3, 64, 64)
    for net in (ref, ckpt):
        net(x).square().mean().backward()
    assert len(calls) == sum(TINY['depths'])  # every block, only in the checkpointed model
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    ckpt.set_grad_checkpointing(False)
    ckpt(x)
    assert len(calls) == sum(TINY['depths'])


def test_attention_dropout_path_matches() -> None:
    """With attention dropout the mix bias is added to the maps; without, it is folded into the values."""
    torch.manual_seed(0)
    net = MGSSAF(**TINY, drop_path_rate=0.).train()
    x = torch.randn(2, 3, 64, 64)
    folded = net(x)
    fusions = [m for m in net.modules() if type(m).__name__ == 'AttentionFusion']
    assert len(fusions) == 6
    for m in fusions:
        m.attn_drop.p = 1e-12  # takes the explicit path, drops (almost surely) nothing
    torch.testing.assert_close(net(x), folded, rtol=1e-5, atol=1e-6)


def test_stochastic_depth_rule() -> None:
    net = MGSSAF(**TINY, drop_path_rate=0.3)
    rates = [float(getattr(b.drop_path, 'drop_prob', 0.)) for s in net.layers for b in s.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, sum(TINY['depths'])).tolist())


def test_classifier_api() -> None:
    net = MGSSAF(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    assert net.head_hidden_size == 1280 and net.num_classes == 10
    assert net.no_weight_decay() <= {n for n, _ in net.named_parameters()}
    net.reset_classifier(0)
    with torch.inference_mode():
        assert torch.equal(net(x), net.forward_head(net.forward_features(x), pre_logits=True))
    net.reset_classifier(7)
    assert net(x).shape == (2, 7) and net.get_classifier().out_features == 7


# --------------------------------------------------------------------------------------------------------------
# Builders and cost
# --------------------------------------------------------------------------------------------------------------
def test_timm_create_model() -> None:
    net = timm.create_model('mg_ssaf_tiny', num_classes=10, img_size=448, drop_path_rate=0.)
    assert isinstance(net, MGSSAF) and net.head.out_features == 10 and net.img_size == (448, 448)
    assert net.layers[1].blocks[0].attn.group_heads == 1
    with pytest.raises(ValueError, match='no pretrained weights'):
        timm.create_model('mg_ssaf_base', pretrained=True)
    with pytest.raises(TypeError, match='embed_dimm'):
        timm.create_model('mg_ssaf_small', embed_dimm=64)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_build_model_from_yaml(variant: str, models: dict[str, MGSSAF]) -> None:
    cfg = config_lib.load_config_file(os.path.join(ROOT, 'configs', 'MG-SSAF', YAMLS[variant]))
    assert (cfg.TRAIN.BASE_LR, cfg.TRAIN.MIN_LR) == (1e-3, 1e-6)  # the official defaults
    net = build_model(cfg)
    assert {k: v.shape for k, v in net.state_dict().items()} == \
        {k: v.shape for k, v in models[variant].state_dict().items()}
    last = net.layers[-1].blocks[-1].drop_path
    assert last.drop_prob == pytest.approx({'tiny': 0.2, 'small': 0.2, 'base': 0.3}[variant])


def test_model_cost(models: dict[str, MGSSAF]) -> None:
    """The official code computes the pooled-window scores twice (once per softmax direction); ours once, so
    our count is below the official counter's by exactly that matmul."""
    cost = model_cost(models['tiny'], 224)
    assert cost.params == 19_581_752
    assert cost.macs == 3_260_690_912
    official = _manifest('tiny')['macs_flop_counter']
    # stage 2: 28x28 queries, 4x4 pooled keys, 1 head of 32; stage 3: 14x14, 2x2, 2 heads; x blocks
    duplicated = 2 * (28 * 28 * 16 * 32 * 1) + 6 * (14 * 14 * 4 * 32 * 2)
    assert cost.macs + duplicated == official
    assert math.isclose(cost.macs / 1e9, 3.26, abs_tol=0.005)


def test_heads_must_divide_channels():
    with pytest.raises(ValueError, match=r'stage 1: num_heads 6 must divide its 64 channels'):
        MGSSAF(img_size=64, window_size=2, width=(0, 1, 1, 0), embed_dim=32, depths=(1, 1, 1, 1),
               num_heads=(1, 6, 6, 8), num_classes=10)
