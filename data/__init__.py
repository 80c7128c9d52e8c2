"""Data: ImageNet-style folders, timm transforms and mixup, distributed samplers."""
from .build import Data, DataError, build_loader, build_mixup, build_transform, check_data_folder

__all__ = ['Data', 'DataError', 'build_loader', 'build_mixup', 'build_transform', 'check_data_folder']
