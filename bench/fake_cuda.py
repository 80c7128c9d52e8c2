"""The models on fake CUDA tensors: what a GPU would run, checked and measured on a machine without one.

PyTorch's ``FakeTensorMode`` makes tensors that carry a device, shape, dtype and strides but no data; operations on
them follow CUDA's autocast rules and device checks. A model moved onto fake CUDA tensors and run there shows, with no
GPU and in seconds:

* a CPU tensor meeting a CUDA one (an error, as on a GPU);
* a host synchronisation in the forward: ``.item()``, ``.tolist()`` or ``bool(t)`` of a fake tensor raises;
* the dtype of every output under autocast (``Report.dtypes``: the logits and each attention's output);
* the custom ``autograd.Function`` nodes of the graph (``Report.custom_functions``: the GPU path must be plain ops);
* the bytes of the tensors the graph saves for backward (``Report.saved_bytes``: a training step's activation
  memory), each storage counted once, parameters not counted (their autocast copies are).

``F.scaled_dot_product_attention`` takes its math path on fake tensors (the kernel choice reads the device); here it
runs the memory-efficient kernel's op instead, which a GPU would pick for these shapes (flash saves the same tensors
where it applies), so that the saved bytes are the GPU's.

    python bench/fake_cuda.py --cfg configs/msg_tiny_p4_win7_224.yaml --official-msg ../MSG-Transformer
        [--batch-size 32] [--amp-dtype float16]      # saved-for-backward bytes, ours beside the official's

Backward does not run on fake CUDA (``FakeTensorMode`` has no autograd engine for it); ``tests/test_fake_cuda.py``
covers the training step's other pieces with direct calls.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: config and models come from the repository root

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

GIB = 2 ** 30


@dataclass
class Report:
    """What one forward on fake CUDA showed."""
    output_dtype: torch.dtype
    saved_bytes: int
    custom_functions: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)   # module name -> output dtype (attention modules)


def _efficient_sdpa(real):
    """``F.scaled_dot_product_attention`` that runs the memory-efficient kernel's op on CUDA tensors."""
    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != 'cuda' or is_causal or enable_gqa:
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        bias = None if attn_mask is None else attn_mask.to(q.dtype).expand(*q.shape[:-1], k.shape[-2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, False, scale=scale)[0]
    return sdpa


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A ``FakeTensorMode`` in which CUDA tensors and CUDA autocast (as on a GPU with bfloat16) work without a
    driver. Make tensors inside the
    mode (``to_fake_cuda``); run the model outside it, on the fake tensors, so that the model takes the code path it
    takes on a GPU (inside a dispatch mode code may notice it)."""
    import torch.cuda.amp.common as amp_common
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    with mock.patch.object(amp_common, 'amp_definitely_not_available', lambda: False), \
            mock.patch.object(torch.cuda, 'is_bf16_supported', lambda *a, **k: True), \
            mock.patch.object(F, 'scaled_dot_product_attention', _efficient_sdpa(F.scaled_dot_product_attention)):
        yield mode


def to_fake_cuda(module: nn.Module, mode: FakeTensorMode) -> nn.Module:
    """Replace every parameter and buffer of ``module`` by a fake CUDA tensor of the same shape, dtype and strides
    (in place; ``module.to('cuda')`` fails without a driver)."""
    fakes = []
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                fakes.append((m, name, True, mode.from_tensor(p.detach()), p.requires_grad))
        for name, b in m._buffers.items():
            if b is not None:
                fakes.append((m, name, False, mode.from_tensor(b), False))
    with mode:
        for m, name, is_param, fake, requires_grad in fakes:
            fake = fake.to('cuda:0')
            if is_param:
                m._parameters[name] = nn.Parameter(fake, requires_grad=requires_grad)
            else:
                m._buffers[name] = fake
    return module


def fake_input(mode: FakeTensorMode, *shape: int) -> torch.Tensor:
    with mode:
        return torch.empty(*shape, device='cuda:0')


def _custom_functions(root: Optional[torch.autograd.graph.Node]) -> list[str]:
    """Names of the custom ``autograd.Function`` nodes reachable from ``root``."""
    found, seen, stack = set(), set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            found.add(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return sorted(found)


def run(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, train: bool = True,
        watch: tuple[type, ...] = ()) -> Report:
    """One forward of ``model`` (already on fake CUDA) on ``x`` under CUDA autocast to ``dtype``.

    ``watch``: module classes whose outputs' dtypes go into ``Report.dtypes`` (e.g. the attentions)."""
    model.train(train)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in seen and storage._cdata not in param_storages:
            seen.add(storage._cdata)
            saved[0] += storage.nbytes()
        return t

    dtypes: dict[str, torch.dtype] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, name=name: dtypes.__setitem__(name, out.dtype))
             for name, m in model.named_modules() if watch and isinstance(m, watch)]
    try:
        with torch.set_grad_enabled(train), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast('cuda', dtype=dtype):
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return Report(output_dtype=out.dtype, saved_bytes=saved[0], custom_functions=_custom_functions(out.grad_fn),
                  dtypes=dtypes)


def saved_bytes(build, batch_size: int, img_size: int, dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of a training forward of ``build()``'s model at ``batch_size`` on fake CUDA."""
    with fake_cuda() as mode:
        model = to_fake_cuda(build(), mode)
        return run(model, fake_input(mode, batch_size, 3, img_size, img_size), dtype).saved_bytes


def saved_bytes_table(cfgs: list[str], official_msg: str = '', official_mgssaf: str = '', batch_size: int = 32,
                      amp_dtype: str = 'float16') -> list[str]:
    """Lines of a table: each config's saved-for-backward bytes at ``batch_size``, beside its official model's
    (from a checkout, when given)."""
    from bench.official import official_model
    from config import load_config_file
    from models import build_model
    dtype = getattr(torch, amp_dtype)
    lines = [f'saved-for-backward bytes of one training forward on fake CUDA, batch {batch_size}, {amp_dtype} '
             f'autocast', f"{'model':24s} {'ours GiB':>9s} {'official GiB':>13s} {'ratio':>6s}"]
    for path in cfgs:
        cfg = load_config_file(path, ['MODEL.DROP_PATH_RATE', '0.0'])
        size = cfg.DATA.IMG_SIZE
        ours = saved_bytes(lambda: build_model(cfg), batch_size, size, dtype)
        root = official_msg if cfg.MODEL.TYPE == 'msg' else official_mgssaf
        off = saved_bytes(lambda: official_model(cfg, root), batch_size, size, dtype) if root else None
        line = f'{cfg.MODEL.NAME:24s} {ours / GIB:9.3f}'
        if off:
            line += f' {off / GIB:13.3f} {ours / off:5.2f}x'
        lines.append(line)
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description='saved-for-backward bytes on fake CUDA, ours beside the official')
    parser.add_argument('--cfg', nargs='+', required=True, help='YAML configs of our models')
    parser.add_argument('--official-msg', default='', metavar='DIR', help='a checkout of hustvl/MSG-Transformer')
    parser.add_argument('--official-mgssaf', default='', metavar='DIR', help='a checkout of shuaiyang11/MG-SSAF')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--amp-dtype', choices=['float16', 'bfloat16'], default='float16')
    args = parser.parse_args(argv)
    for line in saved_bytes_table(args.cfg, args.official_msg, args.official_mgssaf, args.batch_size, args.amp_dtype):
        print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
