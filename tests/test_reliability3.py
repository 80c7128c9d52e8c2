"""Issue 32 (reliability round 3) and issue 29 items 2 and 5, the classes that concern runs: two runs in one output
folder; epoch writes interrupted between files; launcher variables without a peer, bad or left over; class names
against a checkpoint; full disks outside checkpoints; a resume check that some ranks skip; the stop path. Each class
has several cases. The classes of bad input are in test_bad_inputs3.py.
"""
import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
import torch

from checkpoint import CheckpointError, find_resume_checkpoint, save_checkpoint
from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env
from test_reliability import FAST, TINY, assert_one_line_error, main_in_process

# Tests import what this round added inside their bodies: on the code before it, each then fails on its own
# behaviour (a hang, a traceback, a wrong message) rather than all at once on an import.

LOG = logging.getLogger('test')


def _one_error_line(stderr: str) -> str:
    """The single line of stderr that carries 'error:' (with or without a '[rank N] ' prefix)."""
    lines = [ln for ln in stderr.splitlines() if 'error:' in ln]
    assert len(lines) == 1, stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture
def restore_signals():
    """In-process training installs the stop handlers (main.StopRequest); put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def _run_in_thread(fn, timeout):
    """``fn()`` in a thread; returns (finished, result). A hang (e.g. open() of a FIFO) shows as not finished."""
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault('r', fn()), daemon=True)
    thread.start()
    thread.join(timeout)
    return not thread.is_alive(), box.get('r')


def _unblock(fifo: str) -> None:
    """Release a reader blocked in open() of ``fifo`` (the old behaviour), so a failing test does not hang."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def _copy_digits(digits_dir, dst, rename=None):
    shutil.copytree(digits_dir, dst, symlinks=True)
    for split in ('train', 'val'):
        for old, new in (rename or {}).items():
            os.rename(os.path.join(dst, split, old), os.path.join(dst, split, new))
    return str(dst)


def _train_args(data, out, *opts):
    return ['--cfg', DEMO_CFG, '--data-path', str(data), '--output', str(out), '--opts', 'TRAIN.EPOCHS', '1',
            *FAST, *TINY, *opts]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Two runs into one output folder
# ---------------------------------------------------------------------------------------------------------------------
_HOLD = ("import sys, time; sys.path.insert(0, sys.argv[2]); from output_folder import OutputLock; "
         "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)")


