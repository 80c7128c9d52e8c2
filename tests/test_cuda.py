"""GPU paths: NCCL training runs, fused attention kernels, AMP, channels-last, compile, checkpointing memory.

Each test body runs on the CPU too (``device`` 'cpu'), so that its arithmetic is checked where CI runs; the 'cuda'
cases need a CUDA GPU and are skipped without one (``pytest -m cuda`` selects them; ``tools/gpu_check.sh`` runs them
on a GPU). On the GPU they check what a CPU cannot: NCCL takes CUDA tensors only, SDPA must find a fused kernel for
the float bias, float16 needs the GradScaler, and gradient checkpointing must lower the peak on the device.
"""
import json
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env

HAS_CUDA = torch.cuda.is_available()
GPUS = torch.cuda.device_count() if HAS_CUDA else 0
CUDA = pytest.param('cuda', marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason='needs a CUDA GPU')])
DEVICES = ['cpu', CUDA]
MG_DEMO_CFG = os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')
FAST = ['DATA.NUM_WORKERS', '2', 'PRINT_FREQ', '5', 'TRAIN.WARMUP_EPOCHS', '0']


def torchrun(args, nproc, device):
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(free_port()),
           os.path.join(ROOT, 'main.py'), '--device', device] + args
    env = subprocess_env()
    if device == 'cuda':
        env['CUDA_VISIBLE_DEVICES'] = ','.join(str(i) for i in range(nproc))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize('cfg', [DEMO_CFG, MG_DEMO_CFG], ids=['msg', 'mg_ssaf'])
@pytest.mark.parametrize('amp_dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('device,nproc', [('cpu', 2)] + [
    pytest.param('cuda', n, marks=[pytest.mark.cuda, pytest.mark.skipif(GPUS < n, reason=f'needs {n} CUDA GPUs')])
    for n in (1, 2)])
def test_training_then_eval_gives_the_logged_top1(tmp_path, digits_dir, device, nproc, amp_dtype, cfg):
    """Two epochs under torchrun with AMP (NCCL on GPUs: past the end-of-epoch collectives that a CPU tensor would
    break), a checkpoint, then --eval of it reproduces the logged top-1, within one image: with float16 and
    cudnn.benchmark another process may pick other kernels, and a near-tie may flip. (The CPU case runs in
    ``tools/gpu_check.sh --dry-run``, which the suite runs: tests/test_gpu_check.py.)"""
    if device == 'cpu' and (amp_dtype == 'float16' or cfg == MG_DEMO_CFG):
        pytest.skip('on the CPU: bfloat16 and the MSG demo are enough (float16 runs in float32 there; e2e tests '
                    'cover MG-SSAF)')
    if device == 'cpu' and not os.environ.get('GPU_CHECK_DRY_RUN'):
        pytest.skip('the CPU case runs in tools/gpu_check.sh --dry-run (tests/test_gpu_check.py)')
    common = ['--cfg', cfg, '--data-path', digits_dir, '--output', str(tmp_path), '--amp-dtype', amp_dtype]
    out = torchrun(common + ['--opts', 'TRAIN.EPOCHS', '2', *FAST], nproc, device)
    assert f'rank 0/{nproc} on {device}' in out and 'ckpt_epoch_1.pth saved' in out
    run_dir = next(os.path.join(r, '') for r, _, files in os.walk(tmp_path) if 'metrics.jsonl' in files)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [r['epoch'] for r in rows] == [0, 1] and all(r['nonfinite_steps'] == 0 for r in rows)
    ev = torchrun(common + ['--eval', '--resume', os.path.join(run_dir, 'ckpt_epoch_1.pth'), '--tag', 'ev'], nproc,
                  device)
    num_images = int(re.findall(r'on the (\d+) test images', ev)[-1])
    assert float(re.findall(r'\* Acc@1 ([\d.]+)', ev)[-1]) == pytest.approx(rows[-1]['val_acc1'],
                                                                           abs=100 / num_images + 1e-9)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize('device', DEVICES)
