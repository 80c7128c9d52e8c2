"""MSG-Transformer: official state_dict / outputs / cost, resolutions, gradients, registries (CPU, fast)."""
import functools
import json
import os

import pytest
import timm
import torch

from config import load_config_file
from fill import fill_
from models.build import build_model
from models.cost import model_cost
from models.layers import relative_position_index, window_partition, window_reverse
from models.msg_transformer import MSGBlock, MSGTransformer, shuffle_msg_, window_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
VARIANTS = ('tiny', 'small', 'base')
PARITY_TOL = 1e-5
COST_TOL = 0.01

# A small config: 64x64 images, window 2, every stage with a full shuffle group (valid sides: multiples of 64).
TINY = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2,
            shuffle_size=(4, 4, 2, 1), num_classes=10)


def manifest(variant: str) -> dict:
    with open(os.path.join(FIXTURES, f'msg_{variant}.manifest.json')) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def filled_model(variant: str) -> MSGTransformer:
    """The timm-registered variant with the fixtures' deterministic weights, in eval mode (shared, read-only)."""
    return fill_(timm.create_model(f'msg_transformer_{variant}'), seed=0).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = fused


# ----------------------------------------------------------------------------- official compatibility

@pytest.mark.parametrize('variant', VARIANTS)
def test_state_dict_matches_official_manifest(variant):
    man = manifest(variant)
    model = filled_model(variant)
    got = [[k, list(t.shape), str(t.dtype).removeprefix('torch.')] for k, t in model.state_dict().items()]
    assert got == man['state_dict']
    assert sum(p.numel() for p in model.parameters()) == man['num_params']
    # The registered variant is the official architecture.
    ctor = man['ctor_kwargs']
    assert (model.num_features, model.num_classes) == (ctor['embed_dim'] * 8, ctor['num_classes'])


@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('fused', (True, False), ids=('fused', 'plain'))
def test_parity_with_official(variant, fused):
    ref = torch.load(os.path.join(FIXTURES, f'msg_{variant}.parity.pt'))
    model = filled_model(variant)
    set_fused(model, fused)
    try:
        x = torch.randn(ref['input_shape'], generator=torch.Generator().manual_seed(ref['input_seed']))
        with torch.no_grad():
            fmap = model.forward_features(x)  # timm: the unpooled final features; the official's are pooled
            features, logits = model.forward_head(fmap, pre_logits=True), model.forward_head(fmap)
    finally:
        set_fused(model, True)
    assert rel_err(features, ref['features']) <= PARITY_TOL
    assert rel_err(logits, ref['logits']) <= PARITY_TOL


@pytest.mark.parametrize('variant', VARIANTS)
def test_cost_matches_official(variant):
    with open(os.path.join(FIXTURES, 'index.json')) as f:
        ref = json.load(f)['variants'][f'msg_{variant}']
    cost = model_cost(filled_model(variant), 224)
    assert cost.params == ref['num_params']
    assert abs(cost.macs / ref['flops_official'] - 1) <= COST_TOL


# ----------------------------------------------------------------------------- building

@pytest.mark.parametrize('variant', VARIANTS)
def test_build_model_from_yaml(variant):
    config = load_config_file(os.path.join(ROOT, 'configs', f'msg_{variant}_p4_win7_224.yaml'))
    man = manifest(variant)
    ctor = man['ctor_kwargs']
    msg = config.MODEL.MSG
    assert (config.MODEL.TYPE, config.MODEL.DROP_PATH_RATE) == ('msg', ctor['drop_path_rate'])
    assert (msg.EMBED_DIM, list(msg.DEPTHS), list(msg.NUM_HEADS), msg.WINDOW_SIZE, list(msg.SHUF_SIZE)) == (
        ctor['embed_dim'], ctor['depths'], ctor['num_heads'], ctor['window_size'], ctor['shuffle_size'])
    with torch.device('meta'):  # shapes only: skips the weight init
        model = build_model(config)
    assert isinstance(model, MSGTransformer)
    assert [[k, list(t.shape)] for k, t in model.state_dict().items()] == [e[:2] for e in man['state_dict']]
    assert model.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(ctor['drop_path_rate'])


def test_build_model_reads_config_switches():
    config = load_config_file(os.path.join(ROOT, 'configs', 'msg_tiny_p4_win7_224.yaml'),
                              ['MODEL.FUSED_ATTN', 'False', 'TRAIN.USE_CHECKPOINT', 'True',
                               'MODEL.NUM_CLASSES', '7', 'DATA.IMG_SIZE', '448'])
    with torch.device('meta'):
        model = build_model(config)
    assert model.num_classes == 7 and model.img_size == (448, 448)
    assert all(not b.attn.fused_attn for s in model.layers for b in s.blocks)
    assert all(s.grad_checkpointing for s in model.layers)


