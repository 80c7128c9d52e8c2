"""Issue 7: bad input ends in one line, crashes and preemption lose nothing, divergence is handled."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
import torch.nn as nn

from config import get_default_config, merge_opts
from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env
from engine import Precision, TrainingDiverged, TrainState, train_one_epoch

FAST = ['DATA.NUM_WORKERS', '0', 'TRAIN.WARMUP_EPOCHS', '0']


def main_py(args, timeout=120):
    return subprocess.run([PYTHON, os.path.join(ROOT, 'main.py')] + args, cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


class _Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def main_in_process(args, capsys):
    """``main.main(args)`` in this process (no 5 s interpreter and torch start-up), for errors that end a run
    before it trains; the same exit code and output a subprocess gets (``main_py`` keeps the real command line
    honest in each test that uses this)."""
    import main
    capsys.readouterr()
    try:
        rc = main.main(args)
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return _Ran(rc, out.out, out.err)


def assert_one_line_error(proc, pattern):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith('error:')]
    assert len(lines) == 1, proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory, digits_dir):
    out = str(tmp_path_factory.mktemp('ck'))
    proc = main_py(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', out, '--opts', 'TRAIN.EPOCHS', '1',
                    *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return os.path.join(out, 'msg_demo', 'default', 'ckpt_epoch_0.pth')


def test_user_errors_are_one_line(tmp_path, digits_dir, small_ckpt, capsys):
    base = ['--cfg', DEMO_CFG, '--output', str(tmp_path)]
    cases = [
        (base + ['--data-path', str(tmp_path / 'nowhere')], r"--data-path '.*nowhere' does not exist"),
        (['--cfg', str(tmp_path / 'missing.yaml'), '--data-path', digits_dir], 'config file not found'),
        (base + ['--data-path', digits_dir, '--opts', 'TRAIN.EPOHS', '1'], "did you mean 'TRAIN.EPOCHS'"),
        (base + ['--data-path', digits_dir, '--opts', 'MODEL.NUM_CLASSES', '7'], 'has 10 classes'),
        (base + ['--data-path', digits_dir, '--opts', 'MODEL.MSG.NUM_HEADS', '[3, 2, 4, 8]'],
         r'cannot be built.*num_heads 3 does not divide'),
        (base + ['--data-path', digits_dir, '--eval', '--resume', str(tmp_path / 'no.pth')], 'checkpoint file not found'),
        (base + ['--data-path', digits_dir, '--eval', '--resume', DEMO_CFG], 'not a readable PyTorch checkpoint'),
    ]
    assert_one_line_error(main_py(cases[0][0]), cases[0][1])      # the command line, then the rest in-process
    for args, pattern in cases[1:]:
        assert_one_line_error(main_in_process(args, capsys), pattern)


def test_checkpoint_of_other_class_count_lists_keys(tmp_path, digits_dir, small_ckpt, capsys):
    sd = torch.load(small_ckpt, weights_only=True)
    sd['model']['head.weight'] = sd['model']['head.weight'][:5]
    sd['model']['head.bias'] = sd['model']['head.bias'][:5]
    bad = str(tmp_path / 'five.pth')
    torch.save(sd, bad)
    proc = main_in_process(['--cfg', DEMO_CFG, '--output', str(tmp_path), '--data-path', digits_dir, '--eval',
                            '--resume', bad], capsys)
    assert_one_line_error(proc, r'does not fit.*shape mismatch: head.weight \(5, 256\) vs model \(10, 256\)')


def test_corrupt_val_image_in_a_worker_is_one_line_and_eval_needs_no_train_folder(tmp_path, digits_dir, small_ckpt):
    root = tmp_path / 'valonly'
    shutil.copytree(os.path.join(digits_dir, 'val'), root / 'val')
    (root / 'val' / '4' / 'broken.png').write_bytes(b'\x89PNG garbage')
    proc = main_py(['--cfg', DEMO_CFG, '--output', str(tmp_path), '--data-path', str(root), '--eval',
                    '--resume', small_ckpt, '--opts', 'DATA.NUM_WORKERS', '1'])
    assert_one_line_error(proc, r"unreadable image '.*broken.png'")


def test_accumulation_equals_one_large_batch():
    """2 batches of 2 with accumulation 2 give the same update as 1 batch of 4."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    params = []
    for accum, loader in ((1, [(x, y, torch.zeros(4))]), (2, [(x[:2], y[:2], torch.zeros(2)), (x[2:], y[2:], torch.zeros(2))])):
        cfg = get_default_config()
        merge_opts(cfg, ['TRAIN.ACCUMULATION_STEPS', str(accum), 'PRINT_FREQ', '1000', 'TRAIN.CLIP_GRAD', '0.0'])
        torch.manual_seed(1)
        model = _Toy()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        updates = []

        class Sched:
            def step_update(self, t):
                updates.append(t)
        train_one_epoch(config=cfg, model=model, criterion=nn.functional.cross_entropy, loader=loader,
                        optimizer=opt, scheduler=Sched(), scaler=torch.amp.GradScaler('cpu', enabled=False),
                        precision=Precision('cpu', False, torch.bfloat16), device=torch.device('cpu'),
                        state=TrainState())
        assert updates == [accum - 1]          # the schedule steps to the batch index of the update (MSG's clock)
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*params))


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


