"""Speed table: inference images/s, batch-1 latency and a full training step, for configs and timm models.

    python benchmark.py --cfg configs/msg_tiny_p4_win7_224.yaml configs/MG-SSAF/MG-SSAF-T.yaml \
        --timm swin_tiny_patch4_window7_224 [--batch-size 8] [--threads 2] [--compile] [--channels-last] \
        [--amp-dtype bfloat16] [--device cuda] [--json out.json] [--rounds 3] [--keep-freed-memory] \
        [--official-msg ../MSG-Transformer --official-mgssaf ../MG-SSAF]   # side by side with the official code
        [--onnxruntime]                     # and each --cfg model exported to ONNX, in ONNX Runtime

Each model is measured in a fresh process (so peak memory is its own): ``torch.utils.benchmark`` medians after
warm-up, synchronised on CUDA; ``--rounds N`` repeats the whole list N times round-robin and reports each
model's median, and each side-by-side ratio's spread over the rounds (this machine is shared and noisy).
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
from typing import Optional

ROOT = os.path.dirname(os.path.abspath(__file__))


def official_model_file(cfg, root: str) -> str:
    """The file of the official checkout at ``root`` that defines ``cfg``'s model (it may not exist)."""
    if cfg.MODEL.TYPE == 'msg':
        return os.path.join(root, 'models', 'msg_transformer.py')
    variant = cfg.MODEL.NAME.split('-')[-1]          # MG-SSAF-T / -S / -B: one official file each
    return os.path.join(root, 'models', f'MS-SSAF-{variant}.py')


