"""The distributed helpers: every collective goes through ``distributed.py``, on the backend's device."""
import ast
import os

import pytest
import torch
import torch.distributed as dist

import distributed
from conftest import ROOT

COLLECTIVES = {'all_reduce', 'all_gather', 'all_gather_into_tensor', 'all_gather_object', 'broadcast',
               'broadcast_object_list', 'reduce', 'reduce_scatter', 'reduce_scatter_tensor', 'gather', 'scatter',
               'all_to_all', 'barrier', 'monitored_barrier', 'send', 'recv', 'isend', 'irecv'}


def _project_files():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', 'output', 'demo_data', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(folder, name)


def test_collectives_are_called_only_in_distributed_py():
    """A collective called anywhere else could be handed a tensor on the wrong device (NCCL takes only CUDA
    tensors): the helpers in distributed.py move it there themselves."""
    offenders = []
    for path in _project_files():
        if os.path.samefile(path, os.path.join(ROOT, 'distributed.py')):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                base = ast.unparse(node.func.value)
                if base in ('dist', 'torch.distributed'):
                    offenders.append(f'{os.path.relpath(path, ROOT)}:{node.lineno} {ast.unparse(node.func)}')
    assert not offenders, offenders


def test_comm_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(distributed, '_comm_device', torch.device('cuda', 3))
    monkeypatch.setattr(dist, 'get_backend', lambda *a: 'nccl')
    assert distributed.comm_device() == torch.device('cuda', 3)
    monkeypatch.setattr(dist, 'get_backend', lambda *a: 'gloo')
    assert distributed.comm_device() == torch.device('cpu')


def test_all_reduce_sum_hands_the_collective_a_copy_on_the_comm_device(monkeypatch):
    """Whatever the caller's tensor (or Python numbers), the collective gets a copy on ``comm_device()`` and the
    result comes back on the caller's device; the caller's tensor is not modified."""
    seen = []

    def fake_all_reduce(t, op=None):
        seen.append((t.device, t.dtype))
        t.mul_(2)  # as if two ranks held the same values
    monkeypatch.setattr(distributed, 'is_dist', lambda: True)
    monkeypatch.setattr(distributed, 'comm_device', lambda: torch.device('cpu'))
    monkeypatch.setattr(dist, 'all_reduce', fake_all_reduce)
    mine = torch.tensor([1.0, 2.0])
    out = distributed.all_reduce_sum(mine)
    assert out.tolist() == [2.0, 4.0] and mine.tolist() == [1.0, 2.0] and seen == [(torch.device('cpu'), torch.float32)]
    assert distributed.all_reduce_sum([3, 4]).tolist() == [6, 8]
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def test_one_process_needs_no_group():
    assert not distributed.is_dist()
    assert distributed.all_reduce_sum([1.5]).tolist() == [1.5] and distributed.any_rank(True)
    distributed.barrier()
    assert distributed.comm_device() == torch.device('cpu')


@pytest.mark.parametrize('name', ['', 'cpu'])
def test_resolve_device_without_gpu(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert distributed.resolve_device(name) == torch.device('cpu')
