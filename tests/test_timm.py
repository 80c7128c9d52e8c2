"""The timm side of both backbones, beyond what timm's own suite checks (tools/run_timm_suite.py runs that):
pretrained configs, loading files through ``pretrained_cfg_overlay`` (the same weights and logits as main.py's
``--eval --resume``), relative-position tables at another window, features, the data config, scripted models."""
import os

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from timm.models._manipulate import group_parameters

from checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights, load_pretrained
from config import load_config_file
from data.transforms import build_transform
from fill import fill_
from models import build_model
from models.mg_ssaf import MGSSAF, to_official_state_dict
from models.msg_transformer import MSGTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [f'{arch}_{v}' for arch in ('msg_transformer', 'mg_ssaf') for v in ('tiny', 'small', 'base')]
YAMLS = {'msg_transformer_tiny': 'configs/msg_tiny_p4_win7_224.yaml', 'mg_ssaf_tiny': 'configs/MG-SSAF/MG-SSAF-T.yaml'}
# Small configs with every mechanism (all shuffle groups; local, mixed and global MG-SSAF stages): 64 x 64 inputs.
MSG_SMALL = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2,
                 shuffle_size=(4, 4, 2, 1), num_classes=10)
MG_SMALL = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 6, 3, 4), global_ratio=(0., 0.5, 1., 0.),
                width=(0, 2, 2, 0), window_size=2, num_classes=10)


def small(cls):
    torch.manual_seed(0)
    return cls(**(MSG_SMALL if cls is MSGTransformer else MG_SMALL)).eval()


def official_mg_ssaf_file(model: MGSSAF, path: str) -> str:
    """An official-layout MG-SSAF file of ``model``'s weights, with the unused attention norms the released files
    carry (as tests/test_e2e.py makes one)."""
    official = to_official_state_dict(model.state_dict())
    for key in [k for k in official if k.endswith('.norm1.weight') and '.blocks.' in k]:
        width = official[key].shape[0]
        official[key.replace('norm1.weight', 'attn.norm.weight')] = torch.ones(width)
        official[key.replace('norm1.weight', 'attn.norm.bias')] = torch.zeros(width)
    torch.save({'model': official}, path)
    return path


def eval_resume_model(name: str, path: str) -> torch.nn.Module:
    """What ``main.py --eval --resume <path>`` evaluates: the YAML's model with the file's weights."""
    model = build_model(load_config_file(os.path.join(ROOT, YAMLS[name])))
    load_model_weights(model, extract_state_dict(load_checkpoint_file(path), path), path)
    return model.eval()


# ----------------------------------------------------------------------------- pretrained configs

@pytest.mark.parametrize('name', NAMES)
def test_pretrained_cfg(name):
    cfg = get_pretrained_cfg(name).to_dict()
    with torch.device('meta'):
        model = timm.create_model(name)
    assert (cfg['input_size'], cfg['min_input_size']) == ((3, 224, 224), (3, model.size_multiple, model.size_multiple))
    assert cfg['fixed_input_size'] is False  # any multiple of 224 runs (MSG: without ape)
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['crop_mode']) == (0.875, 'bicubic', 'center')
    assert (cfg['mean'], cfg['std']) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert cfg['num_classes'] == model.num_classes == 1000
    assert cfg['pool_size'] == ((1, 1) if name.startswith('msg') else (7, 7))  # forward_features at 224
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd and cfg['classifier'] == 'head' and 'head.weight' in sd
    assert cfg['license'] == ('apache-2.0' if name.startswith('msg') else 'mit')
    assert cfg['paper_name'] and cfg['origin_url'].startswith('https://github.com/')
    # Nothing that downloads; the released file named where there is one.
    assert not cfg.get('url') and not cfg.get('hf_hub_id') and not cfg.get('file')
    assert name not in timm.list_models(pretrained=True)
    if name.startswith('mg_ssaf'):
        assert f"MG-SSAF-{name[8].upper()}.pth" in cfg['notes'][0]
    assert model.pretrained_cfg['architecture'] == name and model.pretrained_cfg['tag'] == 'in1k'