def _holder(folder):
    """Another process that owns ``folder`` (as a running training would)."""
    proc = subprocess.Popen([PYTHON, '-c', _HOLD, str(folder), ROOT], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'held'
    return proc


def _dead_pid():
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


def _write_lock(folder, **fields):
    from output_folder import OutputLock
    me = OutputLock(str(folder)).me
    me.update(fields)
    (folder / 'run.lock').write_text(json.dumps(me))


def test_second_run_into_a_busy_output_folder_is_refused_naming_the_first(tmp_path, digits_dir, capsys):
    run_dir = tmp_path / 'out' / 'msg_demo' / 'default'
    run_dir.mkdir(parents=True)
    holder = _holder(run_dir)
    try:
        proc = main_in_process(_train_args(digits_dir, tmp_path / 'out'), capsys)
        assert_one_line_error(proc, rf"output folder '.*default' is in use by another run: pid {holder.pid} on host "
                                    rf"{socket.gethostname()}, started \d{{4}}-\d\d-\d\d .*pass another --output or "
                                    rf"--tag")
        assert sorted(os.listdir(run_dir)) == ['run.lock']          # nothing written: no log, config or checkpoint
        evaluating = main_in_process(_train_args(digits_dir, tmp_path / 'out') + ['--eval', '--resume', 'x.pth'],
                                     capsys)
        assert_one_line_error(evaluating, 'is in use by another run')   # --eval writes a log there too
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_one_line_and_only_its_temporary_files_removed(tmp_path):
    from output_folder import OutputLock
    folder = tmp_path / 'run'
    folder.mkdir()
    dead = _dead_pid()
    other_live = os.getppid()
    _write_lock(folder, pid=dead, pid_start=1)
    (folder / f'ckpt_epoch_3.pth.tmp.{dead}').write_bytes(b'cut short by kill -9')
    (folder / f'ckpt_epoch_3.pth.tmp.{other_live}').write_bytes(b'being written by someone else')
    lock = OutputLock(str(folder))
    note = lock.acquire()
    try:
        assert note.startswith(f'output folder: took over the lock of an earlier run (pid {dead} on host')
        assert 'its process no longer exists; removed its 1 temporary files' in note
        assert sorted(os.listdir(folder)) == sorted(['run.lock', f'ckpt_epoch_3.pth.tmp.{other_live}'])
        assert json.loads((folder / 'run.lock').read_text())['pid'] == os.getpid()
        # Auto-resume leaves other processes' temporary files alone (it used to remove every *.pth.tmp.*).
        find_resume_checkpoint(str(folder), LOG)
        assert (folder / f'ckpt_epoch_3.pth.tmp.{other_live}').exists()
    finally:
        lock.release()
    assert not (folder / 'run.lock').exists()


@pytest.mark.parametrize('fields, stale, why', [
    ({'pid': 'self'}, False, None),                                        # alive on this host
    ({'pid': 'dead'}, True, 'its process no longer exists'),
    ({'pid': 'self', 'pid_start': 1}, True, 'its process id now belongs to another process'),   # pid reused
    ({'boot_id': 'an-earlier-boot'}, True, 'this host has restarted since'),
    ({'host': 'node-17'}, False, None),                                    # another host, fresh heartbeat
    ({'host': 'node-17', 'age': 600}, True, 'no heartbeat for'),           # another host, heartbeat stopped
    ({'garbage': True, 'age': 600}, True, 'an unreadable lock'),
    ({'garbage': True}, False, None),                                      # unreadable but fresh: refused
])
def test_lock_liveness(tmp_path, fields, stale, why):
    from output_folder import OutputError, OutputLock
    folder = tmp_path / 'run'
    folder.mkdir()
    fields = dict(fields)
    age, garbage = fields.pop('age', 0), fields.pop('garbage', False)
    if fields.get('pid') == 'self':
        fields['pid'] = os.getpid()
    elif fields.get('pid') == 'dead':
        fields['pid'] = _dead_pid()
    if garbage:
        (folder / 'run.lock').write_text('{"pid": 12')
    else:
        _write_lock(folder, **fields)
    if age:
        t = time.time() - age
        os.utime(folder / 'run.lock', (t, t))
    lock = OutputLock(str(folder))
    if stale:
        assert why in lock.acquire()
        lock.release()
    else:
        with pytest.raises(OutputError, match=r"is in use by another run: pid .* wait for it to end"):
            lock.acquire()


def test_lock_is_held_by_rank_0_only_and_released_at_exit(tmp_path, digits_dir, capsys, monkeypatch):
    import main
    assert main.own_output_folder(str(tmp_path), rank=1) is None and not (tmp_path / 'run.lock').exists()
    out = tmp_path / 'out'
    seen = []
    real = main.build_loader

    def build_loader_and_look(*a, **k):
        seen.append(json.loads((out / 'msg_demo' / 'default' / 'run.lock').read_text())['pid'])
        return real(*a, **k)
    monkeypatch.setattr(main, 'build_loader', build_loader_and_look)
    bad = main_in_process(_train_args(digits_dir, out) + ['--eval', '--resume', str(tmp_path / 'none.pth')], capsys)
    assert seen == [os.getpid()]                                  # held while the run works
    assert bad.returncode == 2 and not (out / 'msg_demo' / 'default' / 'run.lock').exists()   # given back at exit


def test_a_temporary_file_removed_by_someone_else_is_named_as_such(tmp_path, monkeypatch):
    """The first run's claim 'the previous checkpoint is kept' after another run deleted its temporary file."""
    import checkpoint
    real_save = torch.save

    def save_then_lose(obj, f):
        real_save(obj, f)
        os.remove(f.f.name)
    monkeypatch.setattr(checkpoint.torch, 'save', save_then_lose)
    with pytest.raises(CheckpointError, match=r"its temporary file '.*\.tmp\.\d+' was removed while it was written "
                                              r"\(by another run in this output folder\?\)"):
        save_checkpoint(str(tmp_path / 'ckpt_epoch_0.pth'), {'w': torch.ones(3)})


# ---------------------------------------------------------------------------------------------------------------------
# 2. Writes that belong together: kill -9 between ckpt_epoch_N, best.pth and the metrics row
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('lost', [('best', 'metrics'), ('metrics',), ('old_best',)])
def test_rerun_completes_the_writes_of_the_last_epoch(tmp_path, tiny_run, lost, digits_dir, capsys):
    run_dir = tmp_path / 'msg_demo' / 'default'
    shutil.copytree(tiny_run, run_dir)
    best_before = torch.load(run_dir / 'best.pth', weights_only=True)
    if 'best' in lost:
        os.remove(run_dir / 'best.pth')
    if 'old_best' in lost:                                   # best.pth of an earlier epoch (the kill came before it)
        old = dict(best_before, epoch=-1)
        torch.save(old, run_dir / 'best.pth')
    if 'metrics' in lost:
        (run_dir / 'metrics.jsonl').write_text('')
    proc = main_in_process(_train_args(digits_dir, tmp_path), capsys)   # the same command again
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'nothing to train' in proc.stdout
    rows = [json.loads(line) for line in open(run_dir / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [0]
    best = torch.load(run_dir / 'best.pth', weights_only=True)
    assert best['epoch'] == 0 and all(torch.equal(best['model'][k], best_before['model'][k]) for k in best['model'])


def test_complete_epoch_writes_writes_only_what_is_missing(tmp_path):
    from checkpoint import complete_epoch_writes
    from output_folder import append_metrics
    ckpt = {'epoch': 4, 'model': {'w': torch.ones(2)},
            'epoch_end': {'metrics': {'epoch': 4, 'val_acc1': 50.0}, 'best': False}}
    path = tmp_path / 'ckpt_epoch_4.pth'
    torch.save(ckpt, path)
    append_metrics(str(tmp_path), {'epoch': 3, 'val_acc1': 40.0})
    complete_epoch_writes(str(tmp_path), str(path), ckpt, LOG)
    assert not (tmp_path / 'best.pth').exists()                      # epoch 4 was not the best: nothing to copy
    assert [json.loads(x)['epoch'] for x in open(tmp_path / 'metrics.jsonl')] == [3, 4]
    before = (tmp_path / 'metrics.jsonl').read_text()
    complete_epoch_writes(str(tmp_path), str(path), ckpt, LOG)       # nothing missing any more: unchanged
    assert (tmp_path / 'metrics.jsonl').read_text() == before


def test_metrics_rows_are_strict_json_and_a_rerun_of_an_epoch_replaces_its_row(tmp_path):
    from output_folder import append_metrics, metrics_line

    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f'{c} in metrics.jsonl'))
    append_metrics(str(tmp_path), {'epoch': 0, 'train_loss': float('nan'), 'lr': float('inf'), 'x': [float('-inf')]})
    append_metrics(str(tmp_path), {'epoch': 1, 'train_loss': 1.0})
    append_metrics(str(tmp_path), {'epoch': 2, 'train_loss': 0.5})
    append_metrics(str(tmp_path), {'epoch': 1, 'train_loss': 0.9})   # a run that went back to epoch 1's checkpoint
    rows = [strict(line) for line in open(tmp_path / 'metrics.jsonl')]
    assert [(r['epoch'], r['train_loss']) for r in rows] == [(0, None), (1, 0.9)]
    assert rows[0]['lr'] is None and rows[0]['x'] == [None]
    assert metrics_line({'a': float('nan')}) == '{"a": null}'


# ---------------------------------------------------------------------------------------------------------------------
# 6. Launcher variables: no peer, bad values, left over
# ---------------------------------------------------------------------------------------------------------------------
def _launch_env(monkeypatch, **env):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_USE_AGENT_STORE'):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))


@pytest.mark.parametrize('rank', [0, 1])
def test_launcher_variables_without_a_peer_give_up_in_the_stated_time(tmp_path, digits_dir, capsys, monkeypatch, rank):
    port = free_port()
    _launch_env(monkeypatch, RANK=rank, WORLD_SIZE=2, MASTER_ADDR='127.0.0.1', MASTER_PORT=port,
                MSGSSAF_JOIN_TIMEOUT=3)
    t0 = time.time()
    done, proc = _run_in_thread(lambda: main_in_process(_train_args(digits_dir, tmp_path), capsys), 60)
    assert done and time.time() - t0 < 30, 'waited for a peer that never comes'
    assert proc.returncode == 2
    assert (f'[rank {rank}] waiting for the 2 processes of this run to meet at 127.0.0.1:{port} (rank {rank} of 2); '
            f'giving up after 3 s (MSGSSAF_JOIN_TIMEOUT)') in proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith(f'[rank {rank}] error: gave up after 3 s waiting for '
                           f'{"the other processes" if rank == 0 else "rank 0"} of this run at 127.0.0.1:{port}')
    assert not (tmp_path / 'msg_demo' / 'default' / 'log_rank0.txt').exists()       # before any work


def test_master_port_in_use_and_unknown_master_are_one_line(tmp_path, digits_dir, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(('0.0.0.0', 0))
        busy.listen()
        port = busy.getsockname()[1]
        _launch_env(monkeypatch, RANK=0, WORLD_SIZE=2, MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
        done, proc = _run_in_thread(lambda: main_in_process(_train_args(digits_dir, tmp_path), capsys), 60)
    assert done and proc.returncode == 2
    assert f'MASTER_PORT {port} is in use on this host' in _one_error_line(proc.stderr)
    _launch_env(monkeypatch, RANK=1, WORLD_SIZE=2, MASTER_ADDR='no-such-host.invalid', MASTER_PORT=29500)
    done, proc = _run_in_thread(lambda: main_in_process(_train_args(digits_dir, tmp_path), capsys), 60)
    assert done and proc.returncode == 2
    assert "MASTER_ADDR 'no-such-host.invalid' is not a known host name" in _one_error_line(proc.stderr)


@pytest.mark.parametrize('env, message', [
    ({'RANK': '0', 'WORLD_SIZE': '2'}, r'RANK 0 and WORLD_SIZE 2 are set but MASTER_ADDR is not'),
    ({'LOCAL_RANK': 'abc'}, r"the environment variable LOCAL_RANK is 'abc', not a whole number >= 0"),
    ({'RANK': '0', 'WORLD_SIZE': 'two'}, r"WORLD_SIZE is 'two', not a whole number >= 1"),
    ({'RANK': '-1', 'WORLD_SIZE': '2'}, r"RANK is '-1', not a whole number >= 0"),
    ({'RANK': '2', 'WORLD_SIZE': '2'}, r'RANK 2 is not below WORLD_SIZE 2'),
    ({'RANK': '1', 'WORLD_SIZE': '1'}, r'RANK 1 is not below WORLD_SIZE 1'),     # printed although RANK is 1
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'h', 'MASTER_PORT': '70000'}, r"MASTER_PORT is '70000'"),
    ({'RANK': '0', 'WORLD_SIZE': '2', 'MASTER_ADDR': 'h'}, r'MASTER_ADDR is set but MASTER_PORT is not'),
])
def test_bad_launcher_variables_are_one_line(tmp_path, digits_dir, capsys, monkeypatch, env, message):
    _launch_env(monkeypatch, **env)
    proc = main_in_process(_train_args(digits_dir, tmp_path), capsys)
    assert proc.returncode == 2
    assert re.search(message, _one_error_line(proc.stderr)), proc.stderr
    assert not (tmp_path / 'msg_demo').exists()                      # refused when read, before any work


@pytest.mark.parametrize('env', [{'RANK': '1'}, {'RANK': '3', 'LOCAL_RANK': '3'}, {'RANK': '2', 'WORLD_SIZE': '1'}])
def test_a_leftover_rank_does_not_hide_errors(tmp_path, digits_dir, capsys, monkeypatch, env):
    _launch_env(monkeypatch, **env)
    proc = main_in_process(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(tmp_path),
                            '--opts', 'TRAIN.EPOHCS', '1'], capsys)
    assert_one_line_error(proc, "unknown config key 'TRAIN.EPOHCS'")


