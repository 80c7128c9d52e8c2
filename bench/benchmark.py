"""Speed table: inference images/s, batch-1 latency and a full training step, for configs and timm models.

    python bench/benchmark.py --cfg configs/msg_tiny_p4_win7_224.yaml configs/MG-SSAF/MG-SSAF-T.yaml \
        --timm swin_tiny_patch4_window7_224 [--batch-size 8] [--threads 2] [--compile] [--channels-last] \
        [--amp-dtype bfloat16] [--device cuda] [--json out.json] [--rounds 3] [--keep-freed-memory] \
        [--official-msg ../MSG-Transformer --official-mgssaf ../MG-SSAF]   # side by side with the official code
        [--baseline ../base]                # and with our own code of another commit (git worktree add ../base C)
        [--onnxruntime]                     # and each --cfg model exported to ONNX, in ONNX Runtime
        [--saved-bytes]                     # and the GPU activation memory, on fake CUDA (bench/fake_cuda.py)

Each model runs in a fresh process of its own (so peak memory is its own). Each of our models is timed together
with its official one (and its ONNX Runtime session, and the same config built by the code of ``--baseline``, a
checkout of this repository at another commit): all are built, then for each part (inference, latency,
training step) all are warmed up and take turns, a chunk of about ``CHUNK_S`` seconds of calls each (the order
rotated every pass), until each has run ``--min-time`` seconds, so that a slow spell of a shared machine slows both
sides of a ratio alike. The models of a group are resident together (on a GPU: two or three CUDA contexts and
their memory at once). A figure is the median of a model's chunks (seconds per call, synchronised on CUDA); a ratio
is the median over its chunk pairs. ``--rounds N`` repeats all of it N times, each time in fresh processes, and
reports each figure's median and each ratio's median and spread over the rounds (this machine is shared and noisy).
``--keep-freed-memory`` applies main.py's CPU allocator setting (``utils.keep_freed_memory``) to every model.
Inference runs in eval mode under ``torch.inference_mode``; the training step is forward + cross-entropy +
backward + AdamW step in train mode (for our models, the optimiser main.py builds: fused AdamW; for the official
models and timm's, ``torch.optim.AdamW`` as their training scripts build it). Peak memory is the CUDA
allocator's peak on GPU and the process's peak resident set size (RSS) on CPU. Weights are random: speed does
not depend on them.

``--onnxruntime`` exports each ``--cfg`` model once (``deploy.export_onnx``, as ``tools/export_onnx.py`` does; in a
process of its own, not timed) and adds a row that times the file in an ONNX Runtime session with the same batch,
input size and threads (``intra_op_num_threads``), float32: inference and latency only (no training step), peak
RSS of a process that holds only the session.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: config, models and utils come from the repository root


def _build(spec: dict, img_size: Optional[int]):
    import torch  # noqa: F401
    import models  # noqa: F401  (registers ours with timm too)
    if spec['kind'] == 'official':
        from bench.official import official_model
        from config import load_config_file
        cfg = load_config_file(spec['name'], ['DATA.IMG_SIZE', str(img_size)] if img_size else [])
        return official_model(cfg, spec['root']), cfg.DATA.IMG_SIZE, f'{cfg.MODEL.NAME} (official)', None
    if spec['kind'] in ('cfg', 'baseline'):  # a baseline's process imports config and models from its checkout
        from config import load_config_file
        from models import build_model
        opts = ['MODEL.DROP_PATH_RATE', '0.0'] + (['DATA.IMG_SIZE', str(img_size)] if img_size else [])
        cfg = load_config_file(spec['name'], opts)
        suffix = ' (baseline)' if spec['kind'] == 'baseline' else ''
        return build_model(cfg), cfg.DATA.IMG_SIZE, cfg.MODEL.NAME + suffix, cfg
    import timm
    kwargs = {'img_size': img_size} if img_size else {}
    model = timm.create_model(spec['name'], pretrained=False, **kwargs)
    size = img_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    return model, size, spec['name'], None


def export_for_benchmark(spec: dict, args: dict) -> dict:
    """Runs in a child process: the ``cfg`` model of ``spec`` (random weights, eval) written to ``spec['onnx']``."""
    import torch
    from deploy import export_onnx
    torch.manual_seed(0)
    model, size, name, _ = _build({'kind': 'cfg', 'name': spec['name']}, args['img_size'])
    export_onnx(model.eval(), torch.randn(2, 3, size, size), spec['onnx'])
    return {'model': name, 'img_size': size, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6}


PARTS = ('infer', 'latency', 'train')


def train_optimizer(model, cfg):
    """The optimiser a timed training step uses: ours (``cfg`` given) this codebase's (fused AdamW, decay groups),
    as main.py trains; the official repositories' and timm's models a plain AdamW."""
    import torch
    if cfg is not None:
        from optimizer import build_optimizer
        return build_optimizer(cfg, model, 1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


CHUNK_S = 0.25  # seconds of calls per timed chunk: short against the spells of a shared host's slowness
PAUSE_S = 0.005  # between chunks: lets the last chunk's OpenMP threads stop spinning before the next one starts


class Timed:
    """One model built and ready to time, in the process that holds it: ``prepare(part)`` warms a part up,
    ``time(part, k)`` runs it ``k`` times and returns the seconds per call.

    The parts (``PARTS``): 'infer' (a batch, eval, ``torch.inference_mode``), 'latency' (batch 1, likewise) and
    'train' (forward, cross-entropy, backward and optimiser step in train mode). An ONNX Runtime session has no
    'train'. Prepare the parts in that order: 'train' switches the model to train mode."""

    def __init__(self, spec: dict, args: dict) -> None:
        import torch
        torch.set_num_threads(args['threads'])
        torch.manual_seed(0)
        self.device = torch.device(args['device'])
        self.cfg = self.model = self.session = self.opt = None
        b = args['batch_size']
        fmt = torch.channels_last if args['channels_last'] else torch.contiguous_format
        if spec['kind'] == 'onnxruntime':
            from deploy import onnx_session
            self.session = onnx_session(spec['onnx'], self.device, threads=args['threads'])
            size, name, params_m = spec['img_size'], f"{spec['model']} (onnxruntime)", spec['params_m']
            self.parts, x_device, fmt = ('infer', 'latency'), 'cpu', torch.contiguous_format  # numpy input
        else:
            if args.get('keep_freed_memory'):  # as main.py does for CPU runs, for every model measured
                from utils import keep_freed_memory
                keep_freed_memory()
            model, size, name, self.cfg = _build(spec, args['img_size'])
            self.model = model.to(self.device).to(memory_format=fmt).eval()
            if self.cfg is not None and self.device.type == 'cpu':
                _install_cpu_accelerators(model)
            params_m = sum(p.numel() for p in model.parameters()) / 1e6
            if args['compile']:
                import logging
                from utils import compile_model
                self.run_model = compile_model(model, logging.getLogger('benchmark'))
            else:
                self.run_model = model
            self.amp_dtype = getattr(torch, args['amp_dtype']) if args['amp_dtype'] else None
            self.parts, x_device = PARTS, self.device
        self.x = torch.randn(b, 3, size, size, device=x_device).contiguous(memory_format=fmt)
        self.x1 = self.x[:1].clone()
        # ONNX Runtime returns host arrays: nothing to wait for
        on_gpu = self.device.type == 'cuda' and self.session is None
        self.sync = (lambda: torch.cuda.synchronize(self.device)) if on_gpu else (lambda: None)
        self.info = {'model': name, 'img_size': size, 'params_m': params_m, 'batch': b}

    def _autocast(self):
        import torch
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _call(self, part: str) -> None:
        import torch
        if part == 'train':
            with self._autocast():
                loss = torch.nn.functional.cross_entropy(self.run_model(self.x).float(), self.target)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            return
        x = self.x if part == 'infer' else self.x1
        if self.session is not None:
            from deploy import run_session
            run_session(self.session, x)
            return
        with torch.inference_mode(), self._autocast():
            self.run_model(x)

    def prepare(self, part: str) -> Optional[float]:
        """Two warm-up calls (and compilation); the seconds of the second, or None if this model has no ``part``."""
        import torch
        if part not in self.parts:
            return None
        if part == 'train':
            self.model.train()
            self.opt = train_optimizer(self.model, self.cfg)
            self.target = torch.randint(0, 10, (self.info['batch'],), device=self.device)
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
            if self.device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(self.device)
        self._call(part)
        return self.time(part, 1)

    def time(self, part: str, k: int) -> float:
        """Seconds per call of ``k`` calls of ``part``, synchronised on CUDA."""
        self.sync()
        start = time.perf_counter()
        for _ in range(k):
            self._call(part)
        self.sync()
        return (time.perf_counter() - start) / k

    def finish(self) -> dict:
        """What the table needs besides the timings: the peak memory (after 'train'), our models' CPU kernels."""
        import torch
        if self.device.type == 'cuda' and self.session is None:
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {'peak_mem_mb': peak_mb}
        if self.cfg is not None and self.device.type == 'cpu':
            out['cpu_kernels'] = _cpu_summary()
        return out