def _official_model(cfg, root: str):
    """The official implementation of ``cfg``'s model, imported from a checkout at ``root`` (not part of this
    repository: clone hustvl/MSG-Transformer or shuaiyang11/MG-SSAF yourself)."""
    import importlib.util
    path = official_model_file(cfg, root)
    if cfg.MODEL.TYPE == 'msg':
        factory = 'MSGTransformer'
        m = cfg.MODEL.MSG
        kwargs = dict(img_size=cfg.DATA.IMG_SIZE, patch_size=m.PATCH_SIZE, in_chans=m.IN_CHANS, num_classes=cfg.MODEL.NUM_CLASSES,
                      embed_dim=m.EMBED_DIM, depths=list(m.DEPTHS), num_heads=list(m.NUM_HEADS), window_size=m.WINDOW_SIZE,
                      mlp_ratio=m.MLP_RATIO, qkv_bias=m.QKV_BIAS, qk_scale=m.QK_SCALE, drop_path_rate=0.0, ape=m.APE,
                      patch_norm=m.PATCH_NORM, shuffle_size=list(m.SHUF_SIZE), manip_type=m.MANIP_TYPE)
    else:  # as ours is measured: no stochastic depth (the official constructor's default is 0.2)
        factory = 'MGSSAF'
        kwargs = dict(img_size=cfg.DATA.IMG_SIZE, num_classes=cfg.MODEL.NUM_CLASSES, drop_path_rate=0.0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"official model file not found: '{path}'")
    spec = importlib.util.spec_from_file_location(f'official_{os.path.basename(path)[:-3].replace("-", "_")}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, factory)(**kwargs)


def _build(spec: dict, img_size: Optional[int]):
    import torch  # noqa: F401
    import models  # noqa: F401  (registers ours with timm too)
    if spec['kind'] == 'official':
        from config import load_config_file
        cfg = load_config_file(spec['name'], ['DATA.IMG_SIZE', str(img_size)] if img_size else [])
        return _official_model(cfg, spec['root']), cfg.DATA.IMG_SIZE, f'{cfg.MODEL.NAME} (official)', None
    if spec['kind'] == 'cfg':
        from config import load_config_file
        from models import build_model
        opts = ['MODEL.DROP_PATH_RATE', '0.0', 'MODEL.CPU_KERNELS', spec.get('cpu_kernels') or 'auto']
        opts += ['DATA.IMG_SIZE', str(img_size)] if img_size else []
        cfg = load_config_file(spec['name'], opts)
        return build_model(cfg), cfg.DATA.IMG_SIZE, cfg.MODEL.NAME, cfg
    import timm
    kwargs = {'img_size': img_size} if img_size else {}
    model = timm.create_model(spec['name'], pretrained=False, **kwargs)
    size = img_size or model.pretrained_cfg.get('input_size', (3, 224, 224))[-1]
    return model, size, spec['name'], None


def _median_seconds(fn, sync, min_run_time: float) -> float:
    import torch
    import torch.utils.benchmark as tb
    for _ in range(2):  # warm-up (and compilation)
        fn()
    sync()

    def step():
        fn()
        sync()
    # num_threads: Timer runs its statement with ONE thread unless told otherwise.
    timer = tb.Timer(stmt='step()', globals={'step': step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def export_for_benchmark(spec: dict, args: dict) -> dict:
    """Runs in a child process: the ``cfg`` model of ``spec`` (random weights, eval) written to ``spec['onnx']``."""
    import torch
    from deploy import export_onnx
    torch.manual_seed(0)
    model, size, name, _ = _build({'kind': 'cfg', 'name': spec['name']}, args['img_size'])
    export_onnx(model.eval(), torch.randn(2, 3, size, size), spec['onnx'])
    return {'model': name, 'img_size': size, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6}


def measure_onnxruntime(spec: dict, args: dict) -> dict:
    """Runs in a child process: time the exported file in ONNX Runtime (inference and batch-1 latency)."""
    import torch
    from deploy import onnx_session, run_session
    torch.set_num_threads(args['threads'])
    session = onnx_session(spec['onnx'], torch.device(args['device']), threads=args['threads'])
    size, b = spec['img_size'], args['batch_size']
    torch.manual_seed(0)
    x = torch.randn(b, 3, size, size)
    x1 = x[:1].clone()
    t_inf = _median_seconds(lambda: run_session(session, x), lambda: None, args['min_time'])
    t_lat = _median_seconds(lambda: run_session(session, x1), lambda: None, args['min_time'])
    return {'model': f"{spec['model']} (onnxruntime)", 'img_size': size, 'params_m': spec['params_m'], 'batch': b,
            'infer_img_s': b / t_inf, 'latency_ms': 1000 * t_lat, 'train_step_s': None, 'train_img_s': None,
            'peak_mem_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


PARTS = ('infer', 'latency', 'train')


def train_optimizer(model, cfg):
    """The optimiser a timed training step uses: ours (``cfg`` given) this codebase's (fused AdamW, decay groups),
    as main.py trains; the official repositories' and timm's models a plain AdamW."""
    import torch
    if cfg is not None:
        from optimizer import build_optimizer
        return build_optimizer(cfg, model, 1e-4)
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def measure(spec: dict, args: dict) -> dict:
    """Runs in a child process: build, then time inference, latency and a train step (``args['parts']``, if
    given, names a subset of ``PARTS`` to time; the others are None, and so is the peak memory without 'train')."""
    if spec['kind'] == 'onnxruntime':
        return measure_onnxruntime(spec, args)
    import torch
    torch.set_num_threads(args['threads'])
    torch.manual_seed(0)
    device = torch.device(args['device'])
    if args.get('keep_freed_memory'):  # as main.py does for CPU runs, for every model measured (ours, official, timm)
        from utils import keep_freed_memory
        keep_freed_memory()
    model, size, name, cfg = _build(spec, args['img_size'])
    model.to(device)
    fmt = torch.channels_last if args['channels_last'] else torch.contiguous_format
    model.to(memory_format=fmt)
    amp_dtype = getattr(torch, args['amp_dtype']) if args['amp_dtype'] else None
    autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)  # noqa: E731
    if args['compile']:
        import logging
        from utils import compile_model
        run_model = compile_model(model, logging.getLogger('benchmark'))
    else:
        run_model = model
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    b = args['batch_size']
    x = torch.randn(b, 3, size, size, device=device).contiguous(memory_format=fmt)
    x1 = x[:1].clone()
    n_params = sum(p.numel() for p in model.parameters())

    parts = args.get('parts') or PARTS
    model.eval()
    with torch.inference_mode():
        def infer():
            with autocast():
                run_model(x)

        def infer1():
            with autocast():
                run_model(x1)
        t_inf = _median_seconds(infer, sync, args['min_time']) if 'infer' in parts else None
        t_lat = _median_seconds(infer1, sync, args['min_time']) if 'latency' in parts else None
    result = {'model': name, 'img_size': size, 'params_m': n_params / 1e6, 'batch': b,
              'infer_img_s': None if t_inf is None else b / t_inf,
              'latency_ms': None if t_lat is None else 1000 * t_lat, 'train_step_s': None, 'train_img_s': None,
              'peak_mem_mb': None}
    if 'train' not in parts:
        return result

    model.train()
    opt = train_optimizer(model, cfg)
    target = torch.randint(0, 10, (b,), device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    def train_step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(run_model(x).float(), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    t_train = _median_seconds(train_step, sync, args['min_time'])
    if device.type == 'cuda':
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    from models import kernels
    return dict(result, train_step_s=t_train, train_img_s=b / t_train, peak_mem_mb=peak_mb,
                cpu_kernels=kernels.summary() if cfg is not None and device.type == 'cpu' else None)


def measure_machine(spec: dict, args: dict) -> dict:
    """The CPU (or GPU) and its float32 matmul speed with the benchmark's threads: the yardstick every figure of
    the table is relative to (a 2048^3 GEMM; the median of ``torch.utils.benchmark``)."""
    import torch
    torch.set_num_threads(args['threads'])
    device = torch.device(args['device'])
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    seconds = _median_seconds(lambda: a @ b, sync, min(args['min_time'], 2.0))
    if device.type == 'cuda':
        name = torch.cuda.get_device_name(device)
    else:
        from models.kernels import cpu_name
        name = f'{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})'
    return {'model': 'machine', 'device_name': name, 'matmul_gflops': 2 * n ** 3 / seconds / 1e9}


def _child(fn, spec, args, queue):
    sys.path.insert(0, ROOT)
    try:
        queue.put(fn(spec, args))
    except Exception as e:  # noqa: BLE001 - reported in the table, the other models still run
        queue.put({'model': spec['name'], 'error': f'{type(e).__name__}: {e}'})


def run_isolated(spec: dict, args: dict, fn=measure) -> dict:
    """``fn(spec, args)`` (``measure`` or ``export_for_benchmark``) in a fresh process; its result or an error row."""
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, spec, args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting while the child lives
            if not proc.is_alive():
                result = {'model': spec['name'], 'error': f'the measuring process died (exit code {proc.exitcode})'}
                break
    proc.join()
    return result


TIMINGS = ('infer_img_s', 'latency_ms', 'train_step_s', 'train_img_s')


def _median_row(results: list[dict]) -> dict:
    """One row from the rounds of one model: the median of each timing, the largest peak memory."""
    ok = [r for r in results if 'error' not in r]
    if not ok:
        return results[0]
    row = dict(ok[0], rounds=len(ok))
    if len(results) > 1:  # every round's figures (JSON), for the spread of side-by-side ratios
        row['per_round'] = {key: [r.get(key) for r in results] for key in TIMINGS}
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


def _ratio(ours: dict, ref: dict, key: str, faster_is_larger: bool, label: str) -> str:
    """'x1.23 <label>' (> 1: ``ours`` is faster) and, over several rounds, the spread of the per-round ratios."""
    a, b = (ours, ref) if faster_is_larger else (ref, ours)
    text = f"x{a[key] / b[key]:.2f} {label}"
    pairs = [(x, y) for x, y in zip(a.get('per_round', {}).get(key, []), b.get('per_round', {}).get(key, []))
             if x is not None and y is not None]
    if len(pairs) > 1:  # the same round measured both back to back
        per_round = [x / y for x, y in pairs]
        text += f" ({min(per_round):.2f}-{max(per_round):.2f} by round)"
    return text


def _print_ratios(rows: list[dict]) -> None:
    """ours / official for every model measured both ways; ONNX Runtime / eager (and / official) for every
    exported model."""
    by_name = {r['model']: r for r in rows if 'error' not in r}
    for name, off in by_name.items():
        if not name.endswith(' (official)') or name[:-len(' (official)')] not in by_name:
            continue
        ours = by_name[name[:-len(' (official)')]]
        print(f"{ours['model']}: {_ratio(ours, off, 'infer_img_s', True, 'inference')}, "
              f"{_ratio(ours, off, 'latency_ms', False, 'latency')}, "
              f"{_ratio(ours, off, 'train_step_s', False, 'train step')}, "
              f"peak memory {ours['peak_mem_mb']:.0f} vs {off['peak_mem_mb']:.0f} MB (ours vs official)")
    for name, ort in by_name.items():
        base = name[:-len(' (onnxruntime)')]
        if not name.endswith(' (onnxruntime)'):
            continue
        parts = [f"{_ratio(ort, ref, 'infer_img_s', True, 'inference')}, "
                 f"{_ratio(ort, ref, 'latency_ms', False, 'latency')} vs {what}"
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
                        help="our models' CPU kernels (MODEL.CPU_KERNELS): measured per shape, or fixed")
    parser.add_argument('--min-time', type=float, default=3.0, help='seconds of timed repeats per measurement')
    parser.add_argument('--rounds', type=int, default=1,
                        help='measure every model this many times, round-robin, and report medians')
    parser.add_argument('--json', default='', help='also write the results to this JSON file')
    parser.add_argument('--official-msg', default='', metavar='DIR',
                        help='also time the official MSG-Transformer of each msg --cfg, from a checkout of '
                             'hustvl/MSG-Transformer at DIR (for side-by-side ratios)')
    parser.add_argument('--official-mgssaf', default='', metavar='DIR',
                        help='likewise for MG-SSAF, from a checkout of shuaiyang11/MG-SSAF')
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
    specs = []
    for path in ns.cfg:
        specs.append({'kind': 'cfg', 'name': path, 'cpu_kernels': ns.cpu_kernels})
        from config import load_config_file
        root = ns.official_msg if load_config_file(path).MODEL.TYPE == 'msg' else ns.official_mgssaf
        if root:
            specs.append({'kind': 'official', 'name': path, 'root': root})
        if ns.onnxruntime:
            specs.append({'kind': 'onnxruntime', 'name': path, 'onnx': os.path.join(onnx_dir, f'{len(specs)}.onnx')})
    specs += [{'kind': 'timm', 'name': n} for n in ns.timm]
    runs = [[] for _ in specs]
    machine = run_isolated({'name': 'machine'}, args, measure_machine)
    try:
        for spec in specs:
            if spec['kind'] == 'onnxruntime':  # once, before the timed rounds
                exported = run_isolated(spec, args, export_for_benchmark)
                spec.update(exported)
                print(f"exported {spec['model']} to ONNX", file=sys.stderr, flush=True)
        for r in range(ns.rounds):  # round-robin: a slow spell of a shared machine hits every model alike
            for spec, results in zip(specs, runs):
                if 'error' in spec:  # its export failed
                    results.append({'model': f"{spec['model']} (onnxruntime)", 'error': spec['error']})
                    continue
                results.append(run_isolated(spec, args))
                print(f"round {r + 1}/{ns.rounds}: measured {results[-1]['model']}", file=sys.stderr, flush=True)
    finally:
        if onnx_dir:
            shutil.rmtree(onnx_dir, ignore_errors=True)
    rows = [_median_row(results) for results in runs]
    print(format_table(rows, args, machine))
    _print_ratios(rows)
    for r in rows:
        if r.get('cpu_kernels'):
            print(f"{r['model']}: {r['cpu_kernels']}")
    if ns.json:
        with open(ns.json, 'w') as f:
            json.dump({'settings': args, 'machine': machine, 'results': rows}, f, indent=1)
    return 0


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == '__main__':
    sys.exit(main())
