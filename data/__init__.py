"""Data: ImageNet-style folders (data/build.py), Swin's zips and tar shards (data/formats.py), one image as 8-bit RGB
(data/images.py), timm transforms and mixup (data/transforms.py), the device-side loader (data/device_loader.py,
data/loader.py), distributed samplers (data/samplers.py)."""
from .build import build_loader, check_data_folder, list_classes, list_images
from .images import DataError, UnreadableImageError, UnsupportedImageError, check_image_headers, to_rgb
from .loader import Data, release_workers
from .samples import count_images, describe_split
from .transforms import build_mixup, build_transform

__all__ = ['Data', 'DataError', 'UnreadableImageError', 'UnsupportedImageError', 'build_loader', 'build_mixup',
           'build_transform', 'check_data_folder', 'check_image_headers', 'count_images', 'describe_split',
           'list_classes', 'list_images', 'release_workers', 'to_rgb']