def _install_cpu_accelerators(model) -> None:
    """As main.py does on CPU (``models.cpu``); a baseline checkout from before ``models/cpu`` has its own."""
    try:
        from models import cpu
    except ImportError:
        return
    cpu.install(model)


def _cpu_summary():
    try:
        from models.cpu import kernels
    except ImportError:  # a baseline checkout from before models/cpu
        from models import kernels
    return kernels.summary()


def time_together(members: list, part: str, min_time: float) -> list:
    """Warm ``part`` up in every member (a ``Timed``, or a ``_Remote`` one in a process of its own), then time it,
    alternating: chunks of about ``CHUNK_S`` seconds of calls (at least one call), one per member in turn (the
    order rotated every pass), until every member has run ``min_time`` seconds (so a member whose single call
    takes longer than ``CHUNK_S`` runs as many chunks as the member with the shortest chunks needs, and longer than
    ``min_time``). Members timed together see the same spells of a shared machine's slowness, chunk for chunk.

    Returns: per member, the seconds per call of each of its chunks (the same count for every member that did not
    fail), or None where the member has no ``part``."""
    estimates = [m.prepare(part) for m in members]
    active = [i for i, e in enumerate(estimates) if e is not None]
    calls = {i: max(1, round(CHUNK_S / max(estimates[i], 1e-6))) for i in active}
    chunks = {i: [] for i in active}
    spent = dict.fromkeys(active, 0.)
    n = 0
    while active and min(spent[i] for i in active) < min_time:
        r = n % len(active)
        for i in active[r:] + active[:r]:  # rotated each pass: each member follows each other one as often
            time.sleep(PAUSE_S)
            seconds = members[i].time(part, calls[i])
            if seconds is None:  # its process failed (``_Remote.error``): the others go on
                active.remove(i)
                continue
            chunks[i].append(seconds)
            spent[i] += seconds * calls[i]
        n += 1
    return [chunks.get(i) for i in range(len(members))]


