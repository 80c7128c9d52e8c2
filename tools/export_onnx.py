"""Export a checkpoint to ONNX with a dynamic batch, and prove the file computes what the eager model does.

    python tools/export_onnx.py --cfg configs/msg_demo.yaml --resume best.pth model.onnx \
        [--opts DATA.IMG_SIZE 128] [--batch-size 2] [--dynamic-size] [--rtol 1e-5] [--debug]

With ``--dynamic-size`` the height and width are dynamic too (detection and segmentation inputs): the model is traced
at a larger, non-square example (``deploy.dynamic_example``) and checked at DATA.IMG_SIZE and at two other sizes.

The model is traced at ``--batch-size`` (the batch stays a symbol: ``deploy.export_onnx``), then the file is run
in ONNX Runtime at batch 1 and at ``--batch-size`` (2 if that is 1) and compared with the eager model on the
same input (max |ONNX Runtime - eager| / max |eager| <= ``--rtol``). Only then is the file renamed to ``OUT``:
a failed export or check exits with code 1 and leaves no file at ``OUT`` (an older one there stays as it was).
Config and checkpoint errors exit with code 2. The file carries the class names and the preprocessing in its
metadata for ``predict.py --onnx`` (``deploy`` module docstring). Needs ``requirements-onnx.txt``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import CheckpointError  # noqa: E402
from config import ConfigError, add_opts_argument, load_config_file, shown  # noqa: E402
from deploy import (EXPORT_RTOL, ExportError, build_inference_model, check_onnx_against_eager,  # noqa: E402
                    dynamic_example, export_onnx, onnx_metadata, require)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--cfg', required=True, metavar='FILE', help='config of the model')
    parser.add_argument('--resume', required=True, metavar='CKPT', help='checkpoint to export (ours or official)')
    add_opts_argument(parser, "config overrides, 'KEY VALUE' pairs (end the list with -- before OUT)")
    parser.add_argument('--batch-size', type=int, default=2, help='batch the model is traced at (default 2)')
    parser.add_argument('--dynamic-size', action='store_true',
                        help='dynamic height and width too (checked at DATA.IMG_SIZE and two other sizes)')
    parser.add_argument('--rtol', type=float, default=EXPORT_RTOL,
                        help=f'largest accepted relative error of ONNX Runtime vs eager (default {EXPORT_RTOL:.0e})')
    parser.add_argument('--debug', action='store_true', help='show Python tracebacks')
    parser.add_argument('out', help='the .onnx file to write')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    if not (math.isfinite(args.rtol) and args.rtol > 0):
        parser.error(f'--rtol must be a number > 0, got {args.rtol}')
    return args


def check_output(out: str, inputs: dict[str, str]) -> None:
    """Refuse, before the export, an OUT that is not a new or old .onnx file in a writable folder: a folder, an
    input of this command (``inputs``: flag -> path), a checkpoint, another extension."""
    if os.path.isdir(out):
        raise ConfigError(f"OUT '{out}' is a folder; give the file to write, e.g. '{os.path.join(out, 'model.onnx')}'")
    for flag, path in inputs.items():
        if path and os.path.exists(path) and os.path.exists(out) and os.path.samefile(path, out):
            raise ConfigError(f"OUT '{out}' is the file given with {flag}: an input is never written over; give "
                              f"another file name")
    if not out.lower().endswith('.onnx'):
        raise ConfigError(f"OUT {shown(out)} must end in .onnx (the file written); a checkpoint or other file is "
                          f"never replaced")
    if os.path.isfile(out):
        with open(out, 'rb') as f:
            head = f.read(4)
        if head[:4] == b'PK\x03\x04' or head[:1] == b'\x80':
            raise ConfigError(f"OUT '{out}' is a PyTorch checkpoint (named .onnx): it is never written over; give "
                              f"another file name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError(f"output folder '{folder}' does not exist")
    probe = os.path.join(folder, f'.write-test-{os.getpid()}')
    try:
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to the folder '{folder}' ({e.strerror}); choose another OUT") from None


def export(args: argparse.Namespace) -> str:
    """Export, check, rename into place; returns the success line."""
    check_output(args.out, {'--resume': args.resume, '--cfg': args.cfg})
    for module in ('onnx', 'onnxscript', 'onnxruntime'):  # all three, before any work
        require(module)
    config = load_config_file(args.cfg, args.opts)
    torch.manual_seed(0)
    model, class_names = build_inference_model(config, args.resume)
    size = config.DATA.IMG_SIZE
    sizes = sorted({1, max(2, args.batch_size)})
    tmp = f'{os.path.abspath(args.out)}.tmp.{os.getpid()}'
    try:
        if args.dynamic_size:
            example = dynamic_example(size, args.batch_size)
            others = [(size + size // 2 + 3, 2 * size - 5), (size - size // 4 + 1, size + 7)]
        else:
            example, others = torch.randn(args.batch_size, 3, size, size), []
        export_onnx(model, example, tmp, onnx_metadata(config, class_names), dynamic_size=args.dynamic_size)
        errors = check_onnx_against_eager(model, tmp, size, sizes, rtol=args.rtol, other_sizes=others)
        os.replace(tmp, args.out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    checked = ', '.join(f'{err:.1e} at {what}' for what, err in errors)
    names = f'{len(class_names)} class names' if class_names else 'no class names (indices)'
    shape = 'dynamic batch, height and width' if args.dynamic_size else f'{size}x{size}, dynamic batch'
    return (f"wrote {args.out} ({config.MODEL.NAME}, {shape}, {names}): ONNX Runtime vs eager "
            f"max relative error {checked} (tolerance {args.rtol:.0e})")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        print(export(args), flush=True)
        return 0
    except (ConfigError, CheckpointError) as e:
        if args.debug:
            raise
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    except ExportError as e:
        if args.debug:
            raise
        print(f'error: {e}; {args.out} was not written', file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # the folder became unwritable, or the disk filled, during the export
        if args.debug:
            raise
        print(f'error: could not write {args.out}: {e.strerror or e}; it was not written', file=sys.stderr, flush=True)
        return 1


if __name__ == '__main__':
    sys.exit(main())