def test_unknown_model_type_lists_known_types():
    config = load_config_file(os.path.join(ROOT, 'configs', 'msg_tiny_p4_win7_224.yaml'), ['MODEL.TYPE', 'msgg'])
    with pytest.raises(ValueError, match=r"unknown MODEL.TYPE 'msgg'.*\bmsg\b"):
        build_model(config)


def test_timm_create_model():
    model = timm.create_model('msg_transformer_tiny', num_classes=5, img_size=448, drop_path_rate=0.)
    assert model.num_classes == 5 and model.img_size == (448, 448)
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('msg_transformer_small', pretrained=True)
    with pytest.raises(TypeError):
        timm.create_model('msg_transformer_tiny', window_sise=7)


def test_reset_classifier():
    model = MSGTransformer(**TINY).eval()
    x = torch.randn(2, 3, 64, 64)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize('manip_type', ('shuf', 'none'))
def test_manip_type(manip_type):
    torch.manual_seed(0)
    model = MSGTransformer(**TINY, manip_type=manip_type).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    shuffles = [b.shuffle_size for s in model.layers for b in s.blocks]
    assert shuffles == ([4, 4, 2, 2, 1] if manip_type == 'shuf' else [1] * 5)


# ----------------------------------------------------------------------------- resolutions and arguments

@pytest.mark.parametrize('size', ((64, 64), (128, 128), (64, 192)))
def test_tiny_config_sizes(size):
    torch.manual_seed(0)
    model = MSGTransformer(**{**TINY, 'img_size': size}).eval()
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_other_valid_sizes_at_forward_and_batch_independence():
    torch.manual_seed(0)
    model = MSGTransformer(**TINY).eval()
    x = torch.randn(3, 3, 128, 64)
    with torch.no_grad():
        out = model(x)
        single = model(x[1:2])
    assert out.shape == (3, 10)
    torch.testing.assert_close(out[1:2], single, rtol=1e-5, atol=1e-6)


def test_official_config_at_448():
    model = filled_model('tiny')
    with torch.no_grad():
        out = model(torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.parametrize('img_size', (0, (224, -1)))
def test_img_size_below_one_is_refused(img_size):
    with pytest.raises(ValueError, match='must be positive'):
        MSGTransformer(img_size=img_size)


@pytest.mark.parametrize('img_size', (225, 200, 112, (224, 336)))
def test_any_img_size_builds(img_size):
    MSGTransformer(img_size=img_size, depths=(1, 1, 1, 1), num_classes=0)


def test_ape():
    torch.manual_seed(0)
    model = MSGTransformer(**TINY, ape=True).eval()
    assert model.absolute_pos_embed.shape == (1, 16 * 16, 16)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match='ape'):
        model(torch.randn(2, 3, 128, 128))


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_heads=(1, 3, 2, 4)), 'num_heads 3 does not divide its 32 channels'),
    (dict(embed_dim=8), 'shuffle'),                      # 16 chunks of 8 channels
    (dict(shuffle_size=(4, 4, 3, 1)), 'shuffle'),        # 9 chunks of 64 channels
    (dict(depths=(1, 1, 2)), 'one entry per stage'),
    (dict(manip_type='swap'), 'manip_type'),
    (dict(window_size=0), 'window_size'),
    (dict(patch_size=9), 'patch_size'),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSGTransformer(**{**TINY, **kwargs})


# ----------------------------------------------------------------------------- gradients

def grads(model: MSGTransformer, x: torch.Tensor, seed: int) -> dict:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('fused', (True, False), ids=('fused', 'plain'))
def test_every_parameter_gets_a_finite_gradient(fused):
    torch.manual_seed(0)
    model = MSGTransformer(**TINY, ape=True, fused_attn=fused, drop_path_rate=0.1).train()
    g = grads(model, torch.randn(2, 3, 64, 64), seed=1)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(g) == sorted(names)  # every parameter is in the graph: DDP needs no find_unused_parameters
    # The logits read only the last MSG token, whose query row is biased by rel_pos_msg[:, 1] alone: in the
    # very last block the patch-query biases (the table, rel_pos_msg[:, 0]) only reach discarded patch
    # tokens and get exactly zero gradient, as in the official model.
    last = f'layers.{len(model.layers) - 1}.blocks.{len(model.layers[-1].blocks) - 1}.attn.'
    assert g[last + 'relative_position_bias_table'].eq(0).all() and g[last + 'rel_pos_msg'][:, 0].eq(0).all()
    g[last + 'rel_pos_msg'] = g[last + 'rel_pos_msg'][:, 1]
    del g[last + 'relative_position_bias_table']
    for n, t in g.items():
        assert torch.isfinite(t).all() and t.ne(0).any(), n