def _rows(members: list, parts: tuple, min_time: float) -> list:
    """Time ``parts`` of ``members`` together; one table row each (``chunks``: the chunk times of each part)."""
    timed = {part: time_together(members, part, min_time) for part in PARTS if part in parts}
    rows = []
    for i, m in enumerate(members):
        done = m.finish()
        if done is None:  # a ``_Remote`` whose process failed
            rows.append({'model': m.label, 'error': m.error})
            continue
        chunks = {part: t[i] for part, t in timed.items() if t[i] is not None}
        s = {part: statistics.median(c) for part, c in chunks.items()}
        b = m.info['batch']
        rows.append(dict(m.info, chunks=chunks,
                         infer_img_s=b / s['infer'] if 'infer' in s else None,
                         latency_ms=1000 * s['latency'] if 'latency' in s else None,
                         train_step_s=s.get('train'), train_img_s=b / s['train'] if 'train' in s else None,
                         **done))
    return rows


def measure_machine(spec: dict, args: dict) -> dict:
    """The CPU (or GPU) and its float32 matmul speed with the benchmark's threads: the yardstick every figure of
    the table is relative to (a 2048^3 GEMM; the median of ``torch.utils.benchmark``)."""
    import torch
    import torch.utils.benchmark as tb
    torch.set_num_threads(args['threads'])
    device = torch.device(args['device'])
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    # num_threads: Timer runs its statement with ONE thread unless told otherwise. It synchronises CUDA itself.
    timer = tb.Timer(stmt='a @ b', globals={'a': a, 'b': b}, num_threads=torch.get_num_threads())
    timer.timeit(2)  # warm-up
    seconds = timer.blocked_autorange(min_run_time=min(args['min_time'], 2.0)).median
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        from models.cpu.kernels import cpu_name
        name = f'{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})'
    return {'model': 'machine', 'device_name': name, 'matmul_gflops': 2 * n ** 3 / seconds / 1e9}