def test_a_leftover_rank_is_noted_and_the_run_is_one_process():
    from distributed import launcher_env
    os.environ['RANK'] = '5'
    try:
        env = launcher_env()
    finally:
        del os.environ['RANK']
    assert (env.rank, env.world_size, env.group) == (0, 1, False) and 'RANK is set but not WORLD_SIZE' in env.note


# ---------------------------------------------------------------------------------------------------------------------
# 8. Class names against the checkpoint
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('saved, names, message', [
    (['a', 'b', 'c'], ['a', 'b', 'c'], None),
    (['a', 'b', 'c'], ['b', 'a', 'c'], r'the same classes in another order \(2 labels moved\)'),
    (['cat', 'dog'], ['cat', 'fox'], r"1 of 2 labels name other classes \(label 1 is 'fox' here, 'dog' there\)"),
    (['a', 'b'], ['a', 'b', 'c'], r"3 classes here, 2 in the checkpoint \(only in the checkpoint: \[\], only here: "
                                  r"\['c'\]\)"),
    (['caf\u00e9'], ['cafe\u0301'], r"another Unicode form .*'cafe\\u0301' here, 'caf\\xe9' there; NFC vs NFD"),
])
def test_describe_class_change(saved, names, message):
    from checkpoint import describe_class_change
    text = describe_class_change(saved, names)
    assert (text is None) if message is None else re.search(message, text), text


