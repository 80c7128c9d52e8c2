"""Mixed precision: the autocast code paths that CUDA runs (fp16/bf16) exercised on CPU with bfloat16.

Softmax, norms and the attention bias must stay stable under autocast: outputs close to float32, finite
gradients for every parameter.
"""
import os

import pytest
import torch

from config import load_config_file
from models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['configs/msg_demo.yaml', 'configs/MG-SSAF/MG-SSAF-demo.yaml']


@pytest.mark.parametrize('cfg', CONFIGS)
@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'plain'])
def test_bf16_autocast_forward_and_backward(cfg, fused):
    torch.manual_seed(0)
    config = load_config_file(os.path.join(ROOT, cfg), ['MODEL.FUSED_ATTN', str(fused)])
    model = build_model(config)
    x = torch.randn(4, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all()
    assert ((low.float() - ref).norm() / ref.norm()).item() < 0.05      # bf16 keeps ~3 significant digits
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_torch_compile_matches_eager():
    """--compile: inductor must lower the model (MSG's oneDNN fast path steps aside) and compute the same."""
    torch.manual_seed(0)
    model = build_model(load_config_file(os.path.join(ROOT, CONFIGS[0]))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        ref = model(x)
        out = torch.compile(model)(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_compile_failure_runs_eagerly(monkeypatch, caplog):
    """A model inductor cannot compile (here: a compiler that always fails) trains and evaluates eagerly, with
    one warning."""
    import logging

    import torch._dynamo
    import torch._inductor.compile_fx

    import utils
    calls = []

    def failing_compile_fx(gm, example_inputs, **kwargs):
        calls.append(1)
        raise RuntimeError('no C++ compiler on this machine')

    monkeypatch.setattr(torch._inductor.compile_fx, 'compile_fx', failing_compile_fx)
    monkeypatch.setattr(torch._dynamo.config, 'suppress_errors', False)  # restored afterwards
    monkeypatch.setattr(utils, '_compile_warned', False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model(load_config_file(os.path.join(ROOT, CONFIGS[0])))
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level(logging.WARNING, logger='test'):
        compiled = utils.compile_model(model, logging.getLogger('test'))
        model.eval()
        with torch.no_grad():
            out, ref = compiled(x), model(x)
        model.train()
        compiled(x).sum().backward()
    torch._dynamo.reset()
    assert calls and ((out - ref).norm() / ref.norm()).item() < 1e-5
    assert all(p.grad is not None for p in model.parameters())
    warnings = [r for r in caplog.records if r.name == 'test' and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and 'no C++ compiler' in warnings[0].getMessage()


@pytest.mark.parametrize('kh,kw', [(2, 2), (7, 7), (1, 3)])
def test_bf16_attention_fusion_gradients_of_a_channels_last_model(kh, kw):
    """Under bfloat16 autocast the gradients of Attention Fusion's conv match float32's, also after
    ``model.to(memory_format=torch.channels_last)``: PyTorch's CPU weight gradient of a channels-last-3d depthwise
    conv3d reads memory it never wrote (garbage, NaN on some machines), so the conv must not take that layout."""
    from models.mg_ssaf import AttentionFusion
    torch.manual_seed(0)
    fusion = AttentionFusion(2).to(memory_format=torch.channels_last)
    attn = torch.rand(4, 2, kh, kw, 196)
    grad = torch.randn(4, 2, kh, kw, 196)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        fusion.zero_grad()
        a = attn.clone().requires_grad_()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = fusion.spatial_conv(a)
        assert out.dtype == dtype
        out.float().backward(grad)
        got[dtype] = [t.grad.clone() for t in (a, fusion.spatial.weight, fusion.spatial.bias)]
    for low, ref in zip(got[torch.bfloat16], got[torch.float32]):
        assert torch.isfinite(low).all()
        assert ((low - ref).norm() / ref.norm()).item() < 5e-2  # bfloat16 rounding; the bad path is off by ~100%