def _setup_child(spec: dict) -> None:
    """Imports of a measuring process come from this checkout, a baseline's from its own (config, models, utils)."""
    sys.path.insert(0, spec['root'] if spec.get('kind') == 'baseline' else ROOT)
    if spec.get('cpu_kernels'):
        os.environ['MSGSSAF_CPU_KERNELS'] = spec['cpu_kernels']


def _child(fn, spec, args, conn):
    _setup_child(spec)
    try:
        conn.send(fn(spec, args))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other models still run
        conn.send({'model': spec['name'], 'error': f'{type(e).__name__}: {e}'})


def _receive(conn, proc):
    """The next message of the child process ``proc`` on ``conn``; ``EOFError`` if it ended without sending one."""
    while not conn.poll(5):
        if not proc.is_alive() and not conn.poll(0):  # (it may have sent just before it ended)
            raise EOFError
    return conn.recv()


def _died(proc) -> str:
    proc.join(5)
    return f'the measuring process died (exit code {proc.exitcode})'


def run_isolated(spec: dict, args: dict, fn) -> dict:
    """``fn(spec, args)`` (e.g. ``measure_machine`` or ``export_for_benchmark``) in a fresh process; its result or an
    error row."""
    ctx = mp.get_context('spawn')
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_child, args=(fn, spec, args, child))
    proc.start()
    child.close()
    try:
        result = _receive(conn, proc)
    except (EOFError, OSError):
        result = {'model': spec['name'], 'error': _died(proc)}
    conn.close()
    proc.join()
    return result


def _serve(spec: dict, args: dict, conn) -> None:
    """A child process: build ``spec`` as a ``Timed``, then run the methods the parent names until 'finish'."""
    _setup_child(spec)
    try:
        try:
            timed = Timed(spec, args)
            conn.send(('ok', timed.info))
            while True:
                method, *params = conn.recv()
                conn.send(('ok', getattr(timed, method)(*params)))
                if method == 'finish':
                    return
        except (EOFError, BrokenPipeError):
            raise
        except Exception as e:  # noqa: BLE001 - reported in the table, the other models still run
            conn.send(('error', f'{type(e).__name__}: {e}'))
    except (EOFError, BrokenPipeError):  # the parent went away (it closes its end when it stops early)
        pass


class _Remote:
    """A ``Timed`` in a fresh process of its own (so that its peak memory is its own), called through a pipe.
    After a failure ``error`` says what went wrong and every call returns None."""

    def __init__(self, spec: dict, args: dict, ctx) -> None:
        suffix = {'official': ' (official)', 'onnxruntime': ' (onnxruntime)',
                  'baseline': ' (baseline)'}.get(spec['kind'], '')
        self.label = spec.get('model', spec['name']) + suffix
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(spec, args, child))
        self.proc.start()
        child.close()
        self.error: Optional[str] = None
        self.info: Optional[dict] = None

    def _call(self, *message):
        if self.error is not None:
            return None
        try:
            if message:
                self.conn.send(message)
            status, value = _receive(self.conn, self.proc)
        except (EOFError, OSError):
            status, value = 'error', _died(self.proc)
        if status == 'error':
            self.error = value
            return None
        return value

    def ready(self) -> None:
        self.info = self._call()

    def prepare(self, part: str) -> Optional[float]:
        return self._call('prepare', part)

    def time(self, part: str, k: int) -> Optional[float]:
        return self._call('time', part, k)

    def finish(self) -> Optional[dict]:
        out = self._call('finish')
        self.close()
        return out

    def close(self) -> None:
        """Make sure the process has ended: it ends by itself after 'finish' or when its end of the pipe closes."""
        self.conn.close()
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def measure_together(specs: list, args: dict) -> list:
    """Build every spec in a fresh process of its own, all before any timing, then time them together
    (``time_together``: chunk by chunk, alternating; ``args['parts']``, if given, names a subset of ``PARTS``).
    One row per spec, an error row where it failed."""
    ctx = mp.get_context('spawn')
    members = []
    try:
        for spec in specs:
            members.append(_Remote(spec, args, ctx))
        for m in members:
            m.ready()
        ok = [m for m in members if m.error is None]
        parts = tuple(args.get('parts') or PARTS)
        rows = dict(zip(map(id, ok), _rows(ok, parts, args['min_time']))) if ok else {}
    finally:  # also after an error or an interrupt here: no process is left waiting for its next call
        for m in members:
            m.close()
    return [{'model': m.label, 'error': m.error} if m.error is not None else rows[id(m)] for m in members]


