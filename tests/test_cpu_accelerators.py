"""The CPU accelerators (models/cpu): the same function as the stock modules, installed only where they stand in for
unchanged stock code, never where the plain forward must run (GPU, autocast, tracing, export), and never hiding an
edit; and the per-shape kernel choice behind them (models/cpu/kernels.py)."""
import copy
import logging
import os
import time

import pytest
import timm
import torch
import torch.nn.functional as F

import models  # noqa: F401  (registers the timm names)
from fill import fill_
from models import cpu
from models.cpu import kernels, ops
from models.layers import Mlp
from models.mg_ssaf import MGSSAF, ConvMlp, MultiGranularityAttention
from models.msg_transformer import MessengerAttention, MSGBlock, MSGTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')
MSG_TINY = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=2,
                shuffle_size=(4, 4, 2, 1), num_classes=10)
MG_TINY = dict(img_size=64, embed_dim=24, depths=(1, 1, 2, 1), num_heads=(2, 6, 3, 4),
               global_ratio=(0., 0.5, 1., 0.), width=(0, 2, 2, 0), window_size=2, num_classes=10)
BUILD = {'msg': lambda **kw: MSGTransformer(**{**MSG_TINY, **kw}), 'mgssaf': lambda **kw: MGSSAF(**{**MG_TINY, **kw})}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def pair(family: str, **kw):
    """A plain model and a copy of it with the accelerators installed."""
    torch.manual_seed(0)
    plain = BUILD[family](**kw)
    fast = copy.deepcopy(plain)
    assert cpu.install(fast)
    return plain, fast


