"""Where the time of a forward pass (or training step) goes, by kind of op, ours beside the official model.

    python bench/profile_ops.py --cfg configs/msg_tiny_p4_win7_224.yaml [--official ../MSG-Transformer] \
        [--batch-size 8] [--threads 2] [--train] [--steps 3] [--top 12]
    python bench/profile_ops.py --cfg configs/msg_tiny_p4_win7_224.yaml [--official ../MSG-Transformer] --floor \
        [--train] [--rounds 3] [--min-time 2] [--targets 1.3 2.0] [--keep-freed-memory]
    python bench/profile_ops.py --cfg configs/msg_tiny_p4_win7_224.yaml [--official ../MSG-Transformer] --stages \
        [--train] [--rounds 3] [--steps 3] [--targets 1.2]

Runs ``--steps`` profiled passes after two warm-ups (``torch.profiler``, CPU) and sums the self time of the
operators in four groups: GEMMs (linear / matmul / bmm / addmm / oneDNN linear, with the GFLOP/s they reach from
the FLOP counts the profiler records), attention kernels (scaled_dot_product_attention), convolutions and the
rest (norms, softmax, GELU, copies, ...). Next to the measured float32 matmul speed of this CPU
(benchmark.measure_machine) this bounds what any exact implementation can gain: the GEMMs do the same FLOPs in
every implementation.

``--floor`` bounds it with this CPU's own kernels instead of one 2048^3 GEMM, and without the profiler's
overhead: it records every GEMM, attention product and convolution of one pass of our model (shapes and
arguments), times each alone with the kernels PyTorch offers for it here (``_candidates``: oneDNN or MKL;
contiguous or channels-last), keeps the fastest, and sums them: the floor. Both models are timed unprofiled as
``bench/benchmark.py`` times them (together, chunk by chunk, in ``--rounds`` pairs of fresh processes; medians).
``official / floor`` is about the most an implementation computing our products with these kernels could gain if
everything else (norms, softmax, GELU, copies, memory traffic between ops) took no time; for each target ratio the
lines say how many ms that leaves above the floor. Alone, an op's inputs and output stay in cache and its buffers
are reused: the floor is optimistic, the bound generous (but each figure is a median of ``FLOOR_REPEATS`` runs on a
noisy machine).
It then times our linear GEMMs where they run, unprofiled (each call wrapped in a clock), beside the same calls
alone (``gemms_in_context``): if the two agree, our GEMMs run at their floor speed inside the model, and what ours
spends above the floor is the work that is not a product (norms, softmax, GELU, copies, autograd).

``--stages`` is the stage profile: each model's step divided at the stages' inputs (patch embedding, stage 1-4
with the patch merging after it, head and loss, optimiser; forward and backward), timed unprofiled in fresh
processes (``time_stages``), beside the FLOPs of each part and what they take at this CPU's matmul speed (the
fastest of the 2048^3 matmuls timed after each model's timing and at the end: the host's speed moves). Beside
the official it gives ours / official per part and, per ``--targets`` ratio, the ms each part may take for that
ratio (the official's time over the ratio): a part whose FLOPs take longer than that at the peak reaches the ratio
only if its products run faster than the 2048^3 matmul (a yardstick, not a ceiling: oneDNN's GEMMs can beat MKL's
on some CPUs) and everything else in it takes no time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GEMM = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul', 'aten::linear', 'mkldnn::_linear_pointwise',
        'aten::baddbmm')
ATTENTION = ('aten::_scaled_dot_product_flash_attention_for_cpu', 'aten::scaled_dot_product_attention',
             'aten::_scaled_dot_product_flash_attention_for_cpu_backward')
CONV = ('aten::mkldnn_convolution', 'aten::convolution', 'aten::_convolution', 'aten::conv2d',
        'aten::convolution_backward', 'aten::_slow_conv2d_forward')


def profile(model, x, steps: int, train: bool, ops: Optional[dict] = None, by_shape: bool = False) -> dict:
    """ms and FLOPs per step of each group; ``ops``, if given, gets each operator's self ms per step (``by_shape``:
    per operator and input shapes)."""
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
            key = f'{name} {e.input_shapes}' if by_shape else name
            ops[key] = ops.get(key, 0.0) + e.self_cpu_time_total / 1e3 / steps
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


# --- the floor: our model's products, each at the fastest kernel PyTorch offers here, timed alone ---------------
# Leaf kernels only (aten::linear, aten::matmul and aten::convolution are wrappers whose children are listed).
FLOOR_KINDS = {'mkldnn::_linear_pointwise': 'linear GEMMs', 'aten::addmm': 'linear GEMMs', 'aten::mm': 'linear GEMMs',
               'aten::bmm': 'attention products', 'aten::baddbmm': 'attention products',
               'aten::_scaled_dot_product_flash_attention_for_cpu': 'attention products',
               'aten::_scaled_dot_product_flash_attention_for_cpu_backward': 'attention products',
               'aten::mkldnn_convolution': 'convolutions', 'aten::_slow_conv2d_forward': 'convolutions',
               'aten::convolution_backward': 'convolutions'}
FLOOR_REPEATS = 5  # timed runs per candidate after one warm-up; the median counts

Call = Tuple[str, tuple, tuple]  # (op name, input shapes, concrete arguments), as the profiler records a call


def record_products(model, x, train: bool) -> Dict[Call, int]:
    """One profiled pass (after two warm-ups, so that the model's per-shape kernel choices are made): every call of
    a ``FLOOR_KINDS`` kernel, as {(name, input shapes, concrete arguments): number of calls}. ``train``: forward,
    cross-entropy and backward in train mode; else the forward in eval mode under ``torch.inference_mode``."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    model.train(train)

    def step():
        if train:
            torch.nn.functional.cross_entropy(model(x), torch.zeros(x.shape[0], dtype=torch.long)).backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                model(x)
    for _ in range(2):
        step()
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    calls: Dict[Call, int] = {}
    for e in prof.events():
        if e.name in FLOOR_KINDS:
            key = (e.name, _frozen(e.input_shapes), _frozen(e.concrete_inputs))
            calls[key] = calls.get(key, 0) + 1
    return calls


def _frozen(value: Any) -> Any:
    """Lists (of lists) as tuples: a recorded call as a dict key."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _median_ms(fn: Callable[[], object]) -> float:
    """Median ms of ``FLOOR_REPEATS`` runs of ``fn`` after one warm-up."""
    fn()
    times = []
    for _ in range(FLOOR_REPEATS):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _candidates(name: str, shapes: tuple, concrete: tuple) -> List[Callable[[], object]]:
    """Ways to compute the product of one recorded call on random inputs of its shapes, to time: the kernels PyTorch
    has here for it (a GEMM through oneDNN and through ``addmm`` / ``mm``; a convolution through oneDNN's
    ``mkldnn_convolution`` and ``F.conv2d``, contiguous and channels-last; a CPU flash attention as itself and as
    its batched products, without their softmax). Operands are contiguous (the profiler records no strides)."""
    import torch
    import torch.nn.functional as F
    rand = torch.randn
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, '_linear_pointwise')

    def dnnl(a: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> Callable[[], object]:
        return lambda: torch.ops.mkldnn._linear_pointwise(a, w, bias, 'none', [], '')  # a (..., K) @ w (N, K)^T

    if name == 'mkldnn::_linear_pointwise':
        x, w, b = (shapes[0], shapes[2], shapes[3]) if len(shapes) == 5 else shapes[:3]  # binary: x, other, w, b
        a, weight, bias = rand(x), rand(w), rand(b) if b else None
        return [dnnl(a, weight, bias), lambda: F.linear(a, weight, bias)]
    if name in ('aten::addmm', 'aten::mm'):
        bias_shape, m1, m2 = shapes[:3] if name == 'aten::addmm' else ((), *shapes[:2])
        a, weight = rand(m1), rand(m2[1], m2[0])  # the (K, N) operand as an (N, K) weight
        bias = rand(bias_shape) if bias_shape else None
        fns = [(lambda: torch.addmm(bias, a, weight.t())) if bias is not None else (lambda: torch.mm(a, weight.t()))]
        if onednn and (bias is None or bias.dim() == 1):  # oneDNN's linear takes one bias per output column
            fns.append(dnnl(a, weight, None if bias is None else bias.expand(m2[1]).contiguous()))
        return fns
    if name == 'aten::bmm':
        a, b = rand(shapes[0]), rand(shapes[1])
        return [lambda: torch.bmm(a, b)]
    if name == 'aten::baddbmm':
        c, a, b = rand(shapes[0]), rand(shapes[1]), rand(shapes[2])
        return [lambda: torch.baddbmm(c, a, b)]
    if name.startswith('aten::_scaled_dot_product_flash_attention_for_cpu'):
        backward = name.endswith('_backward')
        q, k, v = shapes[1:4] if backward else shapes[:3]  # the backward's inputs start with grad_out
        bh, lq, lk, d, dv = q[0] * q[1], q[2], k[2], q[3], v[3]
        qm, km_t, p, vm = rand(bh, lq, d), rand(bh, d, lk), rand(bh, lq, lk), rand(bh, lk, dv)
        if backward:  # dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q (dO: lq x dv, dS: lq x lk)
            do = rand(bh, lq, dv)
            return [lambda: (torch.bmm(do, vm.transpose(1, 2)), torch.bmm(p.transpose(1, 2), do),
                             torch.bmm(p, km_t.transpose(1, 2)), torch.bmm(p.transpose(1, 2), qm))]
        q4, k4, v4 = rand(q), rand(k), rand(v)
        mask = rand(shapes[5]) if len(shapes) > 5 and shapes[5] else None
        return [lambda: (torch.bmm(qm, km_t), torch.bmm(p, vm)),
                lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)]
    if name in ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward', 'aten::convolution_backward'):
        return _conv_candidates(name, shapes, concrete)
    raise ValueError(f'no floor candidates for {name}')


def _conv_candidates(name: str, shapes: tuple, concrete: tuple) -> List[Callable[[], object]]:
    """``_candidates`` of a recorded 2-D convolution (forward or backward)."""
    import torch
    import torch.nn.functional as F
    needed = {'aten::convolution_backward': (4, 5, 6), 'aten::_slow_conv2d_forward': (4, 5)}.get(name, (3, 4, 5, 6))
    if len(shapes[0]) != 4 or len(concrete) <= max(needed) or any(concrete[i] is None for i in needed):
        raise ValueError(f'{name}: only 2-D convolutions with recorded arguments are replayed, got input '
                         f'{shapes[0]} and arguments {concrete}')
    if name == 'aten::convolution_backward':
        grad_shape, x_shape, w_shape = shapes[:3]
        bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = concrete[3:11]
        fns = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            g, x, w = (torch.randn(s).contiguous(memory_format=fmt) for s in (grad_shape, x_shape, w_shape))
            fns.append(lambda g=g, x=x, w=w: torch.ops.aten.convolution_backward(
                g, x, w, bias_sizes, list(stride), list(padding), list(dilation), transposed, list(output_padding),
                groups, list(mask)))
        return fns
    if name == 'aten::_slow_conv2d_forward':  # (input, weight, kernel_size, bias, stride, padding)
        (x_shape, w_shape), b_shape = shapes[:2], shapes[3]
        stride, padding, dilation, groups = concrete[4], concrete[5], (1, 1), 1
    else:  # mkldnn_convolution(input, weight, bias, padding, stride, dilation, groups)
        (x_shape, w_shape, b_shape), (padding, stride, dilation, groups) = shapes[:3], concrete[3:7]
    args = (list(padding), list(stride), list(dilation), groups)
    fns = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        x, w = torch.randn(x_shape).contiguous(memory_format=fmt), torch.randn(w_shape).contiguous(memory_format=fmt)
        b = torch.randn(b_shape) if b_shape else None
        fns.append(lambda x=x, w=w, b=b: F.conv2d(x, w, b, args[1], args[0], args[2], groups))
        if torch.backends.mkldnn.is_available():
            fns.append(lambda x=x, w=w, b=b: torch.ops.aten.mkldnn_convolution(x, w, b, *args))
    return fns


def replay_floor(calls: Dict[Call, int]) -> Dict[str, List[float]]:
    """{kind: [ms, calls]}: each recorded call at the fastest of its candidates (``_candidates``; the median of
    ``FLOOR_REPEATS`` runs each, measured once per distinct call), times its number of calls."""
    import torch
    kinds: Dict[str, List[float]] = {}
    with torch.no_grad():
        for (name, shapes, concrete), n in calls.items():
            ms = min(_median_ms(fn) for fn in _candidates(name, shapes, concrete))
            row = kinds.setdefault(FLOOR_KINDS[name], [0.0, 0])
            row[0] += ms * n
            row[1] += n
    return kinds


def _arg_spec(a: Any) -> Any:
    """A call argument as a dict key: a tensor by shape, strides and dtype (to be rebuilt with random values)."""
    import torch
    if isinstance(a, torch.Tensor):
        return ('tensor', tuple(a.shape), a.stride(), a.dtype)
    return _frozen(a)


def _rebuild(spec: Any) -> Any:
    """The argument of ``_arg_spec``: a tensor with those strides over random values (expanded ones too)."""
    import torch
    if isinstance(spec, tuple) and spec[:1] == ('tensor',):
        _, shape, stride, dtype = spec
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
        return torch.randn(size, dtype=dtype).as_strided(shape, stride)
    return list(spec) if isinstance(spec, tuple) else spec


def gemms_in_context(model, x, train: bool, steps: int = 3) -> Tuple[float, float, int]:
    """Our linear GEMMs timed where they run, unprofiled, beside the same calls alone.

    Every call of the GEMM entry points the models use from Python (oneDNN's linear, both overloads; ``F.linear``;
    ``torch.mm`` and ``Tensor.mm``, which the custom backwards call) is wrapped in a clock for ``steps`` passes
    (forward, cross-entropy and backward in train mode; eval inference otherwise), after two warm-ups; then each
    distinct call (shapes, strides, arguments) runs alone on random inputs (``_median_ms``). The GEMMs of plain
    ``nn.Linear`` backwards run inside autograd and are not counted. Returns (ms a step in the model, ms alone,
    calls a step)."""
    import torch
    import torch.nn.functional as F
    calls: Dict[tuple, List[float]] = {}
    recording = [False]
    from models.cpu.ops import ONEDNN_LINEAR as _DNNL_LINEAR  # oneDNN's linear exists in this build
    fns: Dict[str, Callable] = {'F.linear': F.linear, 'mm': torch.mm}
    if _DNNL_LINEAR:
        fns.update(linear_pointwise=torch.ops.mkldnn._linear_pointwise.default,
                   linear_pointwise_binary=torch.ops.mkldnn._linear_pointwise.binary)

    def clocked(name: str) -> Callable:
        fn = fns[name]

        def call(*args, **kwargs):
            if not recording[0]:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            key = (name, tuple(_arg_spec(a) for a in args), tuple((k, _arg_spec(v)) for k, v in kwargs.items()))
            calls.setdefault(key, []).append(time.perf_counter() - t0)
            return out
        return call

    class _Pointwise:  # stands in for the op packet torch.ops.mkldnn._linear_pointwise
        __call__ = staticmethod(clocked('linear_pointwise')) if _DNNL_LINEAR else None
        binary = staticmethod(clocked('linear_pointwise_binary')) if _DNNL_LINEAR else None
        default = __call__

    packet = torch.ops.mkldnn._linear_pointwise if _DNNL_LINEAR else None
    tensor_mm, mm = torch.Tensor.mm, clocked('mm')
    F.linear, torch.mm, torch.Tensor.mm = clocked('F.linear'), mm, mm
    if _DNNL_LINEAR:
        torch.ops.mkldnn._linear_pointwise = _Pointwise()
    try:
        model.train(train)
        target = torch.zeros(x.shape[0], dtype=torch.long)
        for i in range(2 + steps):
            recording[0] = i >= 2
            if train:
                F.cross_entropy(model(x), target).backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    model(x)
    finally:
        recording[0] = False
        F.linear, torch.mm, torch.Tensor.mm = fns['F.linear'], fns['mm'], tensor_mm
        if _DNNL_LINEAR:
            torch.ops.mkldnn._linear_pointwise = packet
    in_model = alone = 0.0
    with torch.no_grad():
        for (name, args, kwargs), times in calls.items():
            n = len(times) / steps  # calls a step with this signature
            in_model += n * 1e3 * statistics.median(times)
            real_args, real_kwargs = [_rebuild(a) for a in args], {k: _rebuild(v) for k, v in kwargs}
            alone += n * _median_ms(lambda: fns[name](*real_args, **real_kwargs))
    return in_model, alone, round(sum(len(t) for t in calls.values()) / steps)


def floor_lines(kinds: Dict[str, List[float]], ours_ms: float, official_ms: Optional[float],
                targets: Tuple[float, ...] = (1.3, 2.0)) -> List[str]:
    """The floor by kind and what it bounds: how much faster than the official an implementation doing our products
    on these kernels could be if nothing else (norms, softmax, GELU, copies, traffic between ops) took time, and
    for each target ratio the ms that leaves for everything else."""
    total = sum(ms for ms, _ in kinds.values())
    lines = [f'  {kind:20s} {ms:8.1f} ms  ({n} calls)' for kind, (ms, n) in sorted(kinds.items())]
    lines.append(f"  {'floor':20s} {total:8.1f} ms; ours {ours_ms:.1f} ms, {ours_ms - total:.1f} ms above it")
    if official_ms and total > 0:
        lines.append(f'official {official_ms:.1f} ms: ours / official {official_ms / ours_ms:.2f}x; at most '
                     f'{official_ms / total:.2f}x with the floor and nothing else')
        for t in targets:
            budget = official_ms / t - total
            lines.append(f'  {t:.1f}x the official leaves {budget:.1f} ms above the floor '
                         f'(ours is {ours_ms - total:.1f} ms above it)' if budget > 0 else
                         f'  {t:.1f}x the official is out of reach: {official_ms / t:.1f} ms < the floor')
    return lines


# --- the stage profile: each stage's time where it runs, unprofiled, beside its FLOPs at the matmul peak ---------
def stage_modules(model) -> List[Any]:
    """The model's stages (``model.layers``, in ours and in the official code alike; ``ValueError`` without)."""
    stages = getattr(model, 'layers', None)
    if stages is None or not hasattr(model, 'patch_embed'):
        raise ValueError(f'{type(model).__name__} has no patch_embed and layers to profile by stage')
    return list(stages)


def _ours(cfg):
    """Our model of ``cfg`` as main.py runs it on CPU: with the CPU accelerators (``models.cpu``)."""
    from models import build_model, cpu
    model = build_model(cfg)
    cpu.install(model)
    return model


def stage_flops(model, x, train: bool) -> List[float]:
    """FLOPs of one step by part, as ``time_stages`` divides a step (patch embedding; each stage from its input
    to the next stage's input; the rest): the FLOP counter's running total read at the stages' inputs in one
    forward pass. Under the counter our models run their own products (MSG-Transformer's last block only for the rows
    its head reads): the least an exact implementation computes. A training step counts each
    part's products 3 times (forward; the input and the weight gradient), the patch embedding's first one too
    although the image needs no gradient (under 1% of any model's total, 2-3% of an MG-SSAF patch embedding's): the
    counter's own backward counts are not used, as it counts a grouped convolution's backward as a dense one."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    stages = stage_modules(model)
    marks: List[float] = []
    with FlopCounterMode(display=False) as counter:
        def total() -> float:
            return float(sum(counter.flop_counts['Global'].values()))
        handles = [s.register_forward_pre_hook(lambda m, a: marks.append(total())) for s in stages]
        handles.append(stages[-1].register_forward_hook(lambda m, a, o: marks.append(total())))
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
        end = total()
    bounds = [0.0, *marks, end]
    per_part = [(3.0 if train else 1.0) * (bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
    return per_part + ([0.0] if train else [])  # the optimiser: no products


def stage_parts(n_stages: int, train: bool) -> List[str]:
    return ['patch embed', *(f'stage {i + 1}' for i in range(n_stages)), 'head and loss' if train else 'head'] + (
        ['optimiser'] if train else [])


def time_stages(model, x, target, opt, steps: int) -> Tuple[List[float], List[float]]:
    """(forward ms, backward ms) of each part of a step (``stage_parts`` order), medians of ``steps`` unprofiled steps
    after two warm-ups; a training step if ``opt`` is given (cross-entropy against ``target``), else inference.

    A stage runs from its input to the next stage's input (so the patch merging after it counts to it wherever the
    implementation calls it); its backward from the gradient of that next input to the gradient of its own input
    (tensor hooks: when autograd has computed each). The patch embedding is what comes before stage 1, the head
    (norm, pooling, classifier, loss) what comes after the last stage; the optimiser step is timed on its own
    (forward column; its backward is 0).
    """
    import torch
    import torch.nn.functional as F
    stages = stage_modules(model)
    n, train = len(stages), opt is not None
    clock: Dict[Any, float] = {}

    def mark(key: Any) -> None:
        clock[key] = time.perf_counter()

    def at_input(i: int) -> Callable:
        def hook(module, inputs) -> None:
            mark(('in', i))
            if train and inputs[0].requires_grad:
                inputs[0].register_hook(lambda g: mark(('grad in', i)))
        return hook

    def at_output(module, inputs, output) -> None:
        mark('out')
        if train and output.requires_grad:
            output.register_hook(lambda g: mark('grad out'))

    def step() -> List[float]:
        clock.clear()
        mark('start')
        if train:
            loss = F.cross_entropy(model(x), target)
            mark('loss')
            loss.backward()
            mark('backward')
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark('end')
        else:
            with torch.inference_mode():
                model(x)
            mark('loss')
        c = clock
        ins = [c[('in', i)] for i in range(n)] + [c['out']]
        fwd = [ins[0] - c['start'], *(ins[i + 1] - ins[i] for i in range(n)), c['loss'] - c['out']]
        if not train:
            return fwd
        grads = [c[('grad in', i)] for i in range(n)] + [c['grad out']]
        bwd = [c['backward'] - grads[0], *(grads[i] - grads[i + 1] for i in range(n)), grads[n] - c['loss']]
        return [*fwd, c['end'] - c['backward'], *bwd, 0.0]
    handles = [s.register_forward_pre_hook(at_input(i)) for i, s in enumerate(stages)]
    handles.append(stages[-1].register_forward_hook(at_output))
    model.train(train)
    try:
        for _ in range(2):  # warm-up: first-call allocations, the per-shape kernel choices
            step()
        runs = [step() for _ in range(steps)]
    finally:
        for h in handles:
            h.remove()
    ms = [1e3 * statistics.median(r[j] for r in runs) for j in range(len(runs[0]))]
    k = n + 3 if train else n + 2
    return ms[:k], (ms[k:] if train else [0.0] * k)


def measure_stages(spec: dict, args: dict) -> dict:
    """Runs in a fresh process (``benchmark.run_isolated``): ``time_stages`` and ``stage_flops`` of one model,
    trained with the optimiser ``bench/benchmark.py`` gives it."""
    import torch
    from bench.benchmark import _build, _install_cpu_accelerators, measure_machine, train_optimizer
    torch.set_num_threads(args['threads'])
    torch.manual_seed(0)
    model, size, name, cfg = _build(spec, None)
    if cfg is not None:
        _install_cpu_accelerators(model)
    b = args['batch_size']
    x, target = torch.randn(b, 3, size, size), torch.randint(0, 10, (b,))
    opt = train_optimizer(model, cfg) if args['train'] else None
    forward, backward = time_stages(model, x, target, opt, args['steps'])
    matmul = measure_machine({}, {'threads': args['threads'], 'device': 'cpu', 'min_time': 1.0})['matmul_gflops']
    return {'model': name, 'forward': forward, 'backward': backward, 'flops': stage_flops(model, x, args['train']),
            'matmul_gflops': matmul}


def stage_lines(rows: Dict[str, dict], parts: List[str], peak_gflops: float,
                targets: Tuple[float, ...] = ()) -> List[str]:
    """The stage profile: per part, its GFLOP and what they take at the matmul peak, each model's ms (forward and
    backward for a training step) and its share of the peak, and (beside the official) ours / official and, per
    target, the ms the official's time of that part over the target allows."""
    ours, off = rows['ours'], rows.get('official')
    train = any(any(r['backward']) for r in rows.values())

    def head_of(who: str) -> str:
        names = (f'{who} fwd', 'bwd') if train else (f'{who} ms',)
        return ''.join(f' {n:>{max(len(n), 7)}s}' for n in names) + f" {'% peak':>6s}"
    head = f"{'part':14s} {'GFLOP':>7s} {'at peak':>8s}" + head_of('ours')
    if off:
        head += head_of('official') + f" {'ours/off':>8s}" + ''.join(f" {f'{t:.1f}x: <=':>10s}" for t in targets)
    lines = [head]
    widths = {who: ([max(len(who) + 4, 7), 7] if train else [max(len(who) + 3, 7)]) for who in rows}

    def cells(who: str, fb: List[float], flops: float) -> str:
        ms = sum(fb)
        pct = f'{100 * flops / 1e6 / ms / peak_gflops:5.0f}%' if flops and ms > 0 else f"{'':6s}"
        values = fb if train else [ms]
        return ''.join(f' {v:{w}.1f}' for v, w in zip(values, widths[who])) + f' {pct}'

    totals = {who: [0.0, 0.0] for who in rows}
    for j, part in enumerate(parts + ['total']):
        if part == 'total':
            flops, f = sum(ours['flops']), totals
        else:
            flops = ours['flops'][j]
            f = {who: [r['forward'][j], r['backward'][j]] for who, r in rows.items()}
            for who in rows:
                totals[who] = [totals[who][0] + f[who][0], totals[who][1] + f[who][1]]
        line = f'{part:14s} {flops / 1e9:7.1f} {flops / 1e6 / peak_gflops:8.1f}' + cells('ours', f['ours'], flops)
        if off:
            o, u = sum(f['official']), sum(f['ours'])
            line += cells('official', f['official'], flops) + f" {(f'{o / u:.2f}x' if u > 0 else ''):>8s}"
            line += ''.join(f' {o / t:10.1f}' for t in targets)
        lines.append(line)
    return lines


