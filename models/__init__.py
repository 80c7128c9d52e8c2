"""Backbones. Importing this package registers every model type with ``build_model`` and with timm."""
from .build import build_model, list_model_types, register_model_type
from .cost import model_cost

from . import msg_transformer  # noqa: F401  (registers 'msg' and timm's msg_transformer_*)
from . import mg_ssaf  # noqa: F401  (registers 'mg_ssaf' and timm's mg_ssaf_*)

__all__ = ['build_model', 'list_model_types', 'register_model_type', 'model_cost']