def test_fused_and_plain_attention_agree_in_training():
    torch.manual_seed(0)
    fused = MSGTransformer(**TINY, drop_rate=0.1, drop_path_rate=0.2).train()
    plain = MSGTransformer(**TINY, drop_rate=0.1, drop_path_rate=0.2, fused_attn=False).train()
    plain.load_state_dict(fused.state_dict())
    for model in (fused, plain):  # with frozen biases the fused path runs SDPA on CPU too
        for n, p in model.named_parameters():
            p.requires_grad_(not any(k in n for k in model.no_weight_decay_keywords()))
    x = torch.randn(2, 3, 64, 64)
    g_fused, g_plain = grads(fused, x, seed=3), grads(plain, x, seed=3)
    for n in g_fused:
        torch.testing.assert_close(g_fused[n], g_plain[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('drop_rate', (0.0, 0.1), ids=('fused-mlp', 'dropout'))
def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch, drop_rate):
    torch.manual_seed(0)
    model = MSGTransformer(**TINY, drop_rate=drop_rate, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    block_forward = MSGBlock.forward
    monkeypatch.setattr(MSGBlock, 'forward', lambda self, t, **kw: calls.append(1) or block_forward(self, t, **kw))
    num_blocks = sum(TINY['depths'])
    ref = grads(model, x, seed=5)
    assert len(calls) == num_blocks
    model.set_grad_checkpointing(True)
    ckpt = grads(model, x, seed=5)
    assert len(calls) == 3 * num_blocks  # forward, then recomputed in backward
    assert sorted(ckpt) == sorted(ref)
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], rtol=1e-5, atol=1e-7, msg=n)
    assert MSGTransformer(**TINY, use_checkpoint=True).layers[2].grad_checkpointing


def test_no_weight_decay_names_are_parameters():
    for ape in (False, True):
        for decay_msg_tokens in (True, False):  # True: the official recipe (its 'msg_token' named nothing)
            model = MSGTransformer(**TINY, ape=ape, decay_msg_tokens=decay_msg_tokens)
            names = {n for n, _ in model.named_parameters()}
            assert model.no_weight_decay() <= names
            assert ('msg_tokens' in model.no_weight_decay()) != decay_msg_tokens
            assert ('absolute_pos_embed' in model.no_weight_decay()) == ape
        for keyword in model.no_weight_decay_keywords():
            assert any(keyword in n for n in names), keyword


# ----------------------------------------------------------------------------- multi-scale features

def test_forward_intermediates():
    torch.manual_seed(0)
    model = MSGTransformer(**{**TINY, 'img_size': (128, 64)}).eval()
    x = torch.randn(2, 3, 128, 64)
    captured = []
    hooks = [s.blocks[-1].register_forward_hook(lambda m, i, o: captured.append(o)) for s in model.layers]
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert [tuple(m.shape) for m in maps] == [(2, 16, 32, 16), (2, 32, 16, 8), (2, 64, 8, 4), (2, 128, 4, 2)]
    assert [f['reduction'] for f in model.feature_info] == [4, 8, 16, 32]
    assert [f['num_chs'] for f in model.feature_info] == [m.shape[1] for m in maps]
    ws = TINY['window_size']
    for tokens, fmap in zip(captured, maps):  # window 0 of stage i (after its MSG) is the top-left ws x ws corner
        corner = tokens[:, 0, 1:].reshape(2, ws, ws, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(fmap[:, :, :ws, :ws], corner, rtol=0, atol=0)
        assert fmap.numel() == tokens[:, :, 1:].numel()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   model.norm(captured[-1][:, :, 0]).mean(1))


# ----------------------------------------------------------------------------- helpers

def test_shuffle_moves_chunk_j_of_window_i_to_chunk_i_of_window_j():
    B, nG, gs, N, C = 2, 3, 2, 5, 8
    G, c = gs * gs, C // (gs * gs)
    x = torch.randn(B, nG * G, N, C)
    y = shuffle_msg_(x.clone(), gs)
    torch.testing.assert_close(y[:, :, 1:], x[:, :, 1:], rtol=0, atol=0)
    for g in range(nG):
        for i in range(G):
            for j in range(G):
                torch.testing.assert_close(y[:, g * G + j, 0, i * c:(i + 1) * c], x[:, g * G + i, 0, j * c:(j + 1) * c],
                                           rtol=0, atol=0)
    assert shuffle_msg_(x.clone(), 1).equal(x)