TIMINGS = ('infer_img_s', 'latency_ms', 'train_step_s', 'train_img_s')


def _median_row(results: list[dict]) -> dict:
    """One row from the rounds of one model: the median of each timing, the largest peak memory, and every round's
    figures and chunk times (``per_round``, ``per_round_chunks``) for the side-by-side ratios."""
    ok = [r for r in results if 'error' not in r]
    if not ok:
        return results[0]
    row = dict(ok[0], rounds=len(ok))
    row.pop('chunks', None)
    row['per_round'] = {key: [r.get(key) for r in results] for key in TIMINGS}
    row['per_round_chunks'] = [r.get('chunks') or {} for r in results]
    for key in TIMINGS:  # None: not measured for this row (ONNX Runtime has no training step)
        row[key] = None if ok[0][key] is None else statistics.median(r[key] for r in ok)
    row['peak_mem_mb'] = max(r['peak_mem_mb'] for r in ok)
    return row


def format_table(rows: list[dict], args: dict, machine: Optional[dict] = None) -> str:
    head = (f"{'model':34s} {'size':>4s} {'params':>7s} {'infer img/s':>11s} {'latency ms':>10s} "
            f"{'train step s':>12s} {'train img/s':>11s} {'peak MB':>8s}")
    where = (f"{machine['device_name']}, float32 matmul {machine['matmul_gflops']:.0f} GFLOP/s; "
             if machine and 'error' not in machine else '')
    lines = [f"{where}device {args['device']}, {args['threads']} threads, batch {args['batch_size']}, "
             f"{'AMP ' + args['amp_dtype'] if args['amp_dtype'] else 'float32'}"
             f"{', compiled' if args['compile'] else ''}{', channels-last' if args['channels_last'] else ''}"
             f"{', malloc keeps freed memory' if args.get('keep_freed_memory') else ''}",
             head, '-' * len(head)]
    for r in rows:
        if 'error' in r:
            lines.append(f"{r['model']:34s} error: {r['error']}")
            continue
        train = (f"{r['train_step_s']:12.3f} {r['train_img_s']:11.2f}" if r['train_step_s'] is not None
                 else f"{'-':>12s} {'-':>11s}")
        lines.append(f"{r['model']:34s} {r['img_size']:4d} {r['params_m']:6.1f}M {r['infer_img_s']:11.2f} "
                     f"{r['latency_ms']:10.1f} {train} {r['peak_mem_mb']:8.0f}")
    return '\n'.join(lines)


PART_OF = {'infer_img_s': 'infer', 'latency_ms': 'latency', 'train_step_s': 'train'}


def round_ratios(ours: dict, ref: dict, key: str) -> list:
    """Per round, how many times faster ``ours`` ran than ``ref`` (rows of ``_median_row``). Where both were timed
    together (``measure_together``), the median over their chunk pairs: each pair ran back to back, so a slow spell
    of the machine slows both; otherwise the ratio of the round's figures."""
    out = []
    rounds = zip(ours.get('per_round', {}).get(key, []), ref.get('per_round', {}).get(key, []),
                 ours.get('per_round_chunks', []), ref.get('per_round_chunks', []))
    for x, y, cx, cy in rounds:
        a, b = cx.get(PART_OF[key]), cy.get(PART_OF[key])
        if a and b:
            out.append(statistics.median(tb / ta for ta, tb in zip(a, b)))
        elif x is not None and y is not None:
            out.append(x / y if key == 'infer_img_s' else y / x)
    return out


