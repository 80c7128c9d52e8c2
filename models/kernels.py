"""Which CPU kernel computes an op, decided on the machine at hand: a short, cached measurement per shape.

Several ops of the models have two exact implementations on the CPU, equal up to float rounding, whose speed
depends on the CPU: on an AVX-512 Xeon oneDNN's fused linear beat PyTorch's ``addmm``; on an AVX2 EPYC it lost by
30%, and so did the CPU flash kernel of ``scaled_dot_product_attention`` against plain matmuls + softmax. So
neither is hard-wired. The ops (the callers pass both candidates):

* ``linear`` / ``linear_gelu`` / ``linear_add``: oneDNN's linear with the bias (and the exact GELU, or the
  residual add) fused, ``torch.ops.mkldnn._linear_pointwise`` (``models.layers``), or ``F.linear`` (+ ``F.gelu``
  / ``+ residual``);
* ``attention``: ``F.scaled_dot_product_attention`` with the additive bias, or matmul, softmax, matmul.
* ``grad_input`` / ``grad_weight``: the GEMMs of the oneDNN linears' backward, through oneDNN or ``torch.mm``;
* ``ss_scores`` / ``ss_scores_train``: MG-SSAF's separable-attention scores as the diagonals of one full-window
  product or as the official per-row and per-column products (``layers.cpu_choice``; ``_train``: timed forward and
  backward, with autograd).

Policy (``MODEL.CPU_KERNELS``, or the ``MSGSSAF_CPU_KERNELS`` environment variable, which wins):

* ``auto`` (default): the first call of an op with a given signature (shapes, dtype, threads) times each
  candidate on its real inputs (one warm-up each, then ``ROUNDS`` alternating runs, medians) and keeps the faster,
  like ``torch.backends.cudnn.benchmark``; ties go to the plain op. Each decision is made once per process and
  listed by ``summary()`` (``main.py`` logs it once). ``export()`` / ``restore()`` carry the decisions in
  training checkpoints, so a resumed run computes with the same kernels (bit-identical continuation).
* ``fused`` / ``plain``: always the first / the second candidate (reproducible across machines and runs).

Only eager CPU float32 code asks: CUDA, autocast, ``torch.compile``, export, FX and TorchScript take the plain
ops before getting here (``layers.onednn_ok``, ``layers.cpu_choice``).
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
_policy = 'auto'
_decisions: dict[tuple, tuple[str, float, float]] = {}   # signature -> (choice, fused ms, plain ms)


def set_policy(name: str) -> None:
    """Set the process-wide policy ('auto', 'fused' or 'plain'); the environment variable still wins."""
    global _policy
    if name not in POLICIES:
        raise ValueError(f"CPU kernel policy must be one of {', '.join(POLICIES)}, got {name!r}")
    _policy = name


def policy() -> str:
    env = os.environ.get(ENV_VAR, '').strip().lower()
    if env:
        if env not in POLICIES:
            raise ValueError(f"{ENV_VAR} must be one of {', '.join(POLICIES)}, got {env!r}")
        return env
    return _policy


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
        return f'CPU kernels: {mode} (fixed by {ENV_VAR if os.environ.get(ENV_VAR) else "MODEL.CPU_KERNELS"})'
    if not _decisions:
        return None
    per_op: dict[str, list] = {}
    for key, (choice, f_ms, p_ms) in _decisions.items():
        per_op.setdefault(key[0], []).append((choice, f_ms, p_ms))
    parts = []
    for op, rows in sorted(per_op.items()):
        n_fused = sum(c == 'fused' for c, _, _ in rows)
        timed = [(c, f, p) for c, f, p in rows if f == f]  # restored decisions carry no times (NaN)
        chosen = sum(f if c == 'fused' else p for c, f, p in timed)
        plain = sum(p for _, _, p in timed)
        restored = f', {len(rows) - len(timed)} from the checkpoint' if len(timed) < len(rows) else ''
        parts.append(f'{op}: {n_fused} of {len(rows)} shapes fused ({chosen:.1f} vs {plain:.1f} ms all plain'
                     f'{restored})')
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


def _machine() -> dict:
    return {'cpu': cpu_name(), 'capability': str(torch.backends.cpu.get_cpu_capability()),
            'torch': str(torch.__version__)}  # plain str: weights_only loading takes no TorchVersion


def export() -> dict:
    """The decisions as plain data (for a checkpoint), with the machine they were measured on."""
    return {'machine': _machine(), 'decisions': [[list(_plain(k)), c] for k, (c, _, _) in _decisions.items()]}


def restore(saved: Optional[dict]) -> int:
    """Take the decisions of ``export()`` if they were measured on this kind of machine (same CPU, ISA, torch);
    returns how many were taken. Later first calls of the same signatures then use them without measuring."""
    if not saved or saved.get('machine') != _machine():
        return 0
    taken = 0
    for key, choice in saved.get('decisions', []):
        key = _unplain(key)
        if key not in _decisions:
            _decisions[key] = (choice, float('nan'), float('nan'))
            taken += 1
    return taken


def _plain(key: tuple) -> tuple:
    """A signature as JSON-like data (dtypes as strings)."""
    return tuple([list(k[0]), str(k[1])] if isinstance(k, tuple) else k for k in key)


def _unplain(key: list) -> tuple:
    out = []
    for k in key:
        if isinstance(k, list):
            out.append((tuple(k[0]), getattr(torch, k[1].replace('torch.', ''))))
        else:
            out.append(k)
    return tuple(out)


def reset() -> None:
    """Forget every decision (tests)."""
    with _lock:
        _decisions.clear()
