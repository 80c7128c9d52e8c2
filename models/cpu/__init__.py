"""CPU accelerators: faster implementations of the stock blocks, for eager float32 work on a CPU.

The models (``models/msg_transformer.py``, ``models/mg_ssaf.py``) are plain PyTorch: the reference, the GPU path, what
export, tracing and scripting take and what a researcher edits. This package holds other implementations of some of
their stock modules that compute the same function faster on a CPU (oneDNN GEMMs with fused epilogues, an MLP that
keeps no GELU output, cheaper gradients of large depthwise convs, ...), each op chosen per shape by measurement
(``kernels``).

``install(model)`` puts them on a built model, module by module; ``main.py``, ``predict.py`` and the benchmark call it
on CPU only, and a model from ``timm.create_model`` stays plain unless the user calls it. An accelerator is installed
on a module only if

* the module and the parts it reads (a block's ``attn`` and ``mlp``) are exactly the stock classes (a subclass or a
  swapped ``attn_layer`` / ``mlp_layer`` keeps its own forward, and ``install`` logs the module's name), and
* the source of every stock function it stands in for is the source it was written against (``Accelerator.pins``):
  an edit to one of them (in the file, or a subclass) leaves that module on its own forward.

At every call it runs only where ``ops.applies``: a plain CPU float32 tensor, eager, outside autocast, compile,
export, tracing, scripting and dispatch modes; and only while those stock functions are still the same objects (a
monkeypatched ``forward`` takes effect). Everywhere else the module's own forward runs.

The environment variable ``MSGSSAF_CPU_KERNELS`` (``kernels.policy``): ``auto`` (default, measure), ``fused``
(always the fast candidates) or ``plain`` (``install`` installs nothing).
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch.nn as nn

from . import kernels, ops

__all__ = ['Accelerator', 'install', 'uninstall', 'installed', 'summary', 'source_pin', 'ACCELERATORS']


def source_pin(fn: Callable) -> str:
    """A short hash of ``fn``'s source: what an accelerator pins of each stock function it stands in for."""
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Accelerator:
    """A faster implementation of ``cls.<method>`` on CPU.

    Attributes:
        cls: the stock class, matched exactly.
        method: the method it stands in for on instances ('forward', or a helper the stock forward calls).
        fast: ``fast(module, *args, **kwargs)``, the same function as the stock method.
        pins: ``{stock function: source_pin}`` of every function whose work ``fast`` does instead of calling it.
        parts: ``{attribute: stock class}`` of the submodules ``fast`` reads (matched exactly).
        applies: an extra condition on the module at call time (e.g. no attention dropout in training).
    """
    cls: type
    method: str
    fast: Callable[..., Any]
    pins: dict = field(hash=False)
    parts: dict = field(default_factory=dict, hash=False)
    applies: Optional[Callable[[nn.Module], bool]] = None

    def mismatch(self, module: nn.Module) -> Optional[str]:
        """Why this accelerator cannot stand in on ``module`` (None if it can)."""
        for name, stock in self.parts.items():
            part = getattr(module, name, None)
            if type(part) is not stock:
                return f'its {name} is {type(part).__name__}, not {stock.__name__}'
        for fn, pin in self.pins.items():
            try:
                now = source_pin(fn)
            except (OSError, TypeError):
                return f'the source of {fn.__qualname__} cannot be read'
            if now != pin:
                return f'{fn.__qualname__} differs from the code this accelerator computes'
        return None

    def still_stock(self, module: nn.Module) -> bool:
        """At call time: the stock functions and parts are still those checked by ``install``."""
        for fn in self.pins:
            owner = _owner(fn)
            if owner.__dict__.get(fn.__name__) is not fn:
                return False
        for name, stock in self.parts.items():
            part = module._modules.get(name)
            if type(part) is not stock or 'forward' in part.__dict__:
                return False
        return self.applies is None or self.applies(module)


def _owner(fn: Callable) -> type:
    return fn.__globals__[fn.__qualname__.split('.')[0]]


ACCELERATORS: list[Accelerator] = []


def _make_method(acc: Accelerator) -> Callable[..., Any]:
    def method(module: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        if ops.applies(x) and acc.still_stock(module):
            return acc.fast(module, x, *args, **kwargs)
        return getattr(type(module), acc.method)(module, x, *args, **kwargs)
    method.__name__ = method.__qualname__ = f'{acc.method}_cpu_accelerated'
    method.accelerator = acc  # type: ignore[attr-defined]
    return method


_METHODS: dict[Accelerator, Callable[..., Any]] = {}


def _load() -> None:
    """Register the accelerators of both models (their modules append to ``ACCELERATORS`` when first imported)."""
    from . import mg_ssaf, msg  # noqa: F401
    for acc in ACCELERATORS:
        if acc not in _METHODS:
            _METHODS[acc] = _make_method(acc)


def install(model: nn.Module, logger: Optional[logging.Logger] = None) -> list[str]:
    """Install the CPU accelerators on every stock module of ``model`` they fit (see the module docstring).

    Returns the names of the modules that got one; logs each module of a stock class, or of a subclass of one, that
    keeps its own forward, and why. Nothing is installed with ``MSGSSAF_CPU_KERNELS=plain`` or without oneDNN's
    fused linear. Raises ValueError for an unknown ``MSGSSAF_CPU_KERNELS``.
    """
    if kernels.policy() == 'plain' or not ops.ONEDNN_LINEAR:
        return []
    _load()
    done = []
    for name, module in model.named_modules():
        for acc in ACCELERATORS:
            if not isinstance(module, acc.cls):
                continue
            why = (f'it is {type(module).__name__}, a subclass of {acc.cls.__name__}' if type(module) is not acc.cls
                   else acc.mismatch(module))
            if why is not None:
                if logger is not None:
                    logger.info(f"CPU accelerators: '{name or type(module).__name__}' keeps its own "
                                f"{acc.method} ({why})")
                continue
            # An instance attribute (bound to the module, so copy.deepcopy rebinds it to the copy, as EMA needs).
            setattr(module, acc.method, types.MethodType(_METHODS[acc], module))
            done.append(name)
    return sorted(set(done))


def installed(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry an accelerator."""
    return sorted(name for name, m in model.named_modules()
                  if any(getattr(v, '__func__', None) in _METHODS.values() for v in m.__dict__.values()))


def uninstall(model: nn.Module) -> None:
    """Remove every accelerator from ``model``: each module runs its own methods again (e.g. before
    ``torch.jit.script``, which compiles a module's own code)."""
    for module in model.modules():
        for key in [k for k, v in module.__dict__.items() if getattr(v, '__func__', None) in _METHODS.values()]:
            del module.__dict__[key]


def summary() -> Optional[str]:
    """One line on the kernels the accelerators chose in this process (``kernels.summary``), or None."""
    return kernels.summary()