def test_msg_attention_sdpa_with_its_bias_matches_the_matmuls(device, dtype):
    """The attention through SDPA with the float bias: on a GPU only the fused kernels are allowed (SDPA raises if
    it would fall back to the math kernel), and the bias gets its gradient from them too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.msg_transformer import MessengerAttention
    if device == 'cpu' and dtype == torch.float16:
        pytest.skip('float16 matmuls on the CPU: bfloat16 and float32 check the same arithmetic')
    torch.manual_seed(0)
    attn = MessengerAttention(dim=128, num_heads=4, window_size=7).to(device, dtype)
    x = torch.randn(8, 16, 50, 128, device=device, dtype=dtype)  # B, nW, N, C
    qkv = attn.qkv(x).detach().requires_grad_()  # B, nW, N, 3C: what attend takes
    attn.fused_attn = False
    ref = attn.attend(qkv)
    ref.float().square().sum().backward()
    ref_grads = qkv.grad.clone(), attn.relative_position_bias_table.grad.clone()
    qkv.grad = attn.relative_position_bias_table.grad = None
    attn.fused_attn = True
    backends = ([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION] if device == 'cuda'
                else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    with sdpa_kernel(backends):
        out = attn.attend(qkv)
        out.float().square().sum().backward()
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    for got, want in zip((qkv.grad, attn.relative_position_bias_table.grad), ref_grads):
        assert got is not None and torch.isfinite(got).all()
        assert (got.float() - want.float()).norm() <= 10 * tol * want.float().norm()


@pytest.mark.parametrize('name', ['msg_transformer_tiny', 'mg_ssaf_tiny'])
@pytest.mark.parametrize('device', DEVICES)
def test_channels_last_compile_and_amp_match_eager(device, name):
    """Channels-last input, autocast and (on a GPU) ``torch.compile`` compute what eager float32 does; a training
    step under autocast gives finite gradients to every parameter. (On the CPU: bfloat16 autocast, no compile, which
    takes minutes there.)"""
    import timm

    import models  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).to(device).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    amp_dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast(device, dtype=amp_dtype):
            amp = model(x).float()
        if device == 'cuda':
            compiled = torch.compile(model)
            with torch.autocast(device, dtype=torch.bfloat16):
                comp = compiled(x).float()
            torch.testing.assert_close(comp, ref, rtol=1e-1, atol=1e-1)
    torch.testing.assert_close(amp, ref, rtol=5e-2, atol=5e-2)
    model.train()
    step = torch.compile(model) if device == 'cuda' else model
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = F.cross_entropy(step(x).float(), torch.arange(4, device=device))
    loss.backward()
    bad = [n for n, p in model.named_parameters()
           if p.requires_grad and (p.grad is None or not p.grad.isfinite().all())]
    assert not bad, f'no or non-finite gradients: {bad}'


def _peak_bytes(device: str, step) -> int:
    """The peak CUDA memory of ``step()``, or on the CPU the bytes its graph saved for backward (the part gradient
    checkpointing lowers)."""
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return saved[0]


@pytest.mark.parametrize('name', ['msg_transformer_tiny', 'mg_ssaf_tiny'])
@pytest.mark.parametrize('device', DEVICES)
def test_gradient_checkpointing_lowers_peak_memory(device, name):
    import timm

    import models  # noqa: F401
    batch = 16 if device == 'cuda' else 2
    amp_dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    peaks, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).to(device)
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(batch, 3, 224, 224, device=device)

        def step():
            with torch.autocast(device, dtype=amp_dtype):
                loss = F.cross_entropy(model(x).float(), torch.arange(batch, device=device) % 10)
            loss.backward()
        peaks.append(_peak_bytes(device, step))
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
        del model, x
        if device == 'cuda':
            torch.cuda.empty_cache()
    assert peaks[1] < 0.7 * peaks[0], f'peak {peaks[1] / 2**20:.0f} MB with vs {peaks[0] / 2**20:.0f} MB without'
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize('device', DEVICES)
def test_collectives_take_tensors_on_the_backend_device(device):
    """all_reduce_sum / any_rank from CPU tensors and Python flags under a real process group of world size 1: NCCL
    on a GPU, gloo on the CPU."""
    script = (
        'import os, torch, torch.distributed as dist\n'
        'import distributed as D\n'
        f"device = torch.device('{device}', 0) if '{device}' == 'cuda' else torch.device('cpu')\n"
        'print(D.init_distributed(device))\n'
        "assert D.comm_device() == device\n"
        'cpu = D.all_reduce_sum(torch.tensor([1.0, 2.0]))\n'
        "assert cpu.device.type == 'cpu' and cpu.tolist() == [1.0, 2.0]\n"
        "dev = D.all_reduce_sum(torch.ones(3, device=device))\n"
        "assert dev.device == device and D.any_rank(True) and not D.any_rank(False)\n"
        'dist.destroy_process_group()\n'
        "print('ok')\n")
    env = subprocess_env()
    env.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    proc = subprocess.run([PYTHON, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]
