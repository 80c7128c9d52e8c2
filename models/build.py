"""Model registry: ``MODEL.TYPE`` in the config names a builder registered here.

A backbone module registers one builder with ``@register_model_type('name', 'alias', ...)``; the builder
takes the frozen config and returns the model. Adding a backbone never touches ``main.py``.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_ALIASES: dict[str, str] = {}


def register_model_type(name: str, *aliases: str) -> Callable:
    """Decorator: register ``fn(config) -> nn.Module`` under ``name`` (and case-insensitive aliases)."""
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _BUILDERS[name] = fn
        for key in (name, *aliases):
            _ALIASES[key.lower()] = name
        return fn
    return wrap


def list_model_types() -> list[str]:
    return sorted(_BUILDERS)


def build_model(config) -> nn.Module:
    """Build the backbone named by ``config.MODEL.TYPE`` from its config section."""
    name = _ALIASES.get(str(config.MODEL.TYPE).lower())
    if name is None:
        raise ValueError(f"unknown MODEL.TYPE '{config.MODEL.TYPE}'; known types: {', '.join(list_model_types())}")
    return _BUILDERS[name](config)
