"""Data: ImageNet-style folders, timm transforms and mixup, distributed samplers."""
from .build import DataError, build_loader, build_mixup, build_transform, check_data_folder

__all__ = ['DataError', 'build_loader', 'build_mixup', 'build_transform', 'check_data_folder']
