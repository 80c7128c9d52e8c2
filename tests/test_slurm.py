"""Issue 31: main.py under srun without a launcher, and tools/submit.py (submitit) with its local executor."""
import os
import re
import signal
import subprocess
import time

import pytest

import distributed
from conftest import DEMO_CFG, PYTHON, ROOT, free_port, subprocess_env


def test_slurm_variables_give_rank_world_and_rendezvous():
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1', 'SLURM_JOB_NODELIST': 'gpu[07-08],cpu3'}
    assert distributed.slurm_environment(env)
    assert (env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'], env['MASTER_ADDR'], env['MASTER_PORT']) == (
        '5', '16', '1', 'gpu07', '29500')
    launched = {'SLURM_PROCID': '0', 'SLURM_NTASKS': '16', 'RANK': '3', 'WORLD_SIZE': '8'}   # srun torchrun ...
    assert not distributed.slurm_environment(launched) and launched['RANK'] == '3'
    assert not distributed.slurm_environment({'SLURM_NTASKS': '4'})                        # salloc shell, no srun
    kept = {'SLURM_PROCID': '0', 'SLURM_NTASKS': '2', 'SLURM_NODELIST': 'n1', 'MASTER_PORT': '1234'}
    assert distributed.slurm_environment(kept) and (kept['MASTER_ADDR'], kept['MASTER_PORT']) == ('n1', '1234')
    for nodes, first in (('node1,node2', 'node1'), ('a-b[001-004,9]', 'a-b001'), ('x[3]y', 'x3y'), ('one', 'one')):
        assert distributed.first_host(nodes) == first


def test_srun_tasks_without_a_launcher_form_one_run(tmp_path, digits_dir):
    """Two plain processes with srun's variables evaluate together: each finds its rank, the shares add up."""
    import torch
    from config import load_config_file
    from models import build_model
    ckpt = str(tmp_path / 'w.pth')
    torch.save({'model': build_model(load_config_file(DEMO_CFG)).state_dict()}, ckpt)
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = subprocess_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST='localhost', MASTER_PORT=port)
        procs.append(subprocess.Popen([PYTHON, os.path.join(ROOT, 'main.py'), '--cfg', DEMO_CFG, '--data-path',
                                       digits_dir, '--output', str(tmp_path), '--eval', '--resume', ckpt, '--opts',
                                       'DATA.NUM_WORKERS', '0'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert 'rank 0/2 on cpu' in outs[0] and 'on the 50 test images' in outs[0]


def _children(pid: int) -> list[int]:
    try:
        with open(f'/proc/{pid}/task/{pid}/children') as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def test_submitit_job_checkpoints_on_usr2_requeues_and_resumes(tmp_path, digits_dir, monkeypatch):
    """tools/submit.py --local: two tasks train; Slurm's timeout signal (USR2, sent to every task) stops both at the
    same update, rank 0 writes last.pth, the job is requeued and the requeued tasks resume there and finish."""
    pytest.importorskip('submitit')
    from tools import submit
    monkeypatch.setenv('PYTHONPATH', ROOT)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    out = tmp_path / 'out'
    main_args = ['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(out), '--opts', 'TRAIN.EPOCHS', '1',
                 'TRAIN.WARMUP_EPOCHS', '0', 'DATA.NUM_WORKERS', '0', 'PRINT_FREQ', '1']
    args, main_argv = submit.parse_args(['--local', '--ngpus', '2', '--timeout', '10', '--master-port',
                                         str(free_port()), '--', *main_args])
    job = submit.submit(args, main_argv)
    log = out / 'msg_demo' / 'default' / 'log_rank0.txt'
    deadline = time.time() + 240
    while not (log.exists() and 'Train: [0/1][1/6]' in log.read_text()):
        assert time.time() < deadline and not job.done(), 'the job did not start training'
        time.sleep(0.2)
    tasks = [c for c in _children(job._process.pid)]
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    assert job.results() == [0, 0]                              # the requeued run's results, one per task
    text = log.read_text()
    stopped = re.search(r'stop requested: checkpoint written at epoch 0 step (\d+)', text)
    assert stopped, text[-3000:]
    assert re.search(rf"resume: checkpoint '.*last.pth', continuing at epoch 0 step {stopped.group(1)}", text)
    assert (out / 'msg_demo' / 'default' / 'ckpt_epoch_0.pth').exists()
    assert submit.Trainer(main_argv).checkpoint().function.argv == main_argv


def test_submit_refuses_a_bad_command_line_before_submitting(tmp_path, capsys):
    from tools import submit
    assert submit.cli(['--local', '--job-dir', str(tmp_path), '--', '--cfg', str(tmp_path / 'no.yaml')]) == 2
    assert capsys.readouterr().err.startswith('error: config file not found')
    assert not list(tmp_path.iterdir())