class _NaNOn:
    """Cross-entropy, except that the calls listed return NaN."""
    def __init__(self, bad_calls):
        self.bad, self.calls = set(bad_calls), 0

    def __call__(self, out, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(out, target)
        return loss * float('nan') if self.calls in self.bad else loss


def _epoch(criterion, max_in_row=10, n=6):
    cfg = get_default_config()
    merge_opts(cfg, ['TRAIN.MAX_NONFINITE_STEPS', str(max_in_row), 'PRINT_FREQ', '1000'])
    model = _Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(2, 4), torch.tensor([0, 1]), torch.tensor([0, 0])) for _ in range(n)]

    class Sched:
        def step_update(self, t):
            pass
    changes = []  # the updates that changed the weights
    orig_step = opt.step

    def step(*a, **k):
        before = [p.detach().clone() for p in model.parameters()]
        out = orig_step(*a, **k)
        changes.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        return out
    opt.step = step
    state = TrainState()
    stats = train_one_epoch(config=cfg, model=model, criterion=criterion, loader=loader, optimizer=opt,
                            scheduler=Sched(), scaler=torch.amp.GradScaler('cpu', enabled=False),
                            precision=Precision('cpu', False, torch.bfloat16), device=torch.device('cpu'), state=state)
    return stats, sum(changes), state, model


def test_nonfinite_loss_skips_the_update():
    stats, steps, state, model = _epoch(_NaNOn({2, 5}))
    assert stats['nonfinite_steps'] == 2 and steps == 4 and state.num_updates == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert stats['loss'] == stats['loss']  # mean over the finite losses only, not NaN


def test_nonfinite_gradient_with_finite_loss_is_skipped():
    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float('inf')
    calls = {'n': 0}

    def criterion(out, target):
        calls['n'] += 1
        loss = nn.functional.cross_entropy(out, target)
        return InfGrad.apply(loss) if calls['n'] == 3 else loss
    stats, steps, state, model = _epoch(criterion)
    assert stats['nonfinite_steps'] == 1 and steps == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nonfinite_in_a_row_stops():
    with pytest.raises(TrainingDiverged, match='3 non-finite losses or gradients in a row'):
        _epoch(_NaNOn({2, 3, 4}), max_in_row=3)


def _torchrun(args, nproc=2):
    """Runs compared with each other for bit-identical weights fix the CPU kernels: measured choices could differ
    between two runs (each run carries its own choices through its checkpoints)."""
    cmd = [PYTHON, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--master_port', str(free_port()),
           os.path.join(ROOT, 'main.py')] + args
    env = dict(subprocess_env(), MSGSSAF_CPU_KERNELS='fused')
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError('process ended early:\n' + proc.stdout.read()[-3000:])
        if time.time() - t0 > timeout:
            raise AssertionError('timed out')
        time.sleep(0.05)