def test_eval_and_resume_on_other_classes_are_refused_unless_allowed(tmp_path, tiny_run, digits_dir, capsys):
    renamed = _copy_digits(digits_dir, tmp_path / 'renamed', rename={'9': 'nine'})   # labels 0-8 stay, 9 moves
    ckpt = str(tiny_run / 'ckpt_epoch_0.pth')
    evaluate = ['--cfg', DEMO_CFG, '--data-path', renamed, '--output', str(tmp_path / 'ev'), '--eval', '--resume',
                ckpt, '--opts', *FAST, *TINY]
    assert_one_line_error(main_in_process(evaluate, capsys),
                          r"^error: the data's classes differ from those '.*ckpt_epoch_0.pth' was trained on: 1 of 10 "
                          r"labels name other classes \(label 9 is 'nine' here, '9' there\); .*--allow-class-change")
    allowed = main_in_process(evaluate + ['--allow-class-change'], capsys)
    assert allowed.returncode == 0 and '--allow-class-change: the data' in allowed.stdout
    # auto-resume of a folder whose run was trained on the digits, with another --data-path
    out = tmp_path / 'out'
    shutil.copytree(tiny_run, out / 'msg_demo' / 'default')
    swapped = _copy_digits(digits_dir, tmp_path / 'swapped', rename={'1': 'x', '2': '1'})
    proc = main_in_process(_train_args(swapped, out, 'TRAIN.EPOCHS', '2'), capsys)
    assert_one_line_error(proc, r"^error: the data's classes differ from those '.*ckpt_epoch_0.pth' was trained on")
    assert [json.loads(x)['epoch'] for x in open(out / 'msg_demo' / 'default' / 'metrics.jsonl')] == [0]


