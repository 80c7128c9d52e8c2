"""Where the time of a forward pass (or training step) goes, by kind of op, ours beside the official model.

    python tools/profile_ops.py --cfg configs/msg_tiny_p4_win7_224.yaml [--official ../MSG-Transformer] \
        [--batch-size 8] [--threads 2] [--train] [--steps 3] [--top 12]

Runs ``--steps`` profiled passes after two warm-ups (``torch.profiler``, CPU) and sums the self time of the
operators in four groups: GEMMs (linear / matmul / bmm / addmm / oneDNN linear, with the GFLOP/s they reach from
the FLOP counts the profiler records), attention kernels (scaled_dot_product_attention), convolutions and the
rest (norms, softmax, GELU, copies, ...). Next to the measured float32 matmul speed of this CPU
(benchmark.measure_machine) this bounds what any exact implementation can gain: the GEMMs do the same FLOPs in
every implementation.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEMM = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul', 'aten::linear', 'mkldnn::_linear_pointwise',
        'aten::baddbmm')
ATTENTION = ('aten::_scaled_dot_product_flash_attention_for_cpu', 'aten::scaled_dot_product_attention',
             'aten::_scaled_dot_product_flash_attention_for_cpu_backward')
CONV = ('aten::mkldnn_convolution', 'aten::convolution', 'aten::_convolution', 'aten::conv2d',
        'aten::convolution_backward', 'aten::_slow_conv2d_forward')


def profile(model, x, steps: int, train: bool, ops: Optional[dict] = None) -> dict:
    """ms and FLOPs per step of each group; ``ops``, if given, gets each operator's self ms per step."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    if train:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        target = torch.zeros(x.shape[0], dtype=torch.long)

        def step():
            torch.nn.functional.cross_entropy(model(x), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.train()
    else:
        model.eval()

        def step():
            with torch.inference_mode():
                model(x)
    for _ in range(2):
        step()
    with tprofile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        for _ in range(steps):
            step()
    groups = {'GEMMs': [0.0, 0.0], 'attention kernels': [0.0, 0.0], 'convolutions': [0.0, 0.0], 'other': [0.0, 0.0]}
    for e in prof.key_averages(group_by_input_shape=True):
        name = e.key
        group = ('GEMMs' if name in GEMM else 'attention kernels' if name in ATTENTION
                 else 'convolutions' if name in CONV else 'other')
        groups[group][0] += e.self_cpu_time_total / 1e3 / steps          # ms per step
        if ops is not None:
            ops[name] = ops.get(name, 0.0) + e.self_cpu_time_total / 1e3 / steps
        groups[group][1] += (e.flops or _uncounted_flops(name, e.input_shapes) * e.count) / steps
    return groups


def _uncounted_flops(name: str, shapes: list) -> int:
    """FLOPs of one call of the ops whose count the profiler leaves at 0: oneDNN's linear (input ..., K; weight
    N, K; the binary overload takes the residual second) and the CPU flash attention (q B, H, L, D; k B, H, S, D:
    two GEMMs forward, four backward)."""
    def numel(shape):
        n = 1
        for d in shape:
            n *= d
        return n
    if name == 'mkldnn::_linear_pointwise' and shapes:
        weight = shapes[2] if len(shapes) == 5 else shapes[1]      # binary: x, other, weight, bias, 'add'
        return 2 * numel(shapes[0]) * weight[0] if len(weight) == 2 else 0
    if name.startswith('aten::_scaled_dot_product_flash_attention_for_cpu') and shapes:
        q, k = (shapes[1], shapes[2]) if name.endswith('_backward') else (shapes[0], shapes[1])
        per_gemm = 2 * numel(q) * k[-2]
        return per_gemm * (4 if name.endswith('_backward') else 2)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', required=True)
    parser.add_argument('--official', default='', help='checkout of the official repository of this model')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--train', action='store_true', help='profile a training step instead of inference')
    parser.add_argument('--top', type=int, default=0, metavar='N',
                        help='also list the N operators with the most self time, per model')
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    from benchmark import _official_model, measure_machine
    from config import load_config_file
    from models import build_model
    from utils import keep_freed_memory
    keep_freed_memory()
    machine = measure_machine({}, {'threads': args.threads, 'device': 'cpu', 'min_time': 2.0})
    cfg = load_config_file(args.cfg, ['MODEL.DROP_PATH_RATE', '0.0'])
    x = torch.randn(args.batch_size, 3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
    ops = {'ours': {}, 'official': {}}
    rows = [('ours', profile(build_model(cfg), x, args.steps, args.train, ops['ours']))]
    if args.official:
        rows.append(('official', profile(_official_model(cfg, args.official), x, args.steps, args.train,
                                         ops['official'])))
    print(f"{machine['device_name']}, float32 matmul {machine['matmul_gflops']:.0f} GFLOP/s, {args.threads} threads; "
          f"{cfg.MODEL.NAME}, batch {args.batch_size}, {'training step' if args.train else 'inference'}")
    print(f"{'':10s} {'group':18s} {'ms':>8s} {'share':>6s} {'GFLOP/s':>8s}")
    for who, groups in rows:
        total = sum(ms for ms, _ in groups.values())
        for name, (ms, flops) in groups.items():
            speed = f'{flops / ms / 1e6:8.0f}' if flops and ms else f"{'':8s}"
            print(f'{who:10s} {name:18s} {ms:8.1f} {100 * ms / total:5.1f}% {speed}')
        print(f"{who:10s} {'total':18s} {total:8.1f}")
    for line in bound_lines(rows, machine['matmul_gflops']):
        print(line)
    for who, _ in rows if args.top > 0 else ():
        print(f'{who}: the {args.top} operators with the most self time, ms per step')
        for line in top_lines(ops[who], args.top):
            print(line)
    return 0


def top_lines(ops: dict, n: int) -> list[str]:
    """The ``n`` operators of ``ops`` (name -> ms per step) with the most time, one line each, with their share."""
    total = sum(ops.values()) or 1.0
    return [f'  {name:50s} {ms:8.1f} {100 * ms / total:5.1f}%'
            for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:n]]


def bound_lines(rows: list, peak_gflops: float) -> list[str]:
    """What the profile bounds: the GEMMs' share of the CPU's matmul peak, and the most any exact
    implementation could gain over the official model on this CPU."""
    totals = {who: sum(ms for ms, _ in groups.values()) for who, groups in rows}
    gemm = {who: groups['GEMMs'] for who, groups in rows}
    # the matrix products of linears and attention, wherever an implementation runs them (the official models
    # run attention as GEMMs, ours may run it in SDPA's kernel); the least of them is work an exact model does
    # (ours skips rows the head never reads)
    work = [groups['GEMMs'][1] + groups.get('attention kernels', (0.0, 0.0))[1] for _, groups in rows]
    flops = min((f for f in work if f), default=0.0)
    if not flops or not peak_gflops:
        return []
    floor_ms = flops / peak_gflops / 1e6
    lines = [f'GEMM work {flops / 1e9:.1f} GFLOP a step: {floor_ms:.1f} ms at the matmul peak '
             f'({peak_gflops:.0f} GFLOP/s)']
    for who, (ms, f) in gemm.items():
        lines.append(f'{who}: GEMMs at {100 * f / ms / 1e6 / peak_gflops:.0f}% of the peak; '
                     f'the rest {totals[who] - ms:.1f} ms')
    if 'official' in totals:
        off, ours = totals['official'], totals['ours']
        lines.append(f'ours / official {off / ours:.2f}x; bound with our GEMM time and nothing else '
                     f'{off / gemm["ours"][0]:.2f}x; with GEMMs at the peak and nothing else {off / floor_ms:.2f}x')
    return lines


if __name__ == '__main__':
    sys.exit(main())