def _train_args(out, digits_dir, epochs):
    """A 2-process CPU run slow enough to interrupt: batch 4 (25 steps per epoch), a log line per step."""
    return ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(out), '--batch-size', '4',
            '--opts', 'TRAIN.EPOCHS', str(epochs), 'PRINT_FREQ', '1', *FAST]


def _workers(proc):
    """PIDs of torchrun's worker processes (each runs in its own session)."""
    return [int(p) for p in subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()]


def _read_log(run_dir):
    path = os.path.join(run_dir, 'log_rank0.txt')
    return open(path).read() if os.path.exists(path) else ''


AUGMENTED = ['AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.COLOR_JITTER', '0.4', 'AUG.REPROB', '0.25',
             'AUG.MIXUP', '0.8', 'AUG.CUTMIX', '1.0', 'MODEL.DROP_PATH_RATE', '0.2', 'DATA.NUM_WORKERS', '1']


def test_sigterm_checkpoints_mid_epoch_and_resumes_exactly(tmp_path, digits_dir):
    """SIGTERM mid-epoch, rerun: the same weights as an uninterrupted run, with the papers' augmentation, mixup /
    cutmix and drop path on and a data worker (every draw is seeded from the epoch and the step or sample)."""
    def args(out):
        return _train_args(out, digits_dir, epochs=1) + AUGMENTED
    ref = _torchrun(args(tmp_path / 'ref'))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-3000:]
    run_dir = os.path.join(tmp_path, 'cut', 'msg_demo', 'default')
    proc = _torchrun(args(tmp_path / 'cut'))
    _wait_for(lambda: 'Train: [0/1][5/' in _read_log(run_dir), proc)
    for pid in _workers(proc):
        os.kill(pid, signal.SIGTERM)                         # what a scheduler sends to every task
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    ckpt = torch.load(os.path.join(run_dir, 'last.pth'), weights_only=True)
    assert ckpt['epoch'] == -1 and 0 < ckpt['step_in_epoch'] < 25    # no epoch completed yet
    stopped_at = ckpt['step_in_epoch']
    proc2 = _torchrun(args(tmp_path / 'cut'))
    out2 = proc2.communicate(timeout=300)[0]
    assert proc2.returncode == 0, out2[-3000:]
    assert f'continuing at epoch 0 step {stopped_at}' in out2
    assert f'Train: [0/1][{stopped_at + 1}/25]' in out2 and 'Train: [0/1][1/25]' not in out2
    rows = [json.loads(ln) for ln in open(os.path.join(run_dir, 'metrics.jsonl'))]
    assert [r['epoch'] for r in rows] == [0]
    a = torch.load(os.path.join(tmp_path, 'ref', 'msg_demo', 'default', 'ckpt_epoch_0.pth'), weights_only=True)
    b = torch.load(os.path.join(run_dir, 'ckpt_epoch_0.pth'), weights_only=True)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_kill9_then_rerun_finishes_with_identical_weights(tmp_path, digits_dir):
    def args(out):
        return _train_args(out, digits_dir, epochs=2)
    ref = _torchrun(args(tmp_path / 'ref'))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()[-3000:]

    run_dir = os.path.join(tmp_path, 'cut', 'msg_demo', 'default')
    proc = _torchrun(args(tmp_path / 'cut'))
    _wait_for(lambda: 'Train: [1/2][3/' in _read_log(run_dir), proc)
    # The whole job, launcher and workers (torchrun gives each worker its own session), as a scheduler kills it.
    for pid in _workers(proc):
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert sorted(p for p in os.listdir(run_dir) if p.endswith('.pth')) == ['best.pth', 'ckpt_epoch_0.pth']
    again = _torchrun(args(tmp_path / 'cut'))
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out[-3000:]
    assert 'continuing at epoch 1' in out
    a = torch.load(os.path.join(tmp_path, 'ref', 'msg_demo', 'default', 'ckpt_epoch_1.pth'), weights_only=True)
    b = torch.load(os.path.join(run_dir, 'ckpt_epoch_1.pth'), weights_only=True)
    assert a['model'].keys() == b['model'].keys()
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_a_dying_rank_does_not_hang_the_other(tmp_path, digits_dir):
    run_dir = os.path.join(tmp_path, 'msg_demo', 'default')
    proc = _torchrun(_train_args(tmp_path, digits_dir, epochs=50))
    _wait_for(lambda: 'Train: [0/50][3/' in _read_log(run_dir), proc)
    os.kill(_workers(proc)[-1], signal.SIGKILL)
    t0 = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    time.sleep(1)
    assert not _workers(proc)                                  # no survivors


