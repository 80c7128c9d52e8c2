"""Inference outside training: a model and its class names from a checkpoint, ONNX export, ONNX Runtime.

Shared by ``predict.py``, ``tools/export_onnx.py`` and ``benchmark.py --onnxruntime``, so that the three use one
checkpoint loader (``checkpoint.py``'s), one exporter and one way to run an ONNX file.

ONNX files written here take one NCHW float32 input named ``image`` of shape (batch, 3, H, W), H and W fixed at
export (``DATA.IMG_SIZE``) or, with ``dynamic_size``, any (the models pad inside), the batch dynamic, and return
``logits`` (batch, classes). They describe themselves
in their ``metadata_props``: ``class_names`` (JSON list, when the checkpoint had them), ``preprocess`` (JSON: the
eval transform's settings, which ``predict.py --onnx`` checks against its config), ``model_name`` and ``config``
(the YAML the model was built from).

The ONNX packages (onnx, onnxscript, onnxruntime) are optional (``requirements-onnx.txt``); they are imported
only when used, and a missing one is a one-line ``ConfigError``.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from checkpoint import CheckpointError, extract_state_dict, load_checkpoint_file, load_model_weights
from config import ConfigError
from models import build_model

ONNX_HINT = 'pip install -r requirements-onnx.txt'
INPUT_NAME, OUTPUT_NAME = 'image', 'logits'
META_CLASS_NAMES, META_PREPROCESS, META_MODEL_NAME, META_CONFIG = 'class_names', 'preprocess', 'model_name', 'config'
EXPORT_RTOL = 1e-5  # ONNX Runtime vs eager, max |a - b| / max |b| over the logits


class ExportError(RuntimeError):
    """The export failed, or its file does not compute what the eager model computes (one line, exit code 1)."""


def require(module: str) -> Any:
    """Import an optional dependency, or raise a one-line ConfigError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"this needs the optional package '{module}': {ONNX_HINT}") from None


def checkpoint_class_names(ckpt: dict, path: str, num_classes: int) -> Optional[list[str]]:
    """``ckpt['class_names']`` (our training checkpoints: the ImageFolder classes in label order), checked
    against the head; None for checkpoints without names (official ones), whose classes are indices."""
    names = ckpt.get('class_names')
    if names is None:
        return None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"'{path}': 'class_names' must be a list of strings, got {type(names).__name__}")
    if len(names) != num_classes:
        raise CheckpointError(f"'{path}' names {len(names)} classes but its model has {num_classes} outputs")
    return list(names)


def build_inference_model(config, path: str, device: torch.device = torch.device('cpu'),
                          logger=None) -> tuple[nn.Module, Optional[list[str]]]:
    """The model of ``config`` with the weights of checkpoint ``path``, in eval mode on ``device``, and the
    checkpoint's class names (None if it has none). Bad config or checkpoint: ConfigError / CheckpointError."""
    ckpt = load_checkpoint_file(path)  # before building: a missing file is reported without the build's cost
    try:
        model = build_model(config)
    except ValueError as e:
        raise ConfigError(f'{config.MODEL.TYPE} cannot be built from this config: {e}') from None
    load_model_weights(model, extract_state_dict(ckpt, path), path, logger)
    names = checkpoint_class_names(ckpt, path, config.MODEL.NUM_CLASSES)
    return model.eval().to(device), names


def preprocess_settings(config) -> dict:
    """What the eval transform (``data.build_transform(config, False)``) depends on, as plain data."""
    return {'img_size': int(config.DATA.IMG_SIZE), 'interpolation': config.DATA.INTERPOLATION,
            'crop': bool(config.TEST.CROP), 'crop_pct': float(config.TEST.CROP_PCT),
            'mean': [float(v) for v in config.DATA.MEAN], 'std': [float(v) for v in config.DATA.STD]}


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, metadata: Optional[dict[str, str]] = None,
                dynamic_size: bool = False) -> None:
    """Write ``model`` (eval mode, CPU) as ONNX to ``path`` with a dynamic batch dimension (and dynamic H and W if
    ``dynamic_size``: then trace at an example of at least two windows per side in every stage and batch >= 2, or
    torch.export pins the sizes of one, ``dynamic_example``).

    ``torch.onnx.export(dynamo=True)``: torch.export traces the model with the batch as a symbol, so a size
    baked into the graph is an export error instead of a file that fails later (the TorchScript exporter
    records whatever sizes the example had). Weights are stored inside the file (models here are far below
    protobuf's 2 GB limit). Raises ExportError on failure; ``path`` may then hold a partial file."""
    require('onnx')
    require('onnxscript')
    batch = torch.export.Dim('batch', min=1)
    dims = {0: batch, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if dynamic_size else {0: batch}
    try:
        # SDPA traced as its math composite: the CPU flash kernel's output layout would be baked into the views
        # after it, which the exporter's decomposition of that kernel does not keep.
        with sdpa_kernel(SDPBackend.MATH):
            program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                                        output_names=[OUTPUT_NAME], dynamic_shapes=(dims,))
        program.model.metadata_props.update(metadata or {})
        program.save(path, external_data=False)
    except Exception as e:  # noqa: BLE001 - the exporter fails in many ways; reported as one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ExportError(f'torch.onnx.export failed: {type(e).__name__}: {first}') from e