def test_check_class_names_ignores_checkpoints_without_names():
    from checkpoint import check_class_names
    check_class_names({}, ['a'], 'official.pth', allow=False)
    check_class_names({'class_names': None}, ['a'], 'x.pth', allow=False)
    with pytest.raises(CheckpointError, match='--allow-class-change'):
        check_class_names({'class_names': ['b']}, ['a'], 'x.pth', allow=False)


# ---------------------------------------------------------------------------------------------------------------------
# 13. A full disk outside checkpoints: config.yaml, metrics.jsonl, the log
# ---------------------------------------------------------------------------------------------------------------------
def _enospc_for(monkeypatch, fragment):
    import builtins
    real_open = builtins.open

    def fake(path, *a, **k):
        if fragment in str(path) and a and a[0][0] in 'wa':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, 'open', fake)


def test_full_disk_for_config_and_metrics_is_one_line(tmp_path, tiny_run, digits_dir, capsys, monkeypatch):
    _enospc_for(monkeypatch, 'config.yaml')
    proc = main_in_process(_train_args(digits_dir, tmp_path / 'a'), capsys)
    assert_one_line_error(proc, r"could not write the config '.*config.yaml': No space left on device")
    assert not [p for p in os.listdir(tmp_path / 'a' / 'msg_demo' / 'default') if '.tmp.' in p]
    monkeypatch.undo()
    # metrics.jsonl: the rerun of a run killed before its last metrics row writes the row, on a disk now full
    run_dir = tmp_path / 'b' / 'msg_demo' / 'default'
    shutil.copytree(tiny_run, run_dir)
    (run_dir / 'metrics.jsonl').write_text('')
    _enospc_for(monkeypatch, 'metrics.jsonl')
    proc = main_in_process(_train_args(digits_dir, tmp_path / 'b'), capsys)
    assert_one_line_error(proc, r"could not write metrics '.*metrics.jsonl': No space left on device")
    assert not [p for p in os.listdir(run_dir) if '.tmp.' in p]


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 1 MB tmpfs filled to the last page (None where no tmpfs can be mounted)."""
    disk = tmp_path / 'disk'
    disk.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(disk)], capture_output=True).returncode:
        yield None
        return
    try:
        with open(disk / 'filler', 'wb', buffering=0) as f:
            try:
                while True:
                    f.write(b'\0' * 4096)
            except OSError:
                pass
        yield disk
    finally:
        subprocess.run(['umount', '-l', str(disk)])  # lazily: the run's log handlers may still hold files there


def test_full_log_file_is_one_error_not_logging_error_blocks(tmp_path, full_tmpfs, capsys):
    from logger import _LogFile
    from output_folder import OutputError

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass
    folder = full_tmpfs or tmp_path                              # a real full disk where one can be mounted
    handler = _LogFile(str(folder / 'log_rank0.txt'))
    if full_tmpfs is None:
        handler.stream = Full()
    log = logging.getLogger('full-disk-test')
    log.addHandler(handler)
    try:
        for _ in range(3):  # the 4 KB page cache may take the first lines; the flush of each meets the full disk
            with pytest.raises(OutputError, match=r"could not write the log file '.*log_rank0.txt': No space left "
                                                  r"on device; free space"):
                log.warning('a line ' * 1000)
    finally:
        log.removeHandler(handler)
        handler.close()
    assert 'Logging error' not in capsys.readouterr().err


def test_real_full_disk_for_a_run_is_one_line(digits_dir, capsys, full_tmpfs):
    """A real full file system: the run stops at the first file it cannot write, with one line."""
    if full_tmpfs is None:
        pytest.skip('cannot mount a tmpfs here')
    os.truncate(full_tmpfs / 'filler', os.path.getsize(full_tmpfs / 'filler') - 4096)    # one page free
    proc = main_in_process(_train_args(digits_dir, full_tmpfs), capsys)
    assert_one_line_error(proc, r"could not write .*: No space left on device; free space or choose another --output")
    assert 'Logging error' not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Issue 29, item 2: every rank takes part in the resume check
# ---------------------------------------------------------------------------------------------------------------------
def test_resume_check_when_only_one_rank_finds_a_checkpoint_is_one_line_not_a_hang(tmp_path, tiny_run, digits_dir):
    """Two gloo processes, each with its own (not shared) output folder; only rank 0's holds a checkpoint."""
    shutil.copytree(tiny_run, tmp_path / 'node0' / 'msg_demo' / 'default')
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = dict(subprocess_env(), RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                   MASTER_PORT=str(port))
        args = _train_args(digits_dir, tmp_path / f'node{rank}', 'TRAIN.EPOCHS', '2')
        procs.append(subprocess.Popen([PYTHON, os.path.join(ROOT, 'main.py')] + args, cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2], outs[0][1][-2000:] + outs[1][1][-2000:]
    line = _one_error_line(outs[0][1])
    assert line.startswith("error: the processes resumed from different places (epoch 1 step 0 here): is '")
    assert 'error:' not in outs[1][1]                      # an error every rank meets is printed once, by rank 0


# ---------------------------------------------------------------------------------------------------------------------
# Issue 29, item 5: a stop starts no evaluation or epoch saves, and writes only what resume needs
# ---------------------------------------------------------------------------------------------------------------------
def test_stop_aware_loader_stops_at_a_batch_every_rank_has():
    from main import StopAwareLoader

    class Loader(list):
        batch_size = 2
        dataset = list(range(50))
    flag = {'stop': False}
    seen = []
    loader = StopAwareLoader(Loader([f'b{i}' for i in range(9)]), lambda: flag['stop'], world_size=3, check_every=3)
    assert loader.common == 8                      # 50 // 3 = 16 items on the smallest rank: 8 batches of 2
    for i, batch in enumerate(loader):
        seen.append(batch)
        if i == 4:
            flag['stop'] = True
    assert seen == ['b0', 'b1', 'b2', 'b3', 'b4', 'b5'] and loader.stopped          # stopped at the check of batch 6
    assert len(loader) == 9


@pytest.mark.parametrize('when', ['evaluation', 'after_evaluation', 'during_the_save'])
def test_stop_during_or_after_evaluation_writes_only_what_resume_needs(
        tmp_path, digits_dir, capsys, monkeypatch, restore_signals, when):
    import main
    real_evaluate, real_save = main.evaluate, main.save_checkpoint

    def evaluate_and_stop(model, loader, *a, **k):
        if when == 'evaluation':
            os.kill(os.getpid(), signal.SIGTERM)   # arrives before the loader's first check
            return real_evaluate(model, loader, *a, **k)
        stats = real_evaluate(model, loader, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)       # arrives after evaluation, before the epoch's saves
        return stats

    def save_and_stop(path, state):
        real_save(path, state)
        os.kill(os.getpid(), signal.SIGTERM)       # arrives while the epoch's checkpoint is written
    if when == 'during_the_save':
        monkeypatch.setattr(main, 'save_checkpoint', save_and_stop)
    else:
        monkeypatch.setattr(main, 'evaluate', evaluate_and_stop)
    proc = main_in_process(_train_args(digits_dir, tmp_path, 'TRAIN.EPOCHS', '2') + ['--batch-size', '50'], capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]              # 4 steps an epoch, 1 evaluation batch
    run_dir = tmp_path / 'msg_demo' / 'default'
    pth = sorted(p for p in os.listdir(run_dir) if p.endswith('.pth'))
    assert 'Train: [1/2]' not in proc.stdout                       # the run ended at the stop
    if when == 'evaluation':
        assert pth == ['last.pth'] and 'Accuracy of the network' not in proc.stdout
        ckpt = torch.load(run_dir / 'last.pth', weights_only=True)
        assert ckpt['epoch'] == -1 and ckpt['step_in_epoch'] == 200 // 50      # trained, not evaluated
    else:
        assert pth == ['ckpt_epoch_0.pth'] and not (run_dir / 'metrics.jsonl').exists()    # no best.pth, no row
        pending = torch.load(run_dir / 'ckpt_epoch_0.pth', weights_only=True)['epoch_end']
        assert pending['metrics']['epoch'] == 0 and isinstance(pending['best'], bool)  # the rerun writes them