def _nan_on_one_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_Toy())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = get_default_config()
    merge_opts(cfg, ['PRINT_FREQ', '1000'])
    g = torch.Generator().manual_seed(rank)
    loader = [(torch.randn(2, 4, generator=g), torch.tensor([0, 1]), torch.tensor([0, 0])) for _ in range(5)]

    class Sched:
        def step_update(self, t):
            pass
    criterion = _NaNOn({3}) if rank == 1 else nn.functional.cross_entropy   # only rank 1 diverges, at update 3
    stats = train_one_epoch(config=cfg, model=model, criterion=criterion, loader=loader, optimizer=opt,
                            scheduler=Sched(), scaler=torch.amp.GradScaler('cpu', enabled=False),
                            precision=Precision('cpu', False, torch.bfloat16), device=torch.device('cpu'),
                            state=TrainState())
    torch.save({'stats': stats, 'params': [p.detach() for p in model.parameters()]}, os.path.join(out, f'{rank}.pt'))
    dist.destroy_process_group()


def test_nonfinite_on_one_rank_skips_the_update_on_all(tmp_path):
    import torch.multiprocessing as tmp_mp
    tmp_mp.spawn(_nan_on_one_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'{r}.pt', weights_only=True) for r in (0, 1))
    assert r0['stats']['nonfinite_steps'] == r1['stats']['nonfinite_steps'] == 1    # both skipped update 3
    assert all(torch.equal(a, b) for a, b in zip(r0['params'], r1['params']))      # and stayed identical
    assert all(torch.isfinite(p).all() for p in r0['params'])


TINY = ['MODEL.MSG.EMBED_DIM', '4', 'MODEL.MSG.DEPTHS', '[1, 1, 1, 1]', 'MODEL.MSG.NUM_HEADS', '[1, 1, 2, 2]',
        'MODEL.MSG.WINDOW_SIZE', '2', 'MODEL.MSG.SHUF_SIZE', '[2, 2, 2, 1]']   # ~0.4 MB checkpoints


def test_output_that_is_a_file_or_unwritable_is_one_line(tmp_path, digits_dir, capsys):
    a_file = tmp_path / 'taken'
    a_file.write_text('not a folder')
    base = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--opts', 'TRAIN.EPOCHS', '1', *FAST]
    assert_one_line_error(main_in_process(base + ['--output', str(a_file)], capsys), r"'.*taken' is a file, not a folder")
    frozen = tmp_path / 'frozen'
    frozen.mkdir()
    if subprocess.run(['chattr', '+i', str(frozen)], capture_output=True).returncode != 0:
        pytest.skip('chattr +i is not available here')
    try:
        assert_one_line_error(main_in_process(base + ['--output', str(frozen)], capsys),
                              r"output folder '.*frozen.*' is not writable")
    finally:
        subprocess.run(['chattr', '-i', str(frozen)])


