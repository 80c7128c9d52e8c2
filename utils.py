"""Small helpers that are neither distributed nor checkpoint I/O: seeding, memory, model wrappers, compile."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
import torch.nn as nn


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and CUDA) global generators."""
    seed_cpu_generators(seed)
    torch.manual_seed(seed)


def seed_cpu_generators(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's CPU generators only: ~30 us, where ``torch.manual_seed`` also seeds
    every CUDA generator (~300 us in a CUDA build): for the per-sample seeds of data workers."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (e.g. seed, rank, epoch, step); distinct parts give unrelated
    streams, unlike ``seed + rank + 1000 * epoch``, where (rank 1000, epoch 0) and (rank 0, epoch 1) collide."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory it frees instead of handing it back to the OS (for CPU runs).

    By default glibc serves large blocks with mmap and trims the heap top, so tensors of the same sizes, freed and
    allocated again every step, are paged in afresh each time: on this 2-core CPU ~17k minor page faults per MSG-T
    inference batch and ~36k per MG-SSAF-T batch, 9-21% of their time (the official MG-SSAF: ~220k). Heap only,
    no trimming below 2 GB free: the process keeps its peak footprint (the peak itself does not change). The
    same as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment. Forked DataLoader
    workers inherit it. Returns False where the C library is not glibc (nothing changes there).
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl and macOS have other mallopt semantics)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, '_orig_mod'):
            model = model._orig_mod
        elif hasattr(model, 'module') and isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


_compile_warned = False


def compile_model(model: torch.nn.Module, logger: logging.Logger) -> torch.nn.Module:
    """``torch.compile(model)`` with inductor, never fatal: a graph inductor cannot compile (no C++ compiler, an
    unsupported op, ...) runs eagerly, with one warning per process; dynamo's own failures likewise run eagerly."""
    import torch._dynamo
    torch._dynamo.config.suppress_errors = True

    def backend(gm, example_inputs):
        global _compile_warned
        from torch._inductor.compile_fx import compile_fx
        try:
            return compile_fx(gm, example_inputs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: this graph runs eagerly
            if not _compile_warned:
                _compile_warned = True
                first_line = str(e).splitlines()[0] if str(e) else ''
                logger.warning(f'torch.compile failed ({type(e).__name__}: {first_line}); running those graphs eagerly')
            return gm.forward

    try:
        compiled = torch.compile(model, backend=backend)
    except Exception as e:  # noqa: BLE001 - compile set-up failure (e.g. an unsupported Python): eager
        logger.warning(f'torch.compile unavailable ({type(e).__name__}: {e}); running eagerly')
        return model
    logger.info('torch.compile enabled (graphs that fail to compile run eagerly)')
    return compiled