@pytest.mark.parametrize('group_size', (1, 2))
def test_window_partition_round_trip_and_order(group_size):
    ws, H, W = 2, 8, 12
    x = torch.arange(2 * H * W * 3.).view(2, H, W, 3)
    windows = window_partition(x, ws, group_size)
    assert windows.shape == (2, H * W // ws ** 2, ws * ws, 3)
    assert window_reverse(windows, ws, H, W, group_size).equal(x)
    # Window 1 is to the right of window 0 (inside a group when group_size > 1 too).
    assert windows[:, 1].equal(x[:, :ws, ws:2 * ws].reshape(2, ws * ws, 3))
    if group_size == 2:  # window 2 is below window 0 (second row of the first group)
        assert windows[:, 2].equal(x[:, ws:2 * ws, :ws].reshape(2, ws * ws, 3))


def test_relative_position_index_matches_swin():
    from timm.models.swin_transformer import get_relative_position_index
    for ws in (2, 7):
        assert relative_position_index(ws).equal(get_relative_position_index(ws, ws))


# ----------------------------------------------------------------------------- CPU fast paths

def test_gradients_have_their_parameters_strides():
    # DDP copies each gradient into a bucket laid out like its parameter and warns ("Grad strides do not match
    # bucket view strides") when the strides differ, even only on a size-1 dim (TINY has a 1-head stage).
    model = MSGTransformer(**TINY).train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), n


def test_channels_last_conv_weights_keep_the_state_dict():
    # The downsample convs see channels-last inputs and store channels-last weights: same keys, shapes and
    # values in state_dicts, and the layout survives loading a contiguous state_dict.
    model = MSGTransformer(**TINY)
    conv = model.layers[0].downsample.reduction
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    sd = {k: v.contiguous() for k, v in MSGTransformer(**TINY).state_dict().items()}
    model.load_state_dict(sd)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert conv.weight.equal(sd['layers.0.downsample.reduction.weight'])


def test_msg_only_last_block_matches_the_full_block_in_training():
    # forward / forward_features compute only the MSG rows of the last block; compare with the full block
    # (what forward_intermediates runs), outputs and gradients, with drop path (same draws; dropout would draw
    # masks for fewer rows, so other masks).
    torch.manual_seed(0)
    model = MSGTransformer(**TINY, drop_path_rate=0.2).train()
    x = torch.randn(2, 3, 64, 64)

    def full(t):
        tokens = model._forward_stages(t, msg_only=False)[0]  # B, nW, N, C
        return model.head(model.norm(tokens[:, :, 0]).mean(1))

    out = {}
    for name, fn in (('msg_only', model), ('full', full)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        y = fn(x)
        y.logsumexp(-1).sum().backward()
        out[name] = y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(out['msg_only'][0], out['full'][0], rtol=1e-5, atol=1e-6)
    assert sorted(out['msg_only'][1]) == sorted(out['full'][1])  # every parameter still gets a gradient
    for n, g in out['full'][1].items():
        torch.testing.assert_close(out['msg_only'][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize('group_size', (1, 2))
def test_window_tokens_is_partition_then_cat(group_size):
    ws, H, W, C = 2, 8, 12, 3
    patches = torch.randn(2, H, W, C, requires_grad=True)
    msg_map = torch.randn(2, H // ws, W // ws, C, requires_grad=True)
    gs = group_size
    grouped = msg_map.view(2, H // (ws * gs), gs, W // (ws * gs), gs, C)
    got = window_tokens(patches, grouped, ws, gs)
    ref = torch.cat((window_partition(msg_map, 1, gs), window_partition(patches, ws, gs)), dim=2)
    assert got.equal(ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (patches, msg_map), g), torch.autograd.grad(ref, (patches, msg_map), g)):
        assert a.equal(b)
    # A broadcast MSG map (the first stage: every group starts from the same learned tokens).
    tokens = torch.randn(1, gs * gs, 1, C, requires_grad=True)
    nW = H * W // ws ** 2
    got = window_tokens(patches, tokens.view(1, 1, gs, 1, gs, C), ws, gs)
    ref = torch.cat((tokens.expand(2, nW // gs ** 2, gs * gs, 1, C).reshape(2, nW, 1, C),
                     window_partition(patches, ws, gs)), dim=2)
    assert got.equal(ref)
    torch.testing.assert_close(torch.autograd.grad(got, tokens, g)[0], torch.autograd.grad(ref, tokens, g)[0])