def test_failed_checkpoint_write_names_the_cause_and_keeps_the_previous(tmp_path, monkeypatch):
    """torch.save's own error for a full disk is 'enforce fail at inline_container.cc ... unexpected pos'."""
    import builtins
    import errno
    from checkpoint import CheckpointError, save_checkpoint
    path = str(tmp_path / 'ckpt_epoch_0.pth')
    save_checkpoint(path, {'w': torch.ones(10)})
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)
    monkeypatch.setattr(builtins, 'open', lambda p, *a, **k: Full(real_open(p, *a, **k)) if '.tmp.' in str(p)
                        else real_open(p, *a, **k))
    with pytest.raises(CheckpointError, match=r"could not write '.*ckpt_epoch_0.pth': No space left on device "
                                              r"\(the previous checkpoint is kept\)"):
        save_checkpoint(path, {'w': torch.ones(100000)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ['ckpt_epoch_0.pth'] and torch.load(path)['w'].shape == (10,)


def test_full_disk_during_training_is_one_line(tmp_path, digits_dir):
    """A real full file system (a 1 MB tmpfs): the epoch-0 files fit, the epoch-1 checkpoint does not."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)], capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        proc = main_py(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(disk),
                        '--opts', 'TRAIN.EPOCHS', '3', *TINY, *FAST], timeout=300)
        assert_one_line_error(proc, r"could not write '.*ckpt_epoch_\d.pth': No space left on device "
                                    r"\(the previous checkpoint is kept\)|could not write '.*best.pth'")
        run_dir = disk / 'msg_demo' / 'default'
        assert 'ckpt_epoch_0.pth' in os.listdir(run_dir) and not [p for p in os.listdir(run_dir) if '.tmp.' in p]
        torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)            # intact
    finally:
        subprocess.run(['umount', str(disk)])


@pytest.mark.parametrize('launcher', ['torchrun', 'launch'])
def test_an_error_every_rank_hits_is_printed_once_under_a_launcher(tmp_path, digits_dir, launcher):
    """Each rank exits 2; rank 0 alone prints the line (before the launcher's ChildFailedError report, which then
    exits 1)."""
    module = 'torch.distributed.run' if launcher == 'torchrun' else 'torch.distributed.launch'
    cmd = [PYTHON, '-m', module, '--nproc_per_node', '2', '--master_port', str(free_port()),
           os.path.join(ROOT, 'main.py'), '--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(tmp_path),
           '--opts', 'TRAIN.EPOHCS', '1']
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if 'error:' in ln and 'did you mean' in ln]
    assert lines == ["error: unknown config key 'TRAIN.EPOHCS' in --opts (did you mean 'TRAIN.EPOCHS'?)"], proc.stderr
    assert proc.returncode == 1 and 'exitcode  : 2' in proc.stderr


def test_sigterm_to_torchrun_with_loader_workers_checkpoints(tmp_path, digits_dir):
    """torchrun forwards SIGTERM to each worker's whole process group, DataLoader workers included (as cluster
    schedulers do): the workers leave it to the main process, which stops at the next update and checkpoints."""
    run_dir = os.path.join(tmp_path, 'msg_demo', 'default')
    proc = _torchrun(_train_args(tmp_path, digits_dir, epochs=2) + ['DATA.NUM_WORKERS', '1'])
    _wait_for(lambda: 'Train: [0/2][5/' in _read_log(run_dir), proc)
    os.kill(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert 'stop requested: checkpoint written at epoch 0' in out, out[-3000:]
    assert 'Traceback' not in out.split('stop requested')[0] and 'killed by signal' not in out
    ckpt = torch.load(os.path.join(run_dir, 'last.pth'), weights_only=True)
    assert 0 < ckpt['step_in_epoch'] < 25


def test_stop_after_an_epochs_last_update_evaluates_that_epoch_on_rerun(tmp_path, digits_dir):
    """A stop that lands after the last update of an epoch writes last.pth with the whole epoch done; the rerun
    evaluates and checkpoints that epoch (no epoch is left without its evaluation and ckpt_epoch file)."""
    out = tmp_path / 'run'
    base = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(out), '--opts', *FAST, *TINY]
    assert main_py(base + ['TRAIN.EPOCHS', '1']).returncode == 0
    run_dir = out / 'msg_demo' / 'default'
    ckpt = torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)
    batches = 200 // 16                                       # the digits' 200 training images, batch 16
    ckpt.update(epoch=0, step_in_epoch=batches)             # epoch 1 trained, not evaluated (as a late stop leaves it)
    torch.save(ckpt, run_dir / 'last.pth')
    proc = main_py(base + ['TRAIN.EPOCHS', '2'])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f'continuing at epoch 1 step {batches}' in proc.stdout and 'Train: [1/2]' not in proc.stdout
    assert (run_dir / 'ckpt_epoch_1.pth').exists() and not (run_dir / 'last.pth').exists()
    rows = [json.loads(ln) for ln in open(run_dir / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [0, 1]
