"""The CPU kernel choice (models/kernels.py): measured once per signature, fixed on request, carried in checkpoints."""
import time

import pytest
import torch

from models import kernels


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.reset()
    kernels.set_policy('auto')
    yield
    kernels.reset()
    kernels.set_policy('auto')


def _candidates(fused_s, plain_s, calls):
    def fused():
        calls['fused'] += 1
        time.sleep(fused_s)

    def plain():
        calls['plain'] += 1
        time.sleep(plain_s)
    return fused, plain


@pytest.mark.parametrize('fused_s,plain_s,expected', [(0.0, 0.004, True), (0.004, 0.0, False)])
def test_auto_measures_once_and_keeps_the_faster(fused_s, plain_s, expected):
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


def test_a_tie_goes_to_the_plain_op():
    calls = {'fused': 0, 'plain': 0}
    assert not kernels.use_fused('attention', (torch.zeros(1),), *_candidates(0.002, 0.002, calls))


@pytest.mark.parametrize('mode', ['fused', 'plain'])
def test_fixed_policies_never_measure(mode, monkeypatch):
    calls = {'fused': 0, 'plain': 0}
    kernels.set_policy(mode)
    assert kernels.use_fused('linear', (torch.zeros(2),), *_candidates(0, 0, calls)) is (mode == 'fused')
    assert calls == {'fused': 0, 'plain': 0} and kernels.summary() == f'CPU kernels: {mode} (fixed by MODEL.CPU_KERNELS)'
    kernels.set_policy('auto')
    monkeypatch.setenv(kernels.ENV_VAR, mode)                                    # the environment wins
    assert kernels.policy() == mode and kernels.summary().endswith(f'(fixed by {kernels.ENV_VAR})')
    monkeypatch.setenv(kernels.ENV_VAR, 'fastest')
    with pytest.raises(ValueError, match='auto, fused, plain'):
        kernels.policy()


def test_decisions_travel_with_a_checkpoint_on_the_same_machine():
    calls = {'fused': 0, 'plain': 0}
    x = torch.zeros(3, 3)
    kernels.use_fused('linear', (x,), *_candidates(0.0, 0.003, calls))
    import io
    buf = io.BytesIO()
    torch.save(kernels.export(), buf)
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)           # plain data, as checkpoints need
    kernels.reset()
    assert kernels.restore(saved) == 1
    calls = {'fused': 0, 'plain': 0}
    assert kernels.use_fused('linear', (x,), *_candidates(0.003, 0.0, calls)) and calls['fused'] == 0
    kernels.reset()
    other = dict(saved, machine=dict(saved['machine'], cpu='another CPU'))
    assert kernels.restore(other) == 0 and not kernels.decisions()


@pytest.mark.parametrize('policy', ['auto', 'plain', 'fused'])
@pytest.mark.parametrize('family', ['msg', 'mgssaf'])
def test_every_kernel_policy_matches_the_official_outputs(policy, family, monkeypatch):
    """Whatever the CPU chooses, the model computes the official function: the T parity fixtures under each policy
    (auto measures every op's two kernels here, then runs the mixture it chose), in eval and with autograd."""
    import os
    import timm
    import models  # noqa: F401
    from fill import fill_
    fixtures = os.path.join(os.path.dirname(__file__), 'fixtures')
    if family == 'msg':
        model = fill_(timm.create_model('msg_transformer_tiny'), seed=0).eval()
        ref = torch.load(os.path.join(fixtures, 'msg_tiny.parity.pt'))
    else:
        from test_mg_ssaf import _official_filled
        model = timm.create_model('mg_ssaf_tiny').eval()
        model.load_state_dict(_official_filled('tiny'))
        ref = torch.load(os.path.join(fixtures, 'mgssaf_tiny.parity.pt'), weights_only=False)
    monkeypatch.setenv(kernels.ENV_VAR, policy)
    x = torch.randn(ref['input_shape'], generator=torch.Generator().manual_seed(ref['input_seed']))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            logits = model(x)
        rel = ((logits.detach().double() - ref['logits'].double()).norm() / ref['logits'].double().norm()).item()
        assert rel <= 1e-5, (grad, rel)
    if policy == 'auto':
        decided = {k[0] for k in kernels.decisions()}
        assert decided >= {'linear', 'linear_add', 'linear_gelu'}
        if family == 'mgssaf':  # SS-MSA's scores: timed without autograd (eval) and forward + backward
            assert decided >= {'ss_scores', 'ss_scores_train'}


def test_a_tie_goes_to_the_fused_candidate_where_it_saves_memory():
    calls = {'fused': 0, 'plain': 0}
    assert kernels.use_fused('mlp', (torch.zeros(1),), *_candidates(0.002, 0.002, calls), prefer_fused=True)
    assert not kernels.use_fused('mlp', (torch.zeros(2),), *_candidates(0.004, 0.0, calls), prefer_fused=True)


@pytest.mark.parametrize('cfg', ['configs/msg_demo.yaml', 'configs/MG-SSAF/MG-SSAF-demo.yaml'])
def test_fused_and_plain_kernels_give_the_same_gradients(cfg, monkeypatch):
    """The backward's GEMMs (oneDNN or torch.mm, ``layers._grad_gemm``) and the memory-saving MLP compute the plain
    modules' gradients: every parameter's, under the fused and the plain policy."""
    import os
    from config import load_config_file
    from models import build_model
    config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), cfg))
    torch.manual_seed(0)
    model = build_model(config).train()
    x = torch.randn(4, 3, config.DATA.IMG_SIZE, config.DATA.IMG_SIZE)
    target = torch.arange(4)
    grads = {}
    for policy in ('plain', 'fused'):
        monkeypatch.setenv(kernels.ENV_VAR, policy)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)                                     # the same drop-path draws
        torch.nn.functional.cross_entropy(model(x), target).backward()
        grads[policy] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Relative to each gradient, with a floor for those that are zero up to rounding (MSG's last-stage rel_pos_msg
    # in this one-window demo geometry: ~1e-10, against ~1 for the whole gradient).
    total = torch.cat([g.flatten() for g in grads['plain'].values()]).norm()
    worst = max((((grads['fused'][n] - g).norm() / torch.maximum(g.norm(), 1e-6 * total)).item(), n)
                for n, g in grads['plain'].items())
    assert worst[0] <= 1e-4, worst
