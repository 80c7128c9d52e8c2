"""The GPU path without a GPU: every model on fake CUDA tensors (bench/fake_cuda.py) under float16 and bfloat16
autocast, in training (with and without gradient checkpointing) and evaluation.

A CPU tensor meeting a CUDA one, or a host synchronisation (``.item()``, ``.tolist()``, ``bool(t)``) in the forward,
raises here as it would on a GPU; the test also checks the autocast dtype of the logits and of every attention's
output, that the graph holds no custom ``autograd.Function`` (the GPU path is plain PyTorch), and the activation
memory against the official models' (measured with the same harness from their code)."""
import json
import os

import pytest
import timm
import torch

import models  # noqa: F401
from bench.fake_cuda import fake_cuda, fake_input, run, saved_bytes, to_fake_cuda
from models.mg_ssaf import AttentionFusion, MultiGranularityAttention
from models.msg_transformer import MessengerAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = [f'{family}_{size}' for family in ('msg_transformer', 'mg_ssaf') for size in ('tiny', 'small', 'base')]
ATTENTIONS = (MessengerAttention, MultiGranularityAttention, AttentionFusion)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16], ids=['fp16', 'bf16'])
@pytest.mark.parametrize('name', NAMES)
def test_forward_on_fake_cuda_stays_in_the_autocast_dtype_with_plain_ops(name, dtype):
    reports = {}
    with fake_cuda() as mode:
        model = to_fake_cuda(timm.create_model(name, num_classes=10), mode)
        x = fake_input(mode, 2, 3, 224, 224)
        for what, train, checkpointing in (('train', True, False), ('checkpointed', True, True),
                                           ('eval', False, False)):
            model.set_grad_checkpointing(checkpointing)
            reports[what] = run(model, x, dtype, train=train, watch=ATTENTIONS)
    for what, r in reports.items():
        assert r.output_dtype == dtype, what
        assert r.dtypes and set(r.dtypes.values()) == {dtype}, (what, r.dtypes)
        assert r.custom_functions == [], (what, r.custom_functions)
    assert reports['eval'].saved_bytes == 0
    # checkpointed blocks keep their inputs only
    assert 0 < reports['checkpointed'].saved_bytes < 0.3 * reports['train'].saved_bytes


@pytest.mark.parametrize('name', ['msg_transformer_tiny', 'mg_ssaf_tiny'])
def test_a_size_that_needs_padding_on_fake_cuda(name):
    """The padded path (masks, pads, crops) on a GPU: no host sync, no CPU tensor, the autocast dtype throughout."""
    with fake_cuda() as mode:
        model = to_fake_cuda(timm.create_model(name, num_classes=10), mode)
        x = fake_input(mode, 2, 3, 333, 500)
        for train in (True, False):
            r = run(model, x, torch.float16, train=train, watch=ATTENTIONS)
            assert r.output_dtype == torch.float16 and set(r.dtypes.values()) == {torch.float16}, r.dtypes
            assert r.custom_functions == []


def test_a_host_sync_or_a_cpu_tensor_in_the_forward_fails_here():
    """The harness catches what a GPU would suffer or reject: the failures it exists to show."""
    class Synced(torch.nn.Module):
        def __init__(self, how):
            super().__init__()
            self.how = how
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            if self.how == 'item':
                return y * y.sum().item()
            if self.how == 'bool':
                return y if bool((y > 0).any()) else -y
            return y + torch.ones(4)  # a CPU tensor made in the forward

    for how in ('item', 'bool', 'cpu'):
        with fake_cuda() as mode:
            model = to_fake_cuda(Synced(how), mode)
            with pytest.raises(Exception):
                run(model, fake_input(mode, 2, 4), torch.float16)


@pytest.mark.parametrize('name,official', [('msg_transformer_tiny', 'msg_tiny'), ('mg_ssaf_tiny', 'mgssaf_tiny')])
def test_activation_memory_is_at_most_nine_tenths_of_the_official(name, official):
    """Saved-for-backward bytes of a training forward at batch 32, float16, against the official model's, measured
    with this harness on the official code (tests/fixtures/official_saved_bytes.json, ``python bench/fake_cuda.py
    --cfg ... --official-msg ... --official-mgssaf ...``)."""
    with open(os.path.join(ROOT, 'tests', 'fixtures', 'official_saved_bytes.json')) as f:
        ref = json.load(f)
    assert ref['batch_size'] == 32 and ref['dtype'] == 'float16'
    ours = saved_bytes(lambda: timm.create_model(name, drop_path_rate=0.), 32, 224, torch.float16)
    assert ours <= 0.90 * ref['saved_bytes'][official], ours / ref['saved_bytes'][official]


def test_the_model_files_hold_no_cpu_kernel_code():
    """The models are the plain path: no oneDNN, kernel choice or dispatch-mode test in them (models/cpu has those)."""
    for path in ('models/msg_transformer.py', 'models/mg_ssaf.py', 'models/layers.py'):
        with open(os.path.join(ROOT, path)) as f:
            text = f.read().lower()
        for word in ('mkldnn', 'onednn', 'use_fused', 'kernels', 'dispatch_mode', 'is_autocast_enabled',
                     'autograd.function'):
            assert word not in text, (path, word)


@pytest.mark.parametrize('device', ['cpu', 'fake cuda'])
def test_a_channels_last_model_keeps_the_attention_maps_in_their_layout(device):
    """``model.to(memory_format=torch.channels_last)`` (timm's ``--channels-last``) turns Attention Fusion's conv
    weight channels-last; its conv3d must still take and give the maps as they are, not copy them to
    channels-last-3d and back around every conv."""
    def check(model, attn):
        for fusion in (m for m in model.modules() if isinstance(m, AttentionFusion)):
            out = fusion.spatial_conv(attn[:, :fusion.mix.in_features].contiguous())
            assert out.is_contiguous(), out.stride()

    model = timm.create_model('mg_ssaf_tiny', num_classes=10).to(memory_format=torch.channels_last)
    if device == 'cpu':
        check(model, torch.randn(2, 24, 3, 3, 10))
        return
    with fake_cuda() as mode:
        check(to_fake_cuda(model, mode), fake_input(mode, 2, 24, 3, 3, 10))
