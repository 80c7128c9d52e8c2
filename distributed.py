"""Distributed helpers: the process group, this process's device, and every collective the project uses.

Collectives go only through the helpers here (``all_reduce_sum``, ``any_rank``, ``barrier``), and the helpers move
their tensors to the device the process group's backend talks on (``comm_device``: this process's GPU for NCCL,
the CPU for gloo) and back. NCCL accepts only CUDA tensors, gloo CPU ones: a caller cannot hand a collective a
tensor on the wrong device, whatever device its own tensor lives on.
"""
from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess

import torch
import torch.distributed as dist

from config import ConfigError

_comm_device = torch.device('cpu')
DEFAULT_MASTER_PORT = 29500  # torchrun's default


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list ('gpu[07-09,12],cpu3' -> 'gpu07'): ``scontrol show hostnames`` where
    Slurm's tools are installed, else the list's first entry expanded by hand."""
    if shutil.which('scontrol'):
        try:
            out = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], capture_output=True, text=True,
                                 timeout=30)
            if out.returncode == 0 and out.stdout.split():
                return out.stdout.split()[0]
        except (OSError, subprocess.SubprocessError):
            pass  # the list expanded by hand below
    m = re.match(r'([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*)', nodelist)
    prefix, ranges, suffix = m.groups() if m else (nodelist, None, '')
    return prefix + (re.split('[-,]', ranges)[0] if ranges else '') + suffix


def slurm_environment(environ: os._Environ = os.environ) -> bool:
    """Under ``srun`` with no launcher (one process per task, no RANK set): RANK, WORLD_SIZE and LOCAL_RANK from
    SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, MASTER_ADDR the job's first node and MASTER_PORT 29500 unless set,
    as DeiT's and ConvNeXt's ``init_distributed_mode`` read them. Returns whether it set them."""
    if 'RANK' in environ or 'SLURM_PROCID' not in environ or 'SLURM_NTASKS' not in environ:
        return False
    environ['RANK'] = environ['SLURM_PROCID']
    environ['WORLD_SIZE'] = environ['SLURM_NTASKS']
    environ['LOCAL_RANK'] = environ.get('SLURM_LOCALID', '0')
    nodes = environ.get('SLURM_STEP_NODELIST') or environ.get('SLURM_JOB_NODELIST') or environ.get('SLURM_NODELIST')
    environ.setdefault('MASTER_ADDR', first_host(nodes) if nodes else '127.0.0.1')
    environ.setdefault('MASTER_PORT', str(DEFAULT_MASTER_PORT))
    return True


def init_distributed(device: torch.device, timeout_s: int = 600) -> tuple[int, int]:
    """Join the process group started by torchrun / torch.distributed.launch, if any; returns (rank, world).

    NCCL for a CUDA ``device`` (its collectives then run on that GPU), gloo otherwise (on the CPU)."""
    global _comm_device
    if 'RANK' not in os.environ or 'WORLD_SIZE' not in os.environ:
        return 0, 1
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if world == 1 and 'MASTER_ADDR' not in os.environ:
        return 0, 1
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    kwargs = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == 'cuda':
        kwargs['device_id'] = device
    dist.init_process_group(**kwargs)
    _comm_device = device if backend == 'nccl' else torch.device('cpu')
    return dist.get_rank(), dist.get_world_size()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Started by torchrun / torch.distributed.launch (which set RANK), whether or not the group is up yet."""
    return 'RANK' in os.environ


def process_rank() -> int:
    """This process's rank: the group's, or the launcher's before the group exists (e.g. for a config error)."""
    return dist.get_rank() if is_dist() else int(os.environ.get('RANK', 0))


def shutdown() -> None:
    """Leave the process group (if any)."""
    if is_dist():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def comm_device() -> torch.device:
    """The device the process group's collectives take their tensors on (CPU without a process group)."""
    if is_dist() and dist.get_backend() == 'nccl':
        return _comm_device if _comm_device.type == 'cuda' else torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_reduce_sum(values) -> torch.Tensor:
    """The sum over ranks of ``values`` (a tensor on any device, or numbers), as a new tensor on the device of
    ``values`` (the CPU for numbers). The collective itself runs on ``comm_device()``; one process: a copy."""
    t = torch.as_tensor(values)
    if not is_dist():
        return t.clone()
    work = t.detach().to(comm_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def agree_on_every_rank(values: list[int]) -> bool:
    """True on every rank if every rank holds the same ``values`` (one collective: the maximum of the values and
    of their negations, i.e. max and -min)."""
    t = torch.tensor([float(v) for v in values] + [-float(v) for v in values])
    if not is_dist():
        return True
    work = t.to(comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.MAX)
    high, neg_low = work.cpu().tensor_split(2)
    return bool(torch.equal(high, -neg_low))


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank."""
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def is_collective_failure(e: BaseException) -> bool:
    """An error raised because another process of the run died or stopped answering."""
    text = str(e).lower()
    return is_dist() and (isinstance(e, dist.DistError) or 'gloo' in text or 'nccl' in text)


def resolve_device(name: str) -> torch.device:
    """'' picks CUDA (this process's LOCAL_RANK GPU) when available, else CPU."""
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if not name:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(name)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device('cuda', local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device
