"""Shared fixtures: a small real image folder (the digits) and a CPU-friendly environment for subprocesses."""
from __future__ import annotations

import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CFG = os.path.join(ROOT, 'configs', 'msg_demo.yaml')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONPATH'] = ROOT
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    env.pop('LOCAL_RANK', None)
    env.pop('MSGSSAF_CPU_KERNELS', None)
    return env


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker computes with its share of the
    cores: a test's torch threads would otherwise compete with the other workers' (subprocesses run with one)."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        import torch

        from tools.run_timm_suite import _cores
        torch.set_num_threads(max(1, _cores() // workers))


@pytest.fixture(autouse=True)
def fused_cpu_kernels(monkeypatch):
    """In-process tests that install the CPU accelerators (models/cpu) run their fast candidates, so that the fast
    paths are tested whatever this CPU would choose; tests of the choice itself set other policies. Subprocesses
    start without it (``subprocess_env``): they choose."""
    monkeypatch.setenv('MSGSSAF_CPU_KERNELS', 'fused')


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory) -> str:
    """20 train / 5 val images per digit class, 64x64 RGB PNGs."""
    from data.digits import export_digits
    out = str(tmp_path_factory.mktemp('digits'))
    export_digits(out, size=64, limit_per_class=25)
    return out


PYTHON = sys.executable


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, digits_dir):
    """A finished 1-epoch run of a tiny model on the digits: its output folder (ckpt_epoch_0, best, metrics)."""
    from test_reliability import FAST, TINY, main_py
    out = tmp_path_factory.mktemp('tiny')
    proc = main_py(['--cfg', DEMO_CFG, '--data-path', digits_dir, '--output', str(out),
                    '--opts', 'TRAIN.EPOCHS', '1', *FAST, *TINY], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / 'msg_demo' / 'default'