def main_stages(args: argparse.Namespace) -> int:
    """``--stages``: each model's stage profile, in fresh processes (``--rounds``, alternating; per part the median
    of the rounds' medians), beside this CPU's matmul peak."""
    from bench.benchmark import measure_machine, run_isolated
    specs = {'ours': {'kind': 'cfg', 'name': args.cfg}}
    if args.official:
        specs['official'] = {'kind': 'official', 'name': args.cfg, 'root': args.official}
    bench = {'batch_size': args.batch_size, 'threads': args.threads, 'steps': args.steps, 'train': args.train}
    results: Dict[str, List[dict]] = {who: [] for who in specs}
    for _ in range(args.rounds):
        for who, spec in specs.items():
            r = run_isolated(spec, bench, fn=measure_stages)
            if 'error' in r:
                print(f"{who}: {r['error']}", file=sys.stderr)
                return 1
            results[who].append(r)
    rows = {}
    for who, rs in results.items():
        rows[who] = {key: [statistics.median(r[key][j] for r in rs) for j in range(len(rs[0][key]))]
                     for key in ('forward', 'backward')}
        rows[who]['flops'] = rs[0]['flops']
    import torch
    torch.set_num_threads(args.threads)
    machine = measure_machine({}, {'threads': args.threads, 'device': 'cpu', 'min_time': 2.0})
    # The yardstick: the fastest of the matmul speeds measured after each timing and here (the host's speed moves).
    speeds = [r['matmul_gflops'] for rs in results.values() for r in rs] + [machine['matmul_gflops']]
    peak = max(speeds)
    n_stages = len(rows['ours']['flops']) - (3 if args.train else 2)
    print(f"{machine['device_name']}, float32 matmul {peak:.0f} GFLOP/s (the fastest of {len(speeds)} measurements, "
          f"{min(speeds):.0f}-{peak:.0f}), {args.threads} threads; {results['ours'][0]['model']}, batch "
          f"{args.batch_size}, {'training step' if args.train else 'inference'}; ms a step, unprofiled: medians of "
          f"{args.steps} steps in each of {args.rounds} fresh processes a model")
    for line in stage_lines(rows, stage_parts(n_stages, args.train), peak,
                            tuple(args.targets) if args.official else ()):
        print(line)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cfg', required=True)
    parser.add_argument('--official', default='', help='checkout of the official repository of this model')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--train', action='store_true', help='profile a training step instead of inference')
    parser.add_argument('--top', type=int, default=0, metavar='N',
                        help='also list the N operators with the most self time, per model')
    parser.add_argument('--by-shape', action='store_true', help='--top: each operator by its input shapes')
    parser.add_argument('--floor', action='store_true',
                        help="instead: our model's GEMMs, attention products and convolutions, each at the fastest "
                             "kernel PyTorch offers for it here, timed alone; beside both models' unprofiled times")
    parser.add_argument('--stages', action='store_true',
                        help='instead: the time of each stage (forward, backward), unprofiled, beside its FLOPs at '
                             "this CPU's matmul peak, ours beside the official")
    parser.add_argument('--rounds', type=int, default=3,
                        help='--floor, --stages: unprofiled timings of each model, alternating')
    parser.add_argument('--min-time', type=float, default=2.0, help='--floor: seconds per unprofiled timing')
    parser.add_argument('--targets', type=float, nargs='+', default=[1.3, 2.0], metavar='X',
                        help='--floor, --stages: speed-ups over the official to weigh against the floor, or the ms '
                             "the official's time of each stage allows (default 1.3 2.0)")
    parser.add_argument('--keep-freed-memory', action='store_true',
                        help="--floor: the models' unprofiled timings with main.py's allocator setting, as "
                             "benchmark.py --keep-freed-memory (default: the C library's, as benchmark.py)")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.threads, args.steps, args.rounds) < 1 or args.min_time <= 0:
        parser.error('--batch-size, --threads, --steps and --rounds must be >= 1 and --min-time > 0')
    if min(args.targets) <= 0:
        parser.error('--targets must be ratios > 0')
    if not os.path.isfile(args.cfg):
        parser.error(f"config file not found: '{args.cfg}'")
    if args.official:  # before any work: the official file this config needs
        from bench.official import official_model_file
        from config import load_config_file
        path = official_model_file(load_config_file(args.cfg), args.official)
        if not os.path.isfile(path):
            parser.error(f"--official: no '{path}' (clone hustvl/MSG-Transformer or shuaiyang11/MG-SSAF, the "
                         f"repository of this config's model)")
    if args.floor and args.stages:
        parser.error('--floor and --stages are two reports: ask for one')
    if args.floor:
        return main_floor(args)
    if args.stages:
        return main_stages(args)
    import torch
    torch.set_num_threads(args.threads)
    from bench.benchmark import measure_machine
    from bench.official import official_model
    from config import load_config_file
    from utils import keep_freed_memory
    keep_freed_memory()
    machine = measure_machine({}, {'threads': args.threads, 'device': 'cpu', 'min_time': 2.0})
    cfg = load_config_file(args.cfg, ['MODEL.DROP_PATH_RATE', '0.0'])
    x = torch.randn(args.batch_size, 3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
    ops = {'ours': {}, 'official': {}}
    rows = [('ours', profile(_ours(cfg), x, args.steps, args.train, ops['ours'], args.by_shape))]
    if args.official:
        rows.append(('official', profile(official_model(cfg, args.official), x, args.steps, args.train,
                                         ops['official'], args.by_shape)))
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
        print(f"{who}: the {args.top} operators{' and input shapes' if args.by_shape else ''} with the most self "
              f"time, ms per step")
        for line in top_lines(ops[who], args.top):
            print(line)
    return 0


def main_floor(args: argparse.Namespace) -> int:
    """``--floor``: ours and the official timed as ``bench/benchmark.py`` times them (fresh processes, timed together chunk
    by chunk), then our model's products recorded and replayed alone (``replay_floor``)."""
    import torch
    from bench.benchmark import measure_machine, measure_together
    from config import load_config_file
    from utils import keep_freed_memory
    cfg = load_config_file(args.cfg, ['MODEL.DROP_PATH_RATE', '0.0'])
    b, what = args.batch_size, 'train' if args.train else 'infer'
    bench = {'batch_size': b, 'img_size': None, 'threads': args.threads, 'device': 'cpu', 'compile': False,
             'channels_last': False, 'amp_dtype': None, 'min_time': args.min_time,
             'keep_freed_memory': args.keep_freed_memory, 'parts': (what,)}
    specs = {'ours': {'kind': 'cfg', 'name': args.cfg}}
    if args.official:
        specs['official'] = {'kind': 'official', 'name': args.cfg, 'root': args.official}
    times: Dict[str, List[float]] = {who: [] for who in specs}
    for _ in range(args.rounds):
        for who, r in zip(specs, measure_together(list(specs.values()), bench)):
            if 'error' in r:
                print(f"{who}: {r['error']}", file=sys.stderr)
                return 1
            times[who].append(1e3 * (r['train_step_s'] if args.train else b / r['infer_img_s']))
    ms = {who: statistics.median(t) for who, t in times.items()}
    keep_freed_memory()  # the replays reuse their buffers (this process only: the timings ran in their own)
    torch.set_num_threads(args.threads)
    machine = measure_machine({}, {'threads': args.threads, 'device': 'cpu', 'min_time': 2.0})
    torch.manual_seed(0)
    x = torch.randn(b, 3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
    model = _ours(cfg)
    kinds = replay_floor(record_products(model, x, args.train))
    in_model, alone, n_calls = gemms_in_context(model, x, args.train)
    step = ('training step (forward, loss, backward and optimiser step; the floor: forward and backward)'
            if args.train else 'inference')
    print(f"{machine['device_name']}, float32 matmul {machine['matmul_gflops']:.0f} GFLOP/s, {args.threads} threads; "
          f"{cfg.MODEL.NAME}, batch {b}, {step}")
    print('unprofiled ms a step, by round: ' + '; '.join(
        f"{who} {', '.join(f'{t:.0f}' for t in ts)} (median {ms[who]:.0f})" for who, ts in times.items()))
    print("floor: our model's products, each at the fastest kernel PyTorch offers for it here, timed alone")
    for line in floor_lines(kinds, ms['ours'], ms.get('official'), tuple(args.targets)):
        print(line)
    print(f'our linear GEMMs called from Python ({n_calls} a step), timed unprofiled inside the model: {in_model:.1f} '
          f'ms a step; the same calls alone: {alone:.1f} ms')
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
