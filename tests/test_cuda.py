"""GPU paths: NCCL training runs, fused attention kernels, AMP, channels-last, compile, checkpointing memory.

Every test here needs a CUDA GPU and is skipped without one (``pytest -m cuda`` selects them). They are the
checks a CPU-only machine cannot make: NCCL takes CUDA tensors only, SDPA must find a fused kernel for the float
bias, float16 needs the GradScaler, and gradient checkpointing must lower the peak on the device.
"""
import json
import os
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F

from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
MG_DEMO_CFG = os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')
FAST = ['DATA.NUM_WORKERS', '2', 'PRINT_FREQ', '5', 'TRAIN.WARMUP_EPOCHS', '0']


def torchrun(args, nproc):
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(free_port()),
           os.path.join(ROOT, 'main.py')] + args
    env = subprocess_env()
    env['CUDA_VISIBLE_DEVICES'] = ','.join(str(i) for i in range(nproc))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize('nproc', [1, 2] if GPUS >= 2 else [1])
@pytest.mark.parametrize('amp_dtype', ['float16', 'bfloat16'])
@pytest.mark.parametrize('cfg', [DEMO_CFG, MG_DEMO_CFG], ids=['msg', 'mg_ssaf'])
def test_nccl_training_then_eval_gives_the_logged_top1(tmp_path, digits_dir, nproc, amp_dtype, cfg):
    """Two epochs under torchrun with NCCL and AMP (past the end-of-epoch collectives that a CPU tensor would break),
    a checkpoint, then --eval of it reproduces the logged top-1."""
    common = ['--cfg', cfg, '--data-path', digits_dir, '--output', str(tmp_path), '--amp-dtype', amp_dtype]
    out = torchrun(common + ['--opts', 'TRAIN.EPOCHS', '2', *FAST], nproc)
    assert f'rank 0/{nproc} on cuda:0' in out and 'ckpt_epoch_1.pth saved' in out
    run_dir = next(os.path.join(r, '') for r, _, files in os.walk(tmp_path) if 'metrics.jsonl' in files)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [r['epoch'] for r in rows] == [0, 1] and all(r['nonfinite_steps'] == 0 for r in rows)
    ev = torchrun(common + ['--eval', '--resume', os.path.join(run_dir, 'ckpt_epoch_1.pth'), '--tag', 'ev'], nproc)
    assert float(re.findall(r'\* Acc@1 ([\d.]+)', ev)[-1]) == pytest.approx(rows[-1]['val_acc1'], abs=1e-9)


def _msg_attention(dtype):
    from models.msg_transformer import MessengerAttention
    attn = MessengerAttention(dim=128, num_heads=4, window_size=7).cuda()
    x = torch.randn(8, 16, 50, 128, device='cuda', dtype=dtype, requires_grad=True)  # B, nW, N, C
    return attn.to(dtype), x


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_msg_attention_runs_a_fused_sdpa_kernel_with_its_bias(dtype):
    """Only the fused kernels are allowed: SDPA raises if it would fall back to the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn, x = _msg_attention(dtype)
    ref = attn.attend(x).float()
    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with sdpa_kernel(fused):
        out = attn.attend(x)
        out.float().square().sum().backward()      # the bias gets its gradient from a fused kernel too
    assert attn.relative_position_bias_table.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    attn.fused_attn = False
    plain = attn.attend(x).float()
    torch.testing.assert_close(ref, plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('name', ['msg_transformer_tiny', 'mg_ssaf_tiny'])
def test_channels_last_compile_and_amp_match_eager(name):
    import timm
    import models  # noqa: F401
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 224, 224, device='cuda').contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.float16):
            amp = model(x).float()
        compiled = torch.compile(model)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            comp = compiled(x).float()
    torch.testing.assert_close(amp, ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(comp, ref, rtol=1e-1, atol=1e-1)
    model.train()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss = F.cross_entropy(torch.compile(model)(x).float(), torch.arange(4, device='cuda'))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize('name', ['msg_transformer_tiny', 'mg_ssaf_tiny'])
def test_gradient_checkpointing_lowers_peak_memory(name):
    import timm
    import models  # noqa: F401
    peaks, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=10).cuda()
        model.set_grad_checkpointing(checkpointing)
        x = torch.randn(16, 3, 224, 224, device='cuda')
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast('cuda', dtype=torch.float16):
            loss = F.cross_entropy(model(x).float(), torch.arange(16, device='cuda') % 10)
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        grads.append(torch.cat([p.grad.flatten().float() for p in model.parameters()]))
        del model, x, loss
        torch.cuda.empty_cache()
    assert peaks[1] < 0.7 * peaks[0], f'peak {peaks[1] / 2**20:.0f} MB with vs {peaks[0] / 2**20:.0f} MB without'
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-3)


def test_collectives_take_tensors_on_the_nccl_device(tmp_path):
    """all_reduce_sum / any_rank from CPU tensors and Python flags under a real NCCL group (world size 1)."""
    script = (
        'import os, torch, torch.distributed as dist\n'
        'import distributed as D\n'
        "device = torch.device('cuda', 0)\n"
        'print(D.init_distributed(device))\n'
        "assert D.comm_device() == device\n"
        'cpu = D.all_reduce_sum(torch.tensor([1.0, 2.0]))\n'
        "assert cpu.device.type == 'cpu' and cpu.tolist() == [1.0, 2.0]\n"
        "gpu = D.all_reduce_sum(torch.ones(3, device=device))\n"
        "assert gpu.device == device and D.any_rank(True) and not D.any_rank(False)\n"
        'dist.destroy_process_group()\n'
        "print('ok')\n")
    env = subprocess_env()
    env.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
    proc = subprocess.run([PYTHON, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]
