"""Which of two exact CPU implementations of an op runs, decided on the machine at hand: a short, cached measurement
per shape, like ``torch.backends.cudnn.benchmark``.

Several ops have two implementations on the CPU, equal up to float rounding, whose relative speed depends on the
CPU (oneDNN's fused linear against ``addmm``, the CPU flash attention kernel against matmul + softmax): so neither
is hard-wired. The accelerators of this package (``models/cpu/``) pass both candidates to ``use_fused``.

Policy: the environment variable ``MSGSSAF_CPU_KERNELS`` (read here and nowhere else):

* ``auto`` (default): the first call of an op with a given signature (shapes, dtype, threads) times each candidate
  on its real inputs (one warm-up each, then ``ROUNDS`` alternating runs, medians) and keeps the faster; ties go to
  the plain op. Each decision is made once per process and listed by ``summary()``.
* ``fused``: always the first candidate (tests use it to exercise every fast path).
* ``plain``: no accelerator is installed at all (``models.cpu.install`` does nothing): the models' own forwards.

Choices belong to the run, not to the model or its checkpoints: a resumed run measures again.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from typing import Callable, Optional

import torch

POLICIES = ('auto', 'fused', 'plain')
ENV_VAR = 'MSGSSAF_CPU_KERNELS'
ROUNDS = 5               # timed runs per candidate after one warm-up
MARGIN = 0.03            # the fused candidate must be this much faster to be chosen
_lock = threading.Lock()
_decisions: dict[tuple, tuple[str, float, float]] = {}   # signature -> (choice, fused ms, plain ms)


def policy() -> str:
    """The policy from ``MSGSSAF_CPU_KERNELS`` ('auto' when unset); ValueError for any other value."""
    env = os.environ.get(ENV_VAR, '').strip().lower() or 'auto'
    if env not in POLICIES:
        raise ValueError(f"the environment variable {ENV_VAR}={os.environ[ENV_VAR]!r} is not one of "
                         f"{', '.join(POLICIES)}; unset it or set one of those")
    return env


def _signature(op: str, tensors: tuple[torch.Tensor, ...]) -> tuple:
    return (op, torch.get_num_threads(), *((tuple(t.shape), t.dtype) for t in tensors))


def _run_ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def use_fused(op: str, tensors: tuple[torch.Tensor, ...], fused: Callable[[], object],
              plain: Callable[[], object], prefer_fused: bool = False) -> bool:
    """Whether ``op`` on inputs like ``tensors`` should run its fused candidate (see the module docstring).

    ``fused`` and ``plain`` compute the op without side effects; under 'auto' both run ``1 + ROUNDS`` times on the
    first call with a new signature (without autograd), never again. ``prefer_fused``: ties go to the fused
    candidate (for one that saves memory: the plain one must then be ``MARGIN`` faster)."""
    mode = policy()
    if mode != 'auto':
        return mode == 'fused'
    key = _signature(op, tensors)
    found = _decisions.get(key)
    if found is not None:
        return found[0] == 'fused'
    with torch.no_grad():
        fused(), plain()  # warm-up (first-call allocations, oneDNN primitive creation)
        times = {'fused': [], 'plain': []}
        for r in range(ROUNDS):
            for name, fn in (('fused', fused), ('plain', plain)) if r % 2 == 0 else (('plain', plain), ('fused', fused)):
                times[name].append(_run_ms(fn))
    f_ms, p_ms = statistics.median(times['fused']), statistics.median(times['plain'])
    if prefer_fused:
        choice = 'plain' if p_ms < f_ms * (1 - MARGIN) else 'fused'
    else:
        choice = 'fused' if f_ms < p_ms * (1 - MARGIN) else 'plain'
    with _lock:
        _decisions.setdefault(key, (choice, f_ms, p_ms))
    return _decisions[key][0] == 'fused'


def decisions() -> dict[tuple, tuple[str, float, float]]:
    """Signature -> (choice, fused ms, plain ms) of every decision made so far in this process."""
    return dict(_decisions)


def summary() -> Optional[str]:
    """One line: the policy and, per op, how many signatures chose each kernel and the time they save; None when
    nothing was decided (no CPU float32 eager work yet, or a fixed policy)."""
    mode = policy()
    if mode != 'auto':
        return f'CPU kernels: {mode} (fixed by {ENV_VAR})'
    if not _decisions:
        return None
    per_op: dict[str, list] = {}
    for key, (choice, f_ms, p_ms) in _decisions.items():
        per_op.setdefault(key[0], []).append((choice, f_ms, p_ms))
    parts = []
    for op, rows in sorted(per_op.items()):
        n_fused = sum(c == 'fused' for c, _, _ in rows)
        chosen = sum(f if c == 'fused' else p for c, f, p in rows)
        plain = sum(p for _, _, p in rows)
        parts.append(f'{op}: {n_fused} of {len(rows)} shapes fused ({chosen:.1f} vs {plain:.1f} ms all plain)')
    return f'CPU kernels (auto, measured on {cpu_name()}): ' + '; '.join(parts)


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else the platform's processor string."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def reset() -> None:
    """Forget every decision (tests)."""
    with _lock:
        _decisions.clear()
