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
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from config import ConfigError, shown

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


JOIN_TIMEOUT_ENV = 'MSGSSAF_JOIN_TIMEOUT'  # seconds the processes of a run wait for each other at start
JOIN_TIMEOUT_S = 300
_SAY_WAITING_AFTER_S = 2.0  # a launcher's processes meet in well under this; a longer wait is said on stderr


class LaunchError(ConfigError):
    """A launcher variable that cannot be used, or processes that never met: each process says what it saw."""
    rank_specific = True


@dataclass(frozen=True)
class LauncherEnv:
    """What the launcher (torchrun, torch.distributed.launch, a scheduler's script) put in the environment."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    group: bool          # whether this process joins a process group (else it runs alone as rank 0)
    note: str = ''       # a variable that was set but not used, for the log


def _env_int(name: str, low: int, high: Optional[int] = None) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None:
        return None
    text = raw.strip()
    value = int(text) if text.isdigit() or (text[:1] == '-' and text[1:].isdigit()) else None
    if value is None or value < low or (high is not None and value > high):
        bound = f'a whole number >= {low}' if high is None else f'a whole number in {low}..{high}'
        raise LaunchError(f'the environment variable {name} is {shown(raw)}, not {bound}; the launcher (torchrun) '
                          f'sets it: unset it, or start the run with torchrun')
    return value


def launcher_env() -> LauncherEnv:
    """The launcher's variables, checked when read: RANK, WORLD_SIZE and LOCAL_RANK are whole numbers with RANK
    below WORLD_SIZE; a process group also needs MASTER_ADDR and a MASTER_PORT in 1..65535. RANK or WORLD_SIZE
    alone (left over in a shell) do not start a group."""
    world = _env_int('WORLD_SIZE', 1)
    rank = _env_int('RANK', 0)
    local_rank = _env_int('LOCAL_RANK', 0) or 0
    addr = os.environ.get('MASTER_ADDR', '').strip()
    if rank is None or world is None:
        left = [n for n, v in (('RANK', rank), ('WORLD_SIZE', world)) if v is not None]
        note = f'{left[0]} is set but not {"WORLD_SIZE" if left[0] == "RANK" else "RANK"}: one process' if left else ''
        return LauncherEnv(0, 1, local_rank, addr, 0, False, note)
    if rank >= world:
        raise LaunchError(f'RANK {rank} is not below WORLD_SIZE {world} (environment variables, left over from '
                          f'another run?); unset RANK and WORLD_SIZE to run one process, or start the run with '
                          f'torchrun')
    if world == 1 and not addr:
        return LauncherEnv(0, 1, local_rank, addr, 0, False)
    if not addr:
        raise LaunchError(f'RANK {rank} and WORLD_SIZE {world} are set but MASTER_ADDR is not; start the run with '
                          f'torchrun (which sets all of them), set MASTER_ADDR and MASTER_PORT, or unset RANK and '
                          f'WORLD_SIZE to run one process')
    port = _env_int('MASTER_PORT', 1, 65535)
    if port is None:
        raise LaunchError(f'MASTER_ADDR is set but MASTER_PORT is not; set it to a free port (e.g. 29500), or start '
                          f'the run with torchrun')
    return LauncherEnv(rank, world, local_rank, addr, port, True)


def join_timeout_s() -> int:
    """How long the processes of a run wait for each other at start (``MSGSSAF_JOIN_TIMEOUT``, seconds)."""
    value = _env_int(JOIN_TIMEOUT_ENV, 1)
    return JOIN_TIMEOUT_S if value is None else value


def _wait_for_master(env: LauncherEnv, deadline: float) -> bool:
    """Wait quietly until rank 0's store accepts connections, until ``deadline`` (PyTorch's own client retries print
    a C++ error block per attempt); whether it does."""
    while True:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=1.0):
                return True
        except socket.gaierror:
            raise LaunchError(f'MASTER_ADDR {shown(env.master_addr)} is not a known host name; set it to the '
                              f'address of the node that runs rank 0') from None
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def _join(env: LauncherEnv, timeout_s: int) -> dist.Store:
    """Meet the other processes of the run at MASTER_ADDR:MASTER_PORT, waiting at most ``timeout_s``; a wait
    longer than a moment is said on stderr, with what is awaited and for how long."""
    where = f'{env.master_addr}:{env.master_port}'
    waiting = (f'[rank {env.rank}] waiting for the {env.world_size} processes of this run to meet at {where} '
               f'(rank {env.rank} of {env.world_size}); giving up after {timeout_s} s ({JOIN_TIMEOUT_ENV})')
    timer = threading.Timer(min(_SAY_WAITING_AFTER_S, timeout_s / 2),
                            lambda: print(waiting, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    start = time.monotonic()
    other = 'rank 0' if env.rank else 'the other processes'
    gave_up = LaunchError(f'gave up after {timeout_s} s waiting for {other} of this run at {where} (WORLD_SIZE '
                          f'{env.world_size}): start all {env.world_size} processes (torchrun does), or unset RANK '
                          f'and WORLD_SIZE to run one process')
    try:
        if env.rank != 0 and not _wait_for_master(env, start + timeout_s):
            raise gave_up
        left = max(1.0, timeout_s - (time.monotonic() - start))
        store, _, _ = next(dist.rendezvous('env://', rank=env.rank, world_size=env.world_size,
                                           timeout=datetime.timedelta(seconds=left)))
        return store
    except dist.DistError as e:
        text = str(e)
        if 'EADDRINUSE' in text or 'address already in use' in text:
            raise LaunchError(f'MASTER_PORT {env.master_port} is in use on this host (another run?); choose a free '
                              f'port (torchrun --master_port N, or MASTER_PORT)') from None
        raise gave_up from None
    finally:
        timer.cancel()


def init_distributed(device: torch.device, timeout_s: int = 600) -> tuple[int, int]:
    """Join the process group started by torchrun / torch.distributed.launch, if any; returns (rank, world).

    NCCL for a CUDA ``device`` (its collectives then run on that GPU), gloo otherwise (on the CPU). The processes
    first meet within ``join_timeout_s()``; ``timeout_s`` then bounds each collective."""
    global _comm_device
    env = launcher_env()
    if not env.group:
        return 0, 1
    store = _join(env, join_timeout_s())
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    kwargs = dict(backend=backend, store=store, rank=env.rank, world_size=env.world_size,
                  timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == 'cuda':
        kwargs['device_id'] = device
    dist.init_process_group(**kwargs)
    _comm_device = device if backend == 'nccl' else torch.device('cpu')
    return dist.get_rank(), dist.get_world_size()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched() -> bool:
    """Started by torchrun / torch.distributed.launch (which set RANK, WORLD_SIZE, MASTER_*) as one of a group,
    whether or not the group is up yet."""
    try:
        return launcher_env().group
    except ConfigError:
        return False


def process_rank() -> int:
    """This process's rank: the group's, or the launcher's before the group exists (e.g. for a config error); 0
    where the launcher's variables start no group (a RANK left over in the shell must not silence errors)."""
    if is_dist():
        return dist.get_rank()
    try:
        env = launcher_env()
    except ConfigError:
        return 0
    return env.rank if env.group else 0


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
    local_rank = launcher_env().local_rank
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