def test_pretrained_without_a_file_is_a_clear_error(tmp_path, monkeypatch):
    import timm.models._builder as builder

    def no_download(*args, **kwargs):
        raise AssertionError('tried to download')

    for fn in ('load_state_dict_from_url', 'load_state_dict_from_hf', 'download_cached_file'):
        monkeypatch.setattr(builder, fn, no_download)
    with pytest.raises(ValueError, match=r"no pretrained weights are downloaded; .*pretrained_cfg_overlay=dict\(file="
                                         r".*MG-SSAF-T\.pth"):
        timm.create_model('mg_ssaf_tiny', pretrained=True)
    with pytest.raises(ValueError, match='no pretrained weights are downloaded'):
        timm.create_model('msg_transformer_tiny', pretrained=True)
    missing = str(tmp_path / 'MG-SSAF-T.pth')
    with pytest.raises(FileNotFoundError, match=f"mg_ssaf_tiny: pretrained file not found: '{missing}'"):
        timm.create_model('mg_ssaf_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=missing))


# ----------------------------------------------------------------------------- weights the timm way

@pytest.mark.parametrize('name', ['mg_ssaf_tiny', 'msg_transformer_tiny'])
def test_overlay_file_gives_the_eval_resume_logits(tmp_path, name):
    source = fill_(timm.create_model(name), seed=1).eval()
    path = str(tmp_path / 'official.pth')
    if name.startswith('mg_ssaf'):
        official_mg_ssaf_file(source, path)  # key map, 1x1 conv kernels, unused attention norms
    else:
        torch.save({'model': source.state_dict()}, path)  # MSG-Transformer's official layout is ours
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    reference = eval_resume_model(name, path)
    assert model.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(x)
        assert torch.equal(logits, reference(x))
        assert torch.equal(logits, source(x))
    # Another class count: timm drops the file's classifier (the new one is initialised), loads the rest.
    head10 = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=10)
    assert head10.head.weight.shape == (10, head10.head_hidden_size)
    for k, v in head10.state_dict().items():
        assert k.startswith('head.') or torch.equal(v, source.state_dict()[k]), k


def test_relative_position_tables_resized_for_another_window(tmp_path):
    # 384 = 4 x 96 takes window 12 (the Swin recipe): the file's (13^2, nH) tables become (23^2, nH), bicubically,
    # exactly as --pretrained (checkpoint.load_pretrained) and set_input_size resize them.
    source = fill_(timm.create_model('msg_transformer_tiny'), seed=2)
    path = str(tmp_path / 'msg_t_224.pth')
    torch.save({'model': source.state_dict()}, path)
    kwargs = dict(img_size=384, window_size=12)
    model = timm.create_model('msg_transformer_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              **kwargs).eval()
    via_main = timm.create_model('msg_transformer_tiny', **kwargs)
    load_pretrained(via_main, path, _Log())
    resized = source.eval()
    resized.set_input_size(**kwargs)
    table = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert model.state_dict()[table].shape == (23 * 23, 2) and source.state_dict()[table].shape == (23 * 23, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, via_main.state_dict()[k]), k
        assert torch.equal(v, resized.state_dict()[k]), k
    # the centre of the resized grid (offset 0) is the centre of the file's grid
    original = torch.load(path, weights_only=True)['model'][table]
    torch.testing.assert_close(model.state_dict()[table][23 * 11 + 11], original[13 * 6 + 6], rtol=0, atol=1e-6)
    assert torch.equal(model.layers[0].blocks[0].attn.relative_position_index,
                       MSGTransformer(img_size=384, window_size=12).layers[0].blocks[0].attn.relative_position_index)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(1, 3, 384, 384))).all()


