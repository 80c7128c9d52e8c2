"""Classify image files or folders with a checkpoint and its config (or with an exported ONNX file).

    python predict.py --cfg configs/msg_demo.yaml --resume best.pth photo.jpg folder/ ...
    python predict.py --cfg configs/MG-SSAF/MG-SSAF-T.yaml --resume MG-SSAF-T.pth --opts DATA.IMG_SIZE 448 -- x.jpg
    python predict.py --cfg configs/msg_demo.yaml --onnx model.onnx --json folder/        # no PyTorch model

Images are read and transformed exactly as ``main.py --eval`` reads its validation set (``data.build_transform``:
resize to ``DATA.IMG_SIZE / TEST.CROP_PCT``, centre crop, normalise), at any size the model can be built for
(``--opts DATA.IMG_SIZE N``), and classified in batches of ``--batch-size`` (default ``DATA.BATCH_SIZE``) on
``--device`` (default: CUDA when available). For each image one line: the path and the top-5 classes with their
probabilities; ``--json``: one JSON object per line instead. Class names come from the checkpoint
(``ckpt['class_names']``, written by our training) or, with ``--onnx``, from the file's metadata (written by
``tools/export_onnx.py``; else from ``--resume`` if given); official checkpoints have none: indices are printed.

Folders are searched recursively (symbolic links followed, each folder and each file once, hidden entries and
non-image extensions skipped, the latter counted in a ``note:`` line), in sorted order. A file that cannot be read as
an image (a FIFO, socket or device named like one included: never opened), or a missing path, gets one line on
stderr and the others still run; the exit code is then 1. Config, checkpoint and usage errors are one ``error:``
line and exit code 2 before any image is read (``--debug`` shows tracebacks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Callable, Iterator, Optional

import torch
from PIL import UnidentifiedImageError

from checkpoint import CheckpointError, load_checkpoint_file
from config import ConfigError, add_opts_argument, get_config, shown
from data import DataError, build_transform
from data.images import DECODE_ERRORS, load_rgb, special_file_kind
from deploy import (META_CLASS_NAMES, META_PREPROCESS, build_inference_model, checkpoint_class_names, onnx_session,
                    preprocess_settings, run_session, session_metadata)
from distributed import resolve_device
from models import cpu

USER_ERRORS = (ConfigError, DataError, CheckpointError)
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # torchvision's
TOPK = 5


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                     usage='%(prog)s --cfg FILE (--resume CKPT | --onnx FILE) [options] [--] PATH ...')
    parser.add_argument('--cfg', required=True, metavar='FILE', help='config of the model (sizes, transform)')
    parser.add_argument('--resume', metavar='CKPT', help='checkpoint with the weights (ours or official)')
    parser.add_argument('--onnx', metavar='FILE', help='run this exported file in ONNX Runtime instead of PyTorch')
    add_opts_argument(parser, "config overrides, 'KEY VALUE' pairs (end the list with -- before the paths)")
    parser.add_argument('--device', help="'cpu', 'cuda' or 'cuda:N' (default: cuda if available)")
    parser.add_argument('--batch-size', type=int, help='images per forward pass (default: DATA.BATCH_SIZE)')
    parser.add_argument('--json', action='store_true', help='one JSON object per image instead of text lines')
    parser.add_argument('--debug', action='store_true', help='show Python tracebacks for user errors')
    parser.add_argument('paths', nargs='*', metavar='PATH', help='image files or folders')
    args = parser.parse_args(argv)
    if not args.paths:
        if args.opts:  # everything after --opts was taken as KEY VALUE pairs, the paths included
            parser.error(f'no PATH given: --opts took every word after it ({shown(args.opts)}); end the KEY VALUE '
                         f'pairs with -- before the paths: --opts KEY VALUE -- PATH ...')
        parser.error('no PATH given: name at least one image file or folder')
    if not args.resume and not args.onnx:
        parser.error('pass --resume CKPT (PyTorch) or --onnx FILE (ONNX Runtime)')
    if args.batch_size is not None and args.batch_size < 1:
        parser.error('--batch-size must be >= 1')
    return args


def find_images(paths: list[str], notes: Optional[list[str]] = None) -> tuple[list[str], list[str]]:
    """The image files named by ``paths`` (files as given, folders searched recursively in sorted order), each
    file once (by its resolved path, first occurrence kept), and one message per path that gave nothing.

    A folder reached twice (a symbolic link to a parent, a loop, two links to one folder) is searched once. Only
    regular files (and links to them) are images: a FIFO, socket or device named like one gets a message and is
    never opened (that can block forever). ``notes`` gets one line per folder with files of other extensions."""
    files, problems, seen_files, seen_dirs = [], [], set(), set()

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real not in seen_files:
            seen_files.add(real)
            files.append(path)

    for path in paths:
        if os.path.isfile(path):
            add(path)
            continue
        if not os.path.isdir(path):
            kind = special_file_kind(path)
            problems.append(f"skipping '{path}': no such file or folder" if kind == 'missing'
                            else f"skipping '{path}': it is {kind}, not an image file")
            continue
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen_dirs:  # given twice, or inside a folder given before: listed already
            continue
        found, ignored = [], Counter()
        unreadable = lambda e: problems.append(f"skipping '{e.filename}': {e.strerror}")  # noqa: E731
        for root, dirs, names in os.walk(path, onerror=unreadable, followlinks=True):
            st = os.stat(root)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirs[:] = []  # already searched (a loop or a second link): do not descend again
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith('.'))  # sorted: which link to a folder wins is fixed
            for n in names:
                if n.startswith('.'):
                    continue
                if not n.lower().endswith(IMAGE_EXTENSIONS):
                    ignored[os.path.splitext(n)[1].lower() or '(none)'] += 1
                    continue
                kind = special_file_kind(os.path.join(root, n))
                if kind is None:
                    found.append(os.path.join(root, n))
                else:
                    problems.append(f"skipping '{os.path.join(root, n)}': it is {kind}, not an image file")
        if ignored and notes is not None:
            kinds = ', '.join(f'{ext}: {k}' for ext, k in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0]))[:8])
            notes.append(f"note: '{path}': {sum(ignored.values())} files ignored for their extension ({kinds}; "
                         f"images are {', '.join(IMAGE_EXTENSIONS)})")
        if not found:
            problems.append(f"skipping '{path}': no image files in it (extensions {', '.join(IMAGE_EXTENSIONS)})")
        for f in sorted(found, key=lambda p: p.split(os.sep)):
            add(f)
    return files, problems


def load_batches(files: list[str], transform: Callable, batch_size: int,
                 on_error: Callable[[str], None]) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(paths, (B, 3, H, W) batch) of the readable files, in order; ``on_error`` gets one line per bad file."""
    paths, images = [], []
    for i, path in enumerate(files):
        try:
            images.append(transform(load_rgb(path)))
            paths.append(path)
        except UnidentifiedImageError:
            on_error(f"skipping '{path}': not an image (or in a format Pillow cannot read)")
        except DECODE_ERRORS as e:  # truncated or corrupt data; OSError also: removed or unreadable since found
            reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
            on_error(f"skipping '{path}': unreadable image ({type(e).__name__}: {reason})")
        if paths and (len(paths) == batch_size or i == len(files) - 1):
            yield paths, torch.stack(images)
            paths, images = [], []


def topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) probabilities (softmax in float32) and class indices, most likely first."""
    return logits.float().softmax(dim=-1).topk(min(k, logits.shape[-1]), dim=-1)


def format_text(path: str, probs: list[float], indices: list[int], names: Optional[list[str]]) -> str:
    return f'{path}: ' + ', '.join(f'{names[i] if names else i} ({p:.4f})' for p, i in zip(probs, indices))


def format_json(path: str, probs: list[float], indices: list[int], names: Optional[list[str]]) -> str:
    top = [{'index': i, 'name': names[i] if names else None, 'prob': p} for p, i in zip(probs, indices)]
    return json.dumps({'path': path, 'top5': top})


def _onnx_classifier(args: argparse.Namespace, config, device: torch.device):
    """ONNX Runtime in place of the PyTorch model: the file must take this config's input size (any, if exported
    with ``--dynamic-size``) and, when it records them, the same preprocessing; names from its metadata, else from
    ``--resume``."""
    session = onnx_session(args.onnx, device)
    meta = session_metadata(session)
    shape = session.get_inputs()[0].shape  # [batch, 3, H, W]; batch symbolic
    size = config.DATA.IMG_SIZE
    dynamic_size = len(shape) == 4 and all(isinstance(d, str) for d in shape[2:])  # symbolic H and W
    if len(shape) != 4 or (shape[2:] != [size, size] and not dynamic_size):
        raise ConfigError(f"'{args.onnx}' takes inputs of shape {shape}, this config gives (batch, 3, {size}, {size}); "
                          f"pass the config (and --opts) it was exported with")
    if META_PREPROCESS in meta:
        exported, ours = json.loads(meta[META_PREPROCESS]), preprocess_settings(config)
        differ = [k for k in ours if exported.get(k) != ours[k] and not (dynamic_size and k == 'img_size')]
        if differ:
            raise ConfigError(f"'{args.onnx}' was exported with other preprocessing: "
                              + ', '.join(f'{k} {exported.get(k)} (this config: {ours[k]})' for k in differ))
    num_classes = session.get_outputs()[0].shape[-1]
    if META_CLASS_NAMES in meta:
        names = json.loads(meta[META_CLASS_NAMES])
        if len(names) != num_classes:
            raise ConfigError(f"'{args.onnx}' names {len(names)} classes in its metadata but has {num_classes} outputs")
    elif args.resume:
        names = checkpoint_class_names(load_checkpoint_file(args.resume), args.resume, num_classes)
    else:
        names = None
    return (lambda x: run_session(session, x)), names


def run(args: argparse.Namespace) -> int:
    config = get_config(args)
    try:
        device = resolve_device(config.DEVICE)
    except RuntimeError as e:  # torch.device('nonsense')
        raise ConfigError(f'--device {config.DEVICE!r}: {e}') from None
    if args.onnx:
        classify, names = _onnx_classifier(args, config, device)
    else:
        model, names = build_inference_model(config, args.resume, device)
        if device.type == 'cpu':
            try:
                cpu.install(model)
            except ValueError as e:
                raise ConfigError(str(e)) from None

        def classify(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return model(x.to(device, non_blocking=True)).float().cpu()

    transform = build_transform(config, is_train=False)
    failures = 0

    def report(line: str) -> None:
        nonlocal failures
        failures += 1
        print(line, file=sys.stderr, flush=True)

    notes: list[str] = []
    files, problems = find_images(args.paths, notes)
    for line in notes:
        print(line, file=sys.stderr, flush=True)
    for line in problems:
        report(line)
    fmt = format_json if args.json else format_text
    for paths, batch in load_batches(files, transform, config.DATA.BATCH_SIZE, report):
        probs, indices = topk(classify(batch), TOPK)
        for path, p, i in zip(paths, probs.tolist(), indices.tolist()):
            print(fmt(path, p, i, names))
        sys.stdout.flush()
    return 1 if failures else 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr, flush=True)
        return 2
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly, as the docs of `signal` advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == '__main__':
    sys.exit(main())