def _ratio(ours: dict, ref: dict, key: str, label: str) -> str:
    """'x1.23 <label>' (> 1: ``ours`` is faster): the median of ``round_ratios``, with their spread over several
    rounds (the ratio of the rows' figures where no round has both)."""
    per_round = round_ratios(ours, ref, key)
    if not per_round:
        per_round = [ours[key] / ref[key] if key == 'infer_img_s' else ref[key] / ours[key]]
    text = f"x{statistics.median(per_round):.2f} {label}"
    if len(per_round) > 1:
        text += f" ({min(per_round):.2f}-{max(per_round):.2f} by round)"
    return text


def _print_ratios(rows: list[dict]) -> None:
    """ours / official and ours / baseline for every model measured both ways; ONNX Runtime / eager (and / official)
    for every exported model."""
    by_name = {r['model']: r for r in rows if 'error' not in r}
    for kind in ('official', 'baseline'):
        suffix = f' ({kind})'
        for name, ref in by_name.items():
            if not name.endswith(suffix) or name[:-len(suffix)] not in by_name:
                continue
            ours = by_name[name[:-len(suffix)]]
            print(f"{ours['model']}: {_ratio(ours, ref, 'infer_img_s', 'inference')}, "
                  f"{_ratio(ours, ref, 'latency_ms', 'latency')}, "
                  f"{_ratio(ours, ref, 'train_step_s', 'train step')}, "
                  f"peak memory {ours['peak_mem_mb']:.0f} vs {ref['peak_mem_mb']:.0f} MB (ours vs {kind})")
    for name, ort in by_name.items():
        base = name[:-len(' (onnxruntime)')]
        if not name.endswith(' (onnxruntime)'):
            continue
        parts = [f"{_ratio(ort, ref, 'infer_img_s', 'inference')}, "
                 f"{_ratio(ort, ref, 'latency_ms', 'latency')} vs {what}"
                 for what, ref in (('eager', by_name.get(base)), ('official', by_name.get(f'{base} (official)')))
                 if ref is not None]
        if parts:
            print(f"{name}: " + '; '.join(parts))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='benchmark backbones (inference, latency, training step)')
    parser.add_argument('--cfg', nargs='*', default=[], help='YAML configs of our models')
    parser.add_argument('--timm', nargs='*', default=[], help='timm model names (e.g. swin_tiny_patch4_window7_224)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=None, help='override the input size')
    parser.add_argument('--threads', type=int, default=min(2, os.cpu_count() or 1), help='CPU threads')
    parser.add_argument('--device', default='cuda' if _cuda_available() else 'cpu')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default=None, help='autocast dtype')
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help="glibc malloc keeps freed memory (utils.keep_freed_memory, as main.py sets for CPU runs) "
                             "in every model's process; default: the C library's defaults")
    parser.add_argument('--cpu-kernels', choices=['auto', 'fused', 'plain'], default='auto',
                        help="our models' CPU kernels (MSGSSAF_CPU_KERNELS, models/cpu): measured per shape, fixed, "
                             "or none (plain)")
    parser.add_argument('--min-time', type=float, default=3.0, help='seconds of timed repeats per measurement')
    parser.add_argument('--rounds', type=int, default=1,
                        help='measure every model this many times, round-robin, and report medians')
    parser.add_argument('--json', default='', help='also write the results to this JSON file')
    parser.add_argument('--official-msg', default='', metavar='DIR',
                        help='also time the official MSG-Transformer of each msg --cfg, from a checkout of '
                             'hustvl/MSG-Transformer at DIR (for side-by-side ratios)')
    parser.add_argument('--official-mgssaf', default='', metavar='DIR',
                        help='likewise for MG-SSAF, from a checkout of shuaiyang11/MG-SSAF')
    parser.add_argument('--baseline', default='', metavar='DIR',
                        help='also time each --cfg model as the code of another checkout of this repository at DIR '
                             'builds it (e.g. git worktree add DIR <commit>), in turns with this code')
    parser.add_argument('--saved-bytes', action='store_true',
                        help='also print the bytes a training forward saves for backward on a GPU, at --batch-size '
                             'and --amp-dtype (float16 if unset), measured on fake CUDA tensors (bench/fake_cuda.py), '
                             'beside the official models\' where their checkouts are given')
    parser.add_argument('--onnxruntime', action='store_true',
                        help='also time each --cfg model exported to ONNX in ONNX Runtime (float32; inference and '
                             'latency; needs requirements-onnx.txt)')
    ns = parser.parse_args(argv)
    if not ns.cfg and not ns.timm:
        parser.error('name at least one --cfg or --timm model')
    if ns.rounds < 1 or ns.min_time <= 0 or ns.batch_size < 1:
        parser.error('--rounds and --batch-size must be >= 1 and --min-time > 0')
    for path in ns.cfg:
        if not os.path.isfile(path):
            parser.error(f"config file not found: '{path}'")
    if ns.onnxruntime:
        missing = [m for m in ('onnx', 'onnxscript', 'onnxruntime') if importlib.util.find_spec(m) is None]
        if missing:
            parser.error(f"--onnxruntime needs {', '.join(missing)}: pip install -r requirements-onnx.txt")
    args = {k: getattr(ns, k) for k in ('batch_size', 'img_size', 'threads', 'device', 'compile', 'channels_last',
                                        'amp_dtype', 'min_time', 'keep_freed_memory')}
    onnx_dir = tempfile.mkdtemp(prefix='benchmark-onnx-') if ns.onnxruntime else ''
    groups = []  # timed together: each of our models with its official one and its ONNX Runtime session
    for path in ns.cfg:
        group = [{'kind': 'cfg', 'name': path, 'cpu_kernels': ns.cpu_kernels}]
        from config import load_config_file
        root = ns.official_msg if load_config_file(path).MODEL.TYPE == 'msg' else ns.official_mgssaf
        if root:
            group.append({'kind': 'official', 'name': path, 'root': root})
        if ns.baseline:
            group.append({'kind': 'baseline', 'name': path, 'root': os.path.abspath(ns.baseline),
                          'cpu_kernels': ns.cpu_kernels})
        if ns.onnxruntime:
            group.append({'kind': 'onnxruntime', 'name': path, 'onnx': os.path.join(onnx_dir, f'{len(groups)}.onnx')})
        groups.append(group)
    groups += [[{'kind': 'timm', 'name': n}] for n in ns.timm]
    specs = [spec for group in groups for spec in group]
    runs = {id(spec): [] for spec in specs}
    machine = run_isolated({'name': 'machine'}, args, measure_machine)
    try:
        for spec in specs:
            if spec['kind'] == 'onnxruntime':  # once, before the timed rounds
                exported = run_isolated(spec, args, export_for_benchmark)
                spec.update(exported)
                print(f"exported {spec['model']} to ONNX", file=sys.stderr, flush=True)
        for r in range(ns.rounds):  # round-robin: a slow spell of a shared machine hits every model alike
            for group in groups:
                failed = [spec for spec in group if 'error' in spec]  # an export that failed
                for spec in failed:
                    runs[id(spec)].append({'model': f"{spec['model']} (onnxruntime)", 'error': spec['error']})
                timed = [spec for spec in group if 'error' not in spec]
                for spec, result in zip(timed, measure_together(timed, args)):
                    runs[id(spec)].append(result)
                print(f"round {r + 1}/{ns.rounds}: measured {', '.join(runs[id(s)][-1]['model'] for s in group)}",
                      file=sys.stderr, flush=True)
    finally:
        if onnx_dir:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    runs = [runs[id(spec)] for spec in specs]
    rows = [_median_row(results) for results in runs]
    print(format_table(rows, args, machine))
    _print_ratios(rows)
    for r in rows:
        if r.get('cpu_kernels'):
            print(f"{r['model']}: {r['cpu_kernels']}")
    if ns.saved_bytes and ns.cfg:
        from bench.fake_cuda import saved_bytes_table
        for line in saved_bytes_table(ns.cfg, ns.official_msg, ns.official_mgssaf, ns.batch_size,
                                      ns.amp_dtype or 'float16'):
            print(line)
    if ns.json:
        with open(ns.json, 'w') as f:
            json.dump({'settings': args, 'machine': machine, 'results': rows}, f, indent=1)
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == '__main__':
    sys.exit(main())