@pytest.mark.parametrize('kwargs', [dict(img_size=448), dict(img_size=384, window_size=6)])
def test_mg_ssaf_file_loads_at_another_size(tmp_path, kwargs):
    # No MG-SSAF weight depends on the size or the window: the official file loads as it is.
    source = fill_(timm.create_model('mg_ssaf_tiny'), seed=3)
    path = official_mg_ssaf_file(source, str(tmp_path / 'MG-SSAF-T.pth'))
    model = timm.create_model('mg_ssaf_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    side = kwargs['img_size']
    with torch.inference_mode():
        assert model.eval()(torch.randn(1, 3, side, side)).shape == (1, 1000)


# ----------------------------------------------------------------------------- features

@pytest.mark.parametrize('name, channels', [('msg_transformer_tiny', [64, 128, 256, 512]),
                                            ('mg_ssaf_tiny', [96, 192, 384, 768])])
def test_features_only(name, channels):
    torch.manual_seed(0)
    full = timm.create_model(name).eval()
    features = timm.create_model(name, features_only=True)
    kept = features.model.state_dict()
    features.model.load_state_dict({k: v for k, v in full.state_dict().items() if k in kept})
    features.eval()
    assert type(features).__name__ == 'FeatureGetterNet'
    assert features.feature_info.channels() == channels
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert not any(k.startswith(('model.head', 'model.norm')) for k in features.state_dict())  # pruned
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        maps = features(x)
        expected = full.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(2, c, 224 // r, 224 // r) for c, r in zip(channels, (4, 8, 16, 32))]
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)
    # out_indices: the stages after the last one asked for are not even built into the forward
    two = timm.create_model(name, features_only=True, out_indices=(0, 1))
    assert two.feature_info.channels() == channels[:2] and len(two.model.layers) == 2
    assert two.model.layers[1].downsample is None
    with torch.inference_mode():
        assert [m.shape[1] for m in two(x)] == channels[:2]


@pytest.mark.parametrize('cls', [MSGTransformer, MGSSAF])
def test_forward_intermediates_api(cls):
    model = small(cls)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))  # bit for bit (MSG: the MSG-only last block too)
        assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, maps[2:]))
        picked = model.forward_intermediates(x, indices=[0, -1], output_fmt='NHWC', intermediates_only=True)
        assert torch.equal(picked[0], maps[0].permute(0, 2, 3, 1)) and torch.equal(picked[1], maps[3].permute(0, 2, 3, 1))
        early, (first,) = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(early, maps[1].permute(0, 2, 3, 1))  # the last computed stage, NHWC, no final norm
        _, normed = model.forward_intermediates(x, indices=[3], norm=True)
        torch.testing.assert_close(normed[0], model.norm(maps[3].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        with pytest.raises(ValueError, match='output_fmt'):
            model.forward_intermediates(x, output_fmt='NLC')


@pytest.mark.parametrize('cls', [MSGTransformer, MGSSAF])
def test_heads_pools_and_pruning(cls):
    model = small(cls)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fmap = model.forward_features(x)  # B, h, w, C (NHWC)
        assert fmap.shape[-1] == model.num_features and model.output_fmt == 'NHWC'
        pre = model.forward_head(fmap, pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre) and pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(5, global_pool='')
        per_position = model(x)  # the head on every position of the unpooled map
        assert per_position.shape == (*fmap.shape[:3], 5)
        if cls is MSGTransformer:  # a linear head: pooling commutes with it (MG-SSAF's head_hidden has a GELU)
            torch.testing.assert_close(per_position.mean((1, 2)), model.head(pre), rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match='global_pool'):
            model.reset_classifier(0, 'max')
        taps = model.forward_intermediates(x, intermediates_only=True)
        model.prune_intermediate_layers([1])
        assert len(model.layers) == 2 and model.num_features == model.head_hidden_size == model.feature_info[1]['num_chs']
        assert torch.equal(model.forward_features(x).permute(0, 3, 1, 2), taps[1])  # features end at the tap
        model.reset_classifier(3, 'avg')
        assert model(x).shape == (2, 3)


@pytest.mark.parametrize('cls', [MSGTransformer, MGSSAF])
def test_group_matcher_orders_parameters_by_depth(cls):
    model = small(cls)
    layer = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    stem, block0, down0, block1, block3, norm, head = (layer[n] for n in (
        'patch_embed.' + next(iter(model.patch_embed.state_dict())), 'layers.0.blocks.0.norm1.weight',
        'layers.0.downsample.norm.weight', 'layers.1.blocks.0.norm1.weight', 'layers.3.blocks.0.norm1.weight',
        'norm.weight', 'head.weight'))
    # depth order; a stage's downsample and the final norm share the group of the block before them (timm's
    # 99999 suffix, as its Swin's final norm)
    assert stem < block0 == down0 < block1 < block3 == norm < head
    assert len(set(layer.values())) == 2 + sum(len(s.blocks) for s in model.layers)
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert coarse['layers.0.blocks.0.norm1.weight'] == coarse['layers.0.downsample.norm.weight']


def test_set_input_size():
    model = timm.create_model('mg_ssaf_tiny', img_size=224)
    model.set_input_size(img_size=448)
    assert model.img_size == (448, 448)
    model.set_input_size(img_size=384)  # any size now (local windows padded, partial pools)
    assert model.img_size == (384, 384)
    with pytest.raises(ValueError, match='must be positive'):
        model.set_input_size(img_size=0)
    assert model.img_size == (384, 384)  # unchanged by the failed call
    model.set_input_size(img_size=384, window_size=6)
    assert model.size_multiple == 1 and model.layers[1].blocks[0].attn.window_size == 6
    msg = MSGTransformer(**MSG_SMALL)
    msg.set_input_size(img_size=96)  # any size (padded inside)
    assert msg.img_size == (96, 96)
    with pytest.raises(ValueError, match='must be positive'):
        msg.set_input_size(img_size=0)
    assert msg.img_size == (96, 96)


# ----------------------------------------------------------------------------- data config

class _Log:
    def info(self, msg):
        pass


@pytest.mark.parametrize('name', list(YAMLS))
@pytest.mark.parametrize('size', [224, 448])
def test_resolve_data_config_is_our_eval_transform(name, size):
    # timm's data config is the weights' (224); another size is asked for, as timm's scripts do.
    with torch.device('meta'):
        model = timm.create_model(name, img_size=size)
    args = {} if size == 224 else {'input_size': (3, size, size)}
    timm_transform = create_transform(**resolve_data_config(args, model=model))
    ours = build_transform(load_config_file(os.path.join(ROOT, YAMLS[name]), ['DATA.IMG_SIZE', str(size)]),
                           is_train=False)
    image = Image.fromarray(torch.randint(0, 256, (311, 517, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(size)).numpy())
    a, b = timm_transform(image), ours(image)
    assert a.shape == (3, size, size) and torch.equal(a, b)


# ----------------------------------------------------------------------------- scripted and traced

@pytest.mark.parametrize('cls', [MSGTransformer, MGSSAF])
def test_scripted_model_takes_the_plain_path_and_matches(cls):
    model = small(cls)
    scripted = torch.jit.script(model)
    assert '_linear_pointwise' not in str(scripted.inlined_graph)  # no oneDNN op was compiled in
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)  # vs the eager fast path
        x = torch.randn(1, 3, 90, 70)  # a size that needs padding: the scripted padding too
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cls', [MSGTransformer, MGSSAF])
def test_fx_traced_model_matches_eager(cls):
    # timm's torch.fx feature extraction (its leaf modules and functions): the traced graph runs the plain path
    # (the in-place MSG helpers as single nodes, which dead-code elimination keeps) and gives the eager model's
    # logits and gradients.
    from timm.models._features_fx import create_feature_extractor
    model = small(cls)
    traced = create_feature_extractor(model, return_nodes={'head': 'logits'}).eval()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for net in (model, traced):
        net.zero_grad(set_to_none=True)
        out = net(x)
        out = out['logits'] if isinstance(out, dict) else out
        out.logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
        if net is model:
            expected = out.detach()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-6)
    assert grads[1].keys() == grads[0].keys() and all(g is not None for g in grads[1].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------- tools/run_timm_suite.py

def test_timm_suite_copy_only_appends_our_modules():
    from tools.run_timm_suite import with_our_modules
    source = "A = 1\nFEAT_INTER_FILTERS = [\n    'vit', 'swin_transformer',\n]\n\nNON_STD_FILTERS = ['vit_*']\n"
    changed = with_our_modules(source)
    assert changed.replace(changed.splitlines()[4] + '\n', '', 1) == source  # one line added, nothing else
    scope = {}
    exec(changed, scope)
    assert scope['FEAT_INTER_FILTERS'] == ['vit', 'swin_transformer', 'msg_transformer', 'mg_ssaf']
    assert scope['NON_STD_FILTERS'] == ['vit_*']


def test_timm_suite_reads_the_worker_count():
    from tools.run_timm_suite import _cores, _workers
    cores = _cores()
    assert _workers([]) == 1 and _workers(['-x', '-k', 'msg']) == 1
    assert _workers(['-n', '3']) == 3 and _workers(['-n4']) == 4 and _workers(['-x', '-n', 'auto']) == cores
    assert _workers(['-n', 'many']) == 1           # left to pytest-xdist to refuse, in one line


def test_timm_suite_without_network_says_so_and_passes(monkeypatch, capsys):
    import tools.run_timm_suite as suite

    def offline(version, folder):
        raise RuntimeError('ERROR: No matching distribution found for timm==1.0.31')

    monkeypatch.setattr(suite, 'fetch_test_models', offline)
    assert suite.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith('timm suite: skipped, cannot fetch the timm ')


def test_scripting_one_model_after_the_other_keeps_both_right():
    """TorchScript gives a module type of other constants a mangled name, and then an ``isinstance`` on a submodule
    compiled later is False: a scripted MSG-Transformer after a scripted MG-SSAF (LayerNorm eps 1e-6 there, 1e-5
    here) skipped its stem norm. The forwards test no submodule's type."""
    scripted = [torch.jit.script(small(cls)) for cls in (MGSSAF, MSGTransformer)]
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        for s, cls in zip(scripted, (MGSSAF, MSGTransformer)):
            torch.testing.assert_close(s(x), small(cls)(x), rtol=1e-5, atol=1e-6)