def grads(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same drop-path / dropout draws
    model(x).logsumexp(-1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(fast, plain):
    assert sorted(fast) == sorted(plain)  # every parameter still gets one
    total = torch.cat([g.flatten() for g in plain.values()]).norm()
    for n, g in plain.items():  # relative, with a floor for gradients that are zero up to rounding
        assert (fast[n] - g).norm() <= 1e-4 * torch.maximum(g.norm(), 1e-5 * total), n


# ----------------------------------------------------------------------------- the same function

SIZES = pytest.mark.parametrize('size', [(64, 64), (50, 70)], ids=['no-padding', 'padded'])


@SIZES
@pytest.mark.parametrize('family', ['msg', 'mgssaf'])
def test_eval_outputs_and_features_match_the_plain_model(family, size):
    plain, fast = pair(family, drop_path_rate=0.2)
    x = torch.randn(2, 3, *size)
    with torch.inference_mode():
        got = fast.eval()(x), *fast.forward_intermediates(x, intermediates_only=True)
        ref = plain.eval()(x), *plain.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-6


@SIZES
@pytest.mark.parametrize('drop_rate', (0.0, 0.1), ids=('fused-mlp', 'dropout'))
@pytest.mark.parametrize('family', ['msg', 'mgssaf'])
def test_training_gradients_match_the_plain_model(family, drop_rate, size):
    plain, fast = pair(family, drop_rate=drop_rate, drop_path_rate=0.2)
    x = torch.randn(2, 3, *size)
    assert_same_grads(grads(fast.train(), x, seed=3), grads(plain.train(), x, seed=3))


@pytest.mark.parametrize('policy', ['auto', 'plain', 'fused'])
@pytest.mark.parametrize('family', ['msg', 'mgssaf'])
def test_every_policy_matches_the_official_outputs(policy, family, monkeypatch):
    """Whatever this CPU chooses, the installed model computes the official function: the T parity fixtures under
    each policy (auto measures every op's candidates here, then runs the mixture it chose), with and without
    autograd."""
    monkeypatch.setenv(kernels.ENV_VAR, policy)
    kernels.reset()
    if family == 'msg':
        model = fill_(timm.create_model('msg_transformer_tiny'), seed=0).eval()
        ref = torch.load(os.path.join(FIXTURES, 'msg_tiny.parity.pt'))
    else:
        from test_mg_ssaf import _official_filled
        model = timm.create_model('mg_ssaf_tiny').eval()
        model.load_state_dict(_official_filled('tiny'))
        ref = torch.load(os.path.join(FIXTURES, 'mgssaf_tiny.parity.pt'), weights_only=False)
    names = cpu.install(model)
    assert (names == []) == (policy == 'plain')
    x = torch.randn(ref['input_shape'], generator=torch.Generator().manual_seed(ref['input_seed']))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            logits = model(x)
        assert rel(logits.detach(), ref['logits']) <= 1e-5, grad
    if policy == 'auto':
        decided = {k[0] for k in kernels.decisions()}
        assert decided >= {'linear', 'linear_add', 'linear_gelu'}
        # MSG's attention; SS-MSA's scores, timed without autograd (eval) and forward + backward
        assert decided >= ({'attention'} if family == 'msg' else {'ss_scores', 'ss_scores_train'})


def test_fused_mlp_refuses_a_second_backward():
    # Its backward reuses the saved buffers: a retain_graph second pass must fail loudly, not return garbage.
    _, fast = pair('msg')
    loss = fast.train()(torch.randn(1, 3, 64, 64)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match='second backward'):
        loss.backward()


@pytest.mark.parametrize('kernel_size', [3, 7])
def test_depthwise_conv_fast_backward_matches_native(kernel_size):
    """ConvMlp's hidden depthwise conv with its own backward: the same output and gradients as nn.Conv2d's."""
    from models.cpu.mg_ssaf import depthwise_conv_nhwc
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 12, kernel_size, padding=kernel_size // 2, groups=12)
    x = torch.randn(3, 10, 6, 12)  # B, H, W, C (H != W, map smaller than the kernel's reach)
    g = torch.randn(3, 10, 6, 12)
    outs, got = [], []
    for fast in (False, True):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        y = depthwise_conv_nhwc(xi, conv) if fast else conv(xi.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        y.backward(g)
        outs.append(y)
        got.append((xi.grad, conv.weight.grad.clone(), conv.bias.grad.clone()))
    assert rel(outs[1], outs[0]) < 1e-6
    for a, b in zip(got[1], got[0]):
        assert rel(a, b) < 1e-6


@pytest.mark.parametrize('window_size', [7, 3])
def test_full_window_scores_match_the_row_and_column_products(window_size):
    """SS-MSA's scores from one full-window product (its diagonals) equal the official per-row and per-column
    products, values and gradients of q and k, in the same layout."""
    from models.cpu.mg_ssaf import _ss_scores_full
    torch.manual_seed(0)
    attn = MultiGranularityAttention(64, num_heads=2, num_global_heads=0, window_size=window_size, strip_width=1)
    q, k = torch.randn(2, 5, 2, window_size, window_size, 32).unbind(0)  # B*nW, nH, i, j, d (views, as in _local)
    results = []
    for scores in (lambda a, b: attn._ss_scores(a, b), lambda a, b: _ss_scores_full(attn, a, b)):
        qi, ki = q.clone().requires_grad_(), k.clone().requires_grad_()
        row, col = scores(qi, ki)
        assert row.is_contiguous() and col.is_contiguous()
        (row.softmax(1).square().sum() + col.softmax(1).pow(3).sum()).backward()
        results.append((row, col, qi.grad, ki.grad))
    for full, split in zip(results[1], results[0]):
        assert full.shape == split.shape and rel(full, split) < 1e-6
    # The row score of query (i, j) and key (i, j') is q[i, j] . k[i, j'] * scale (layout B*nW, nH, j', i, j).
    i, j, j2 = 1, 2, 0
    expected = (q[3, 1, i, j] @ k[3, 1, i, j2]) * attn.scale
    assert torch.allclose(results[1][0][3, 1, j2, i, j], expected, rtol=1e-5)


def test_kernel_choice_timed_inside_a_checkpointed_block(monkeypatch):
    """The first training pass measures the SS scores forward and backward (``ss_scores_train``); inside an
    activation-checkpointed block that measurement must not count as tensors the block saved (the recomputation,
    which finds the choice made, would save fewer: CheckpointError)."""
    monkeypatch.setenv(kernels.ENV_VAR, 'auto')
    kernels.reset()
    torch.manual_seed(0)
    ckpt = MGSSAF(**MG_TINY, drop_path_rate=0., use_checkpoint=True).train()
    ref = MGSSAF(**MG_TINY, drop_path_rate=0.).train()
    ref.load_state_dict(ckpt.state_dict())
    cpu.install(ckpt)
    x = torch.randn(2, 3, 64, 64)
    ckpt(x).square().mean().backward()                     # measures here, inside the checkpointed blocks
    assert any(key[0] == 'ss_scores_train' for key in kernels.decisions())
    ref(x).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_an_ema_copy_computes_with_its_own_weights():
    """timm's ModelEmaV3 deep-copies the model: the copy's accelerated methods are bound to the copy."""
    _, fast = pair('msg')
    twin = copy.deepcopy(fast).eval()
    fast.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = fast(x)
        for p in twin.parameters():
            p.mul_(0.5)
        assert torch.equal(fast(x), before) and not torch.allclose(twin(x), before)
    assert cpu.installed(twin) == cpu.installed(fast) != []


# ----------------------------------------------------------------------------- never hiding an edit

@pytest.mark.parametrize('family,owner', [('msg', MessengerAttention), ('msg', Mlp),
                                          ('mgssaf', MultiGranularityAttention), ('mgssaf', ConvMlp)])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_patching_a_stock_forward_changes_the_cpu_logits(family, owner, mode, monkeypatch):
    """A researcher's edit to the attention's or the MLP's forward runs, accelerators installed or not."""
    _, fast = pair(family)
    fast.train(mode == 'train')
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(1)
    before = fast(x).detach()
    stock = owner.forward
    # (a scale, not a constant: the LayerNorms after a block would remove a shift of every channel alike)
    monkeypatch.setattr(owner, 'forward', lambda self, *a, **kw: stock(self, *a, **kw) * 1.5)
    torch.manual_seed(1)
    after = fast(x).detach()
    assert (after - before).abs().max() > 1e-3
    monkeypatch.undo()
    torch.manual_seed(1)
    assert torch.allclose(fast(x).detach(), before, rtol=1e-5, atol=1e-6)  # the accelerator is back


@pytest.mark.parametrize('family,name,stock', [('msg', 'msg_transformer_tiny', MessengerAttention),
                                               ('mgssaf', 'mg_ssaf_tiny', MultiGranularityAttention)])
def test_a_swapped_attention_keeps_its_own_forward(family, name, stock, caplog):
    """``attn_layer=Sub`` through timm reaches every block; installing leaves those blocks alone and says so."""
    class Sub(stock):
        def forward(self, x, *args, **kwargs):
            return super().forward(x, *args, **kwargs) * 0.5

    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, attn_layer=Sub).eval()
    blocks = [m for m in model.modules() if hasattr(m, 'attn') and hasattr(m, 'mlp')]
    assert blocks and all(type(b.attn) is Sub for b in blocks)
    torch.manual_seed(0)
    stock_model = timm.create_model(name, num_classes=10).eval()
    stock_model.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        assert (ref - stock_model(x)).abs().max() > 1e-3  # Sub changes the function
        with caplog.at_level(logging.INFO):
            cpu.install(model, logging.getLogger('test'))
        assert torch.allclose(model(x), ref, rtol=1e-5, atol=1e-6)
    kept = [r.getMessage() for r in caplog.records if 'keeps its own forward' in r.getMessage()]
    assert len(kept) == len(blocks) and 'layers.0.blocks.0' in kept[0] and 'Sub' in kept[0]


def test_an_edited_stock_source_is_not_accelerated(monkeypatch, caplog):
    """The accelerators pin the source of what they stand in for: an edit in the model file leaves the block on its
    own forward (simulated here by a different source text for MSGBlock.forward)."""
    import inspect
    real = inspect.getsource
    monkeypatch.setattr(inspect, 'getsource',
                        lambda fn: real(fn) + '# edited\n' if fn is MSGBlock.forward else real(fn))
    torch.manual_seed(0)
    model = MSGTransformer(**MSG_TINY)
    with caplog.at_level(logging.INFO):
        names = cpu.install(model, logging.getLogger('test'))
    assert not any(isinstance(model.get_submodule(n), MSGBlock) for n in names)
    assert any('MSGBlock.forward differs' in r.getMessage() for r in caplog.records)


def test_the_pins_match_the_stock_source():
    """If this fails, a stock function an accelerator stands in for changed: check that the accelerator still
    computes what the new code computes (the tests above), then update its pin to ``source_pin(fn)``."""
    cpu._load()
    for acc in cpu.ACCELERATORS:
        for fn, pin in acc.pins.items():
            assert cpu.source_pin(fn) == pin, f'{fn.__qualname__}: pinned {pin}, now {cpu.source_pin(fn)}'


def test_uninstall_restores_the_plain_methods():
    plain, fast = pair('mgssaf')
    assert cpu.installed(fast)
    cpu.uninstall(fast)
    assert cpu.installed(fast) == []
    assert all('forward' not in m.__dict__ for m in fast.modules())
    torch.jit.script(fast.eval())  # scriptable again: its own code


# ----------------------------------------------------------------------------- where they never run

@pytest.mark.parametrize('family', ['msg', 'mgssaf'])
def test_they_never_run_under_autocast_tracing_or_export(family, monkeypatch):
    calls = []
    real = ops.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(f'models.cpu.{"msg" if family == "msg" else "mg_ssaf"}.linear', counting)
    _, fast = pair(family)
    fast.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fast(x)
    assert calls, 'the accelerator runs in plain eager float32'
    calls.clear()
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            fast(x)
        fast.double()(x.double())
        fast.float()
        traced = torch.jit.trace(fast, x, check_trace=False)  # (its check reruns the eager model)
        exported = torch.export.export(fast, (x,))
    assert calls == []
    assert 'mkldnn' not in str(traced.graph) and 'mkldnn' not in str(exported.graph)


def test_they_never_run_on_cuda_tensors():
    """A fake CUDA input (no GPU needed): ``applies`` is False for it and for any tensor subclass."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode()
    with mode:
        x = torch.empty(2, 3, device='cuda')
    assert not ops.applies(x)
    assert ops.applies(torch.zeros(2)) == ops.ONEDNN_LINEAR
    assert not ops.applies(torch.zeros(2, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- the per-shape choice

@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.reset()
    yield
    kernels.reset()


def _candidates(fused_s, plain_s, calls):
    def fused():
        calls['fused'] += 1
        time.sleep(fused_s)

    def plain():
        calls['plain'] += 1
        time.sleep(plain_s)
    return fused, plain


@pytest.mark.parametrize('fused_s,plain_s,expected', [(0.0, 0.004, True), (0.004, 0.0, False)])
def test_auto_measures_once_and_keeps_the_faster(fused_s, plain_s, expected, fresh):
    calls = {'fused': 0, 'plain': 0}
    x = torch.zeros(4, 8)
    fused, plain = _candidates(fused_s, plain_s, calls)
    assert kernels.use_fused('linear', (x,), fused, plain) is expected
    assert calls == {'fused': 1 + kernels.ROUNDS, 'plain': 1 + kernels.ROUNDS}
    assert kernels.use_fused('linear', (x,), fused, plain) is expected          # cached: not measured again
    assert calls == {'fused': 1 + kernels.ROUNDS, 'plain': 1 + kernels.ROUNDS}
    kernels.use_fused('linear', (torch.zeros(5, 8),), fused, plain)            # another shape: measured
    assert calls['fused'] == 2 * (1 + kernels.ROUNDS)
    line = kernels.summary()
    assert line.startswith('CPU kernels (auto, measured on ') and f'linear: {2 * expected} of 2 shapes fused' in line


def test_a_tie_goes_to_the_plain_op_or_to_the_one_that_saves_memory(fresh, monkeypatch):
    # Timings as measured, without a clock: the fused candidate 1% slower (within MARGIN), or 10% slower.
    def timed(fused_ms, plain_ms):
        monkeypatch.setattr(kernels, '_run_ms', lambda fn: fn())
        return lambda: fused_ms, lambda: plain_ms
    assert not kernels.use_fused('attention', (torch.zeros(1),), *timed(1.01, 1.0))
    assert kernels.use_fused('mlp', (torch.zeros(1),), *timed(1.01, 1.0), prefer_fused=True)
    assert not kernels.use_fused('mlp', (torch.zeros(2),), *timed(1.10, 1.0), prefer_fused=True)


def test_the_environment_fixes_the_policy_and_is_checked(monkeypatch, fresh):
    calls = {'fused': 0, 'plain': 0}
    monkeypatch.setenv(kernels.ENV_VAR, 'fused')
    assert kernels.use_fused('linear', (torch.zeros(2),), *_candidates(0, 0, calls)) and calls['fused'] == 0
    assert kernels.summary() == f'CPU kernels: fused (fixed by {kernels.ENV_VAR})'
    monkeypatch.setenv(kernels.ENV_VAR, 'plain')
    assert cpu.install(MSGTransformer(**MSG_TINY)) == []
    monkeypatch.setenv(kernels.ENV_VAR, 'fastest')
    with pytest.raises(ValueError, match=f'{kernels.ENV_VAR}=.fastest. is not one of auto, fused, plain'):
        cpu.install(MSGTransformer(**MSG_TINY))


def test_main_refuses_an_unknown_policy_in_one_line(tmp_path, digits_dir):
    import subprocess
    from conftest import DEMO_CFG, PYTHON, subprocess_env
    env = dict(subprocess_env(), MSGSSAF_CPU_KERNELS='fastest')
    proc = subprocess.run([PYTHON, os.path.join(ROOT, 'main.py'), '--cfg', DEMO_CFG, '--data-path', digits_dir,
                           '--output', str(tmp_path), '--device', 'cpu'], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith('error: the environment '
                                                                                   'variable MSGSSAF_CPU_KERNELS')
    assert not any(f.startswith('ckpt') for _, _, files in os.walk(tmp_path) for f in files)


def test_gradients_of_a_whole_demo_model_match(monkeypatch):
    """The backward's GEMMs (oneDNN or torch.mm) and the memory-saving MLP compute the plain modules' gradients,
    every parameter's, on the demo configs' models."""
    from config import load_config_file
    from models import build_model
    for cfg in ('configs/msg_demo.yaml', 'configs/MG-SSAF/MG-SSAF-demo.yaml'):
        config = load_config_file(os.path.join(ROOT, cfg))
        torch.manual_seed(0)
        plain = build_model(config).train()
        fast = copy.deepcopy(plain)
        cpu.install(fast)
        x = torch.randn(4, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
        out = {}
        for name, model in (('plain', plain), ('fast', fast)):
            torch.manual_seed(1)
            F.cross_entropy(model(x), torch.arange(4)).backward()
            out[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert_same_grads(out['fast'], out['plain'])
