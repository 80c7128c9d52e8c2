"""End-to-end runs of main.py on a tiny real image folder, in subprocesses, as users launch it (CPU, gloo)."""
import json
import os
import re
import subprocess

import pytest

from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env

FAST = ['DATA.NUM_WORKERS', '0', 'PRINT_FREQ', '2', 'TRAIN.WARMUP_EPOCHS', '0']


def launch(args, nproc=1, launcher='torchrun', timeout=300, check=True, extra_env=None):
    if launcher == 'torchrun':
        cmd = [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(free_port())]
    elif launcher == 'launch':
        cmd = [PYTHON, '-m', 'torch.distributed.launch', '--nproc_per_node', str(nproc), '--master_port', str(free_port())]
    else:
        cmd = [PYTHON]
    env = subprocess_env()
    env.update(extra_env or {})
    proc = subprocess.run(cmd + [os.path.join(ROOT, 'main.py')] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def top1(text):
    return [float(x) for x in re.findall(r'\* Acc@1 ([\d.]+)', text)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_dir):
    """2 epochs with torchrun and 2 processes, then a rerun with TRAIN.EPOCHS 3 that must resume."""
    out = str(tmp_path_factory.mktemp('run'))
    common = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', out, '--tag', 't']
    first = launch(common + ['--opts', 'TRAIN.EPOCHS', '2', *FAST], nproc=2)
    run_dir = os.path.join(out, 'msg_demo', 't')
    after_two = sorted(os.listdir(run_dir))
    second = launch(common + ['--opts', 'TRAIN.EPOCHS', '3', *FAST], nproc=2)
    return {'dir': run_dir, 'common': common, 'first': first, 'second': second, 'after_two': after_two}


def test_torchrun_two_processes_writes_outputs(trained):
    files = trained['after_two']
    for name in ('ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'best.pth', 'config.yaml', 'metrics.jsonl',
                 'log_rank0.txt', 'log_rank1.txt'):
        assert name in files
    log = trained['first'].stdout
    assert 'rank 0/2 on cpu' in log and 'effective batch 32 (16 x 2 processes x 1 accumulation)' in log
    assert re.search(r'Train: \[1/2\]\[\d+/\d+\]\teta', log)


def test_rerun_with_more_epochs_resumes_and_trains_only_the_new_one(trained):
    log = trained['second'].stdout
    assert 'continuing at epoch 2' in log
    assert 'Train: [0/' not in log and 'Train: [1/' not in log and 'Train: [2/3]' in log
    with open(os.path.join(trained['dir'], 'metrics.jsonl')) as f:
        rows = [json.loads(line) for line in f]
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert {'lr', 'train_loss', 'val_acc1', 'val_acc5', 'val_loss', 'ema_acc1', 'time'} <= set(rows[0])
    # memory stays flat: no growth from the loader, metrics or logger between the later epochs
    assert rows[2]['rss_mb'] - rows[1]['rss_mb'] < 64


@pytest.mark.parametrize('nproc,batch', [(1, 7), (3, 16)])  # 50 images: 3 ranks hold 17/17/16
def test_eval_reproduces_logged_top1_for_any_process_count(trained, nproc, batch):
    with open(os.path.join(trained['dir'], 'metrics.jsonl')) as f:
        logged = json.loads(f.readlines()[-1])['val_acc1']
    ckpt = os.path.join(trained['dir'], 'ckpt_epoch_2.pth')
    proc = launch(trained['common'] + ['--eval', '--resume', ckpt, '--batch-size', str(batch), '--tag', 'ev'],
                  nproc=nproc)
    assert top1(proc.stdout)[-1] == pytest.approx(logged, abs=1e-9)


def test_official_launch_form_and_plain_python(trained):
    ckpt = os.path.join(trained['dir'], 'ckpt_epoch_2.pth')
    args = trained['common'] + ['--eval', '--resume', ckpt, '--tag', 'ev2']
    launched = launch(args, nproc=1, launcher='launch')
    plain = launch(args, launcher='python')
    assert top1(launched.stdout) == top1(plain.stdout) and len(top1(plain.stdout)) == 1


def test_two_nodes_on_loopback_train_together(tmp_path, digits_dir):
    port = str(free_port())
    out = str(tmp_path)
    cmd = lambda rank: [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--nnodes', '2',  # noqa: E731
                        '--node_rank', str(rank), '--master_addr', '127.0.0.1', '--master_port', port,
                        os.path.join(ROOT, 'main.py'), '--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', out,
                        '--opts', 'TRAIN.EPOCHS', '1', *FAST]
    procs = [subprocess.Popen(cmd(r), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert 'rank 0/2 on cpu' in outs[0] and 'effective batch 32 (16 x 2 processes' in outs[0]
    assert os.path.isfile(os.path.join(out, 'msg_demo', 'default', 'ckpt_epoch_0.pth'))


def test_ema_accumulation_bf16_then_throughput(tmp_path, digits_dir):
    common = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(tmp_path)]
    proc = launch(common + ['--accumulation-steps', '2', '--amp-dtype', 'bfloat16',
                            '--opts', 'TRAIN.EPOCHS', '1', 'TRAIN.EMA.ENABLE', 'True', *FAST], launcher='python')
    assert 'effective batch 32 (16 x 1 processes x 2 accumulation)' in proc.stdout
    assert 'Train: [0/1][12/12]' in proc.stdout                     # 12 batches, 6 optimiser updates
    assert '6 updates per epoch' in proc.stdout and 'Test EMA' in proc.stdout
    run_dir = os.path.join(str(tmp_path), 'msg_demo', 'default')
    row = json.loads(open(os.path.join(run_dir, 'metrics.jsonl')).readline())
    assert row['ema_acc1'] is not None and row['rss_mb'] > 0
    thr = launch(common + ['--throughput', '--resume', os.path.join(run_dir, 'ckpt_epoch_0.pth'), '--tag', 'thr',
                           '--amp-opt-level', 'O0'], launcher='python')
    assert re.search(r'batch_size 16 throughput [\d.]+ images/s .*float32', thr.stdout)
    assert 'apex is not used; native torch.amp is off' in thr.stdout


def test_official_mg_ssaf_checkpoint_evaluates_through_main(tmp_path, digits_dir):
    """An official-layout file ({'model': ...} with the unused attn.norm keys) loads via --eval --resume."""
    import torch
    from config import load_config_file
    from models import build_model
    from models.mg_ssaf import to_official_state_dict
    cfg_path = os.path.join(ROOT, 'configs', 'MG-SSAF', 'MG-SSAF-demo.yaml')
    model = build_model(load_config_file(cfg_path))
    official = to_official_state_dict(model.state_dict())
    blocks = [k[:-len('norm1.weight')] for k in official if '.blocks.' in k and k.endswith('.norm1.weight')]
    assert blocks
    for prefix in blocks:                            # what the released files carry and never use
        width = official[prefix + 'norm1.weight'].shape[0]
        official[prefix + 'attn.norm.weight'] = torch.ones(width)
        official[prefix + 'attn.norm.bias'] = torch.zeros(width)
    path = str(tmp_path / 'MG-SSAF-demo.pth')
    torch.save({'model': official}, path)
    proc = launch(['--cfg', cfg_path, '--data-path', digits_dir, '--output', str(tmp_path), '--eval', '--resume', path],
                  launcher='python')
    assert re.search(r'dropped \d+ parameters the official forward never uses', proc.stdout)
    assert len(top1(proc.stdout)) == 1


def test_official_msg_training_checkpoint_resumes_through_main(tmp_path, digits_dir):
    """--resume of a file written by the official save_checkpoint (tests/fixtures/official_msg_train.pth, epoch 1,
    best 42.5): training continues at epoch 2 with the official optimizer state and best accuracy."""
    ckpt = os.path.join(ROOT, 'tests', 'fixtures', 'official_msg_train.pth')
    arch = ['MODEL.MSG.EMBED_DIM', '4', 'MODEL.MSG.DEPTHS', '[1, 1, 1, 1]', 'MODEL.MSG.NUM_HEADS', '[1, 1, 2, 2]',
            'MODEL.MSG.WINDOW_SIZE', '2', 'MODEL.MSG.SHUF_SIZE', '[2, 2, 2, 1]']
    proc = launch(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(tmp_path), '--resume', ckpt,
                   '--opts', 'TRAIN.EPOCHS', '3', *arch, *FAST], launcher='python')
    assert "resume: official-format checkpoint" in proc.stdout and 'continuing at epoch 2 (best top-1 so far 42.500)' in proc.stdout
    restored = re.search(r'optimizer state restored for (\d+) of (\d+) parameters', proc.stdout)
    assert restored and restored.group(1) == restored.group(2)
    assert 'Train: [2/3]' in proc.stdout and 'Train: [1/3]' not in proc.stdout
    rows = [json.loads(line) for line in open(os.path.join(tmp_path, 'msg_demo', 'default', 'metrics.jsonl'))]
    assert [r['epoch'] for r in rows] == [2]
    best = os.path.join(tmp_path, 'msg_demo', 'default', 'best.pth')
    assert os.path.exists(best) == (rows[0]['val_acc1'] > 42.5)    # the official best counts
