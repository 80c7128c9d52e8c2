"""The transforms of training and evaluation (timm's ``create_transform``; resize and centre crop), and mixup.

Training uses timm's ``create_transform`` (random resized crop, flip, RandAugment, colour jitter, random erasing) and
timm's ``Mixup``/CutMix; evaluation resizes by ``1/TEST.CROP_PCT`` and centre-crops (bicubic).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data import auto_augment as _timm_aa
from torchvision import transforms

from config import uses_mixup


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Posterize as Pillow < 11 did: keeping 0 bits gives a black image.

    timm's RandAugment ('...-inc1', the papers' recipe) asks for 0 bits at magnitude 10, which current Pillow
    rejects with a ValueError in the middle of an epoch. Older Pillow (the one the papers trained with) masked
    every bit away, so we reproduce that exactly instead of changing the augmentation distribution."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


for _name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
    _timm_aa.NAME_TO_OP[_name] = _posterize

def build_transform(config, is_train: bool) -> Callable:
    size = config.DATA.IMG_SIZE
    mean, std = tuple(config.DATA.MEAN), tuple(config.DATA.STD)
    if is_train:
        aa = config.AUG.AUTO_AUGMENT
        return create_transform(
            input_size=size,
            is_training=True,
            scale=tuple(config.AUG.SCALE),
            hflip=config.AUG.HFLIP,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=aa if aa and aa.lower() != 'none' else None,
            re_prob=config.AUG.REPROB,
            re_mode=config.AUG.REMODE,
            re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION,
            mean=mean,
            std=std,
        )
    interp = transforms.InterpolationMode(config.DATA.INTERPOLATION if config.DATA.INTERPOLATION != 'random' else 'bicubic')
    if config.TEST.CROP:
        resize = [transforms.Resize(int(math.floor(size / config.TEST.CROP_PCT)), interpolation=interp),
                  transforms.CenterCrop(size)]
    else:
        resize = [transforms.Resize((size, size), interpolation=interp)]
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(mean, std)])


def build_mixup(config) -> Optional[Mixup]:
    aug = config.AUG
    if not uses_mixup(config):
        return None
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)
