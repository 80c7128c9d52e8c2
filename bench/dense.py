"""Backbones at detection size: the forward time and the training activations of timm ``features_only`` models.

    python bench/dense.py [--models msg_transformer_tiny mg_ssaf_tiny swin_tiny_patch4_window7_224] \
        [--size 800 1344] [--batch-size 2] [--runs 5] [--threads N] [--amp-dtype float16] [--plain]

Each model is built with ``timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))`` (the four
maps an FPN takes; timm's Swin with ``img_size=--size``: its shifted-window masks built once for that size, its
windows padded inside; a detector feeding it varying sizes passes ``dynamic_img_size=True`` instead, which builds
the masks in every forward) and measured at ``--size`` (the usual COCO batch shape,
800x1333 padded to a multiple of 32) with batch ``--batch-size``:

* forward: the median of ``--runs`` eval forwards under ``torch.inference_mode`` after one warm-up, float32 on this
  CPU with ``--threads`` threads, the models taking turns (one forward each per round); ours with the CPU
  accelerators installed (``models.cpu.install``, as ``main.py``
  does on a CPU; ``--plain`` leaves them out);
* saved: the bytes one training forward saves for backward on a GPU under ``--amp-dtype`` autocast, measured on fake
  CUDA tensors (``bench/fake_cuda.py``'s ``run``, as ``bench/benchmark.py --saved-bytes``: each storage once,
  parameters not counted): the activation memory a detector's backbone holds per training step.

Weights are random: neither figure depends on them. The CPU is named in the output (``lscpu``'s model name).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: models and bench come from the repository root

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import models  # noqa: E402,F401  (registers msg_transformer_* and mg_ssaf_* with timm)
from bench.fake_cuda import GIB, fake_cuda, fake_input, run, to_fake_cuda  # noqa: E402
from models.cpu.kernels import cpu_name  # noqa: E402

MODELS = ('msg_transformer_tiny', 'mg_ssaf_tiny', 'swin_tiny_patch4_window7_224')
OUT_INDICES = (0, 1, 2, 3)
UNMASKED = ':unmasked'  # a model name with this suffix: its padding keys not masked (``padding_keys_unmasked``)


@contextlib.contextmanager
def padding_keys_unmasked():
    """The alternative the models do not take, for comparison: the padding left in the attention as zero tokens
    (MSG-Transformer's bias without the key mask, MG-SSAF's local heads without ``_mask_padded_keys``)."""
    import models.cpu.msg as cpu_msg
    import models.msg_transformer as msg
    from models.mg_ssaf import MultiGranularityAttention as MGA
    real_bias, real_mask = msg.padded_bias, MGA._mask_padded_keys
    msg.padded_bias = cpu_msg.padded_bias = lambda bias, key_mask, batch, dtype: real_bias(bias, None, batch, dtype)
    MGA._mask_padded_keys = lambda self, row, col, rows, cols: (row, col)
    try:
        yield
    finally:
        msg.padded_bias = cpu_msg.padded_bias = real_bias
        MGA._mask_padded_keys = real_mask


class Unmasked(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> list:
        with padding_keys_unmasked():
            return self.backbone(x)


def build(name: str, size: Sequence[int]) -> nn.Module:
    """The ``features_only`` backbone ``name`` for inputs of ``size`` (H, W): a list of maps, NCHW for ours, NHWC
    for timm's Swin. timm's Swin checks its input against ``img_size``; ours take any size as they are."""
    base = name.removesuffix(UNMASKED)
    kwargs = dict(img_size=tuple(size)) if base.startswith('swin') else {}
    model = timm.create_model(base, features_only=True, out_indices=OUT_INDICES, drop_path_rate=0.0, **kwargs)
    return Unmasked(model) if name.endswith(UNMASKED) else model


class SumOfMeans(nn.Module):
    """A scalar from the maps, saving nothing for backward itself (``fake_cuda.run`` reads one output tensor)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) NCHW. Returns: a 0-d tensor, the sum of the maps' means."""
        return sum(m.mean() for m in self.backbone(x))


def forward_seconds(names: Sequence[str], batch_size: int, size: Sequence[int], runs: int,
                    accelerate: bool) -> dict:
    """Per model: the median seconds of an eval forward and the maps' shapes. All models are built and warmed up
    first, then take turns, one forward each per round (the order rotated every round), so that a slow spell of a
    shared machine slows each alike."""
    built = {}
    for name in names:
        torch.manual_seed(0)
        built[name] = build(name, size).eval()
        if accelerate and not name.startswith('swin'):
            from models import cpu
            cpu.install(built[name])
    x = torch.randn(batch_size, 3, *size)
    times = {name: [] for name in names}
    with torch.inference_mode():
        shapes = {name: [tuple(m.shape) for m in model(x)] for name, model in built.items()}  # warm-up
        for r in range(runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                built[name](x)
                times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), shapes[name]) for name in names}


def saved_bytes(name: str, batch_size: int, size: Sequence[int], dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of one training forward on fake CUDA under ``dtype`` autocast."""
    with fake_cuda() as mode:
        model = to_fake_cuda(SumOfMeans(build(name, size)), mode)
        x = fake_input(mode, batch_size, 3, *size)
        # Run inside the mode (``fake_cuda.saved_bytes`` runs outside it): the padding masks of MG-SSAF (and the
        # masks of a dynamic-size Swin) are made in the forward with ``device=x.device``, which outside the mode
        # initialises the real CUDA. Where both work the bytes are the same.
        with mode:
            return run(model, x, dtype).saved_bytes


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='features_only backbones at detection size: forward time, '
                                                 'saved-for-backward bytes')
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--size', type=int, nargs=2, default=(800, 1344), metavar=('H', 'W'))
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--runs', type=int, default=7, help='timed forwards per model (after one warm-up)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--amp-dtype', default='float16', choices=('float16', 'bfloat16'))
    parser.add_argument('--plain', action='store_true', help='without the CPU accelerators (models/cpu)')
    parser.add_argument('--masking', action='store_true',
                        help=f'also time our models with the padding keys not masked (rows "{UNMASKED}")')
    args = parser.parse_args(argv)
    if args.masking:
        args.models += [n + UNMASKED for n in args.models if not n.startswith('swin')]

    torch.set_num_threads(args.threads)
    h, w = args.size
    print(f'{cpu_name()}, {args.threads} threads, torch {torch.__version__}, timm {timm.__version__}; '
          f'batch {args.batch_size} at {h}x{w}')
    print(f'forward: float32 eval, median of {args.runs}, CPU accelerators '
          f'{"off" if args.plain else "on (ours)"}; saved: one training forward on fake CUDA, '
          f'{args.amp_dtype} autocast')
    print(f"{'model':32s} {'forward s':>9s} {'img/s':>6s} {'saved GiB':>9s}  maps")
    forward = forward_seconds(list(args.models), args.batch_size, args.size, args.runs, not args.plain)
    for name in args.models:
        seconds, shapes = forward[name]
        saved = saved_bytes(name, args.batch_size, args.size, getattr(torch, args.amp_dtype))
        print(f'{name:32s} {seconds:9.2f} {args.batch_size / seconds:6.2f} {saved / GIB:9.2f}  '
              f'{" ".join("x".join(map(str, s[1:])) for s in shapes)}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
