"""Data: ImageNet-style folders, Swin's zips and tar shards (data/formats.py), timm transforms and mixup, the
device-side loader (data/device_loader.py), distributed samplers."""
from .build import (Data, DataError, UnreadableImageError, UnsupportedImageError, build_loader, build_mixup,
                    build_transform, check_data_folder, check_image_headers, count_images, describe_split,
                    list_classes, list_images, release_workers, to_rgb)

__all__ = ['Data', 'DataError', 'UnreadableImageError', 'UnsupportedImageError', 'build_loader', 'build_mixup',
           'build_transform', 'check_data_folder', 'check_image_headers', 'count_images', 'describe_split',
           'list_classes', 'list_images', 'release_workers', 'to_rgb']