def dynamic_example(img_size: int, batch_size: int) -> torch.Tensor:
    """The input to trace a model with dynamic H and W at: larger than ``img_size`` and not square (torch.export
    specializes a size it sees as 1 or as equal to another), batch >= 2."""
    return torch.randn(max(2, batch_size), 3, 2 * img_size + 1, 3 * img_size + 1)


def onnx_session(path: str, device: torch.device = torch.device('cpu'), threads: Optional[int] = None):
    """An ONNX Runtime session for ``path`` on the CPU or (with onnxruntime-gpu) CUDA; ``threads`` sets the
    intra-op thread count (default: ONNX Runtime's, one per physical core)."""
    ort = require('onnxruntime')
    if not os.path.isfile(path):
        raise ConfigError(f"ONNX file not found: '{path}'")
    if device.type == 'cuda':
        if 'CUDAExecutionProvider' not in ort.get_available_providers():
            raise ConfigError('this onnxruntime has no CUDA provider (pip install onnxruntime-gpu), use --device cpu')
        providers: list = [('CUDAExecutionProvider', {'device_id': device.index or 0}), 'CPUExecutionProvider']
    else:
        providers = ['CPUExecutionProvider']
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"ONNX Runtime cannot load '{path}': {first}") from None


def session_metadata(session) -> dict[str, str]:
    """The file's ``metadata_props`` (empty for files exported elsewhere without them)."""
    return dict(session.get_modelmeta().custom_metadata_map)


def run_session(session, x: torch.Tensor) -> torch.Tensor:
    """Logits of the (B, 3, H, W) float32 batch ``x`` (a CPU tensor) through ``session``, as a CPU tensor."""
    name = session.get_inputs()[0].name
    out = session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})[0]
    return torch.from_numpy(out)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|: error relative to the logits' scale (not per element, which blows up where a
    logit is near 0)."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_onnx_against_eager(model: nn.Module, path: str, img_size: int, batch_sizes: Sequence[int],
                             rtol: float = EXPORT_RTOL, seed: int = 0,
                             other_sizes: Sequence[tuple[int, int]] = ()) -> list[tuple[str, float]]:
    """Run ``path`` in ONNX Runtime at each batch size (``img_size`` square), then at batch 1 at each of
    ``other_sizes`` (H, W), and compare with ``model`` (eager, CPU) on the same random batch; returns (what,
    relative error) per run. ExportError if it does not load, run, or match."""
    try:
        session = onnx_session(path)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    gen = torch.Generator().manual_seed(seed)
    errors = []
    runs = [(f'batch {b}', b, img_size, img_size) for b in batch_sizes]
    runs += [(f'{h}x{w}', 1, h, w) for h, w in other_sizes]
    for what, b, h, w in runs:
        x = torch.randn(b, 3, h, w, generator=gen)
        with torch.inference_mode():
            ref = model(x)
        try:
            out = run_session(session, x)
        except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f'ONNX Runtime fails on the exported file at {what}: {first}') from None
        if out.shape != ref.shape:
            raise ExportError(f'ONNX Runtime returns {tuple(out.shape)} at {what}, eager {tuple(ref.shape)}')
        err = relative_error(out, ref)
        if not err <= rtol:  # also catches NaN
            raise ExportError(f'ONNX Runtime differs from eager by {err:.2e} (relative) at {what}, more than '
                              f'the tolerance {rtol:.0e}')
        errors.append((what, err))
    return errors


def onnx_metadata(config, class_names: Optional[list[str]]) -> dict[str, str]:
    """The ``metadata_props`` written into an exported file (see the module docstring)."""
    meta = {META_PREPROCESS: json.dumps(preprocess_settings(config)), META_MODEL_NAME: config.MODEL.NAME,
            META_CONFIG: config.dump()}
    if class_names is not None:
        meta[META_CLASS_NAMES] = json.dumps(class_names)
    return meta
