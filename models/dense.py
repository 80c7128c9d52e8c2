"""Dense prediction on the backbones: a feature-pyramid backbone for torchvision's detectors (Faster / Mask R-CNN)
and a small semantic segmentation head on it (docs/dense.md).

The timm model with ``features_only=True`` gives the stage maps, NCHW, at strides 4, 8, 16, 32 (one per entry of
``out_indices``); torchvision's ``FeaturePyramidNetwork`` turns them into ``out_channels``-wide maps keyed
'0', '1', ... plus 'pool' (``LastLevelMaxPool``, stride 64), which is what the detectors' default anchor generator
and RoI pooling expect.

torchvision's own ``BackboneWithFPN`` cannot wrap these models: its ``IntermediateLayerGetter`` runs the model's
children one after another in registration order and returns some of their outputs, while MSG-Transformer and
MG-SSAF compute their stage maps inside ``forward_intermediates`` (MSG-Transformer: the patch tokens of windows that
also carry MSG tokens, reassembled into a map). timm's ``features_only`` wrapper calls ``forward_intermediates``.

Importing this module imports ``models``, which registers the backbones with timm.
"""
from collections import OrderedDict
from typing import Any, Dict, Optional, Sequence

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

import models  # noqa: F401  (registers msg_transformer_* and mg_ssaf_* with timm)


class TimmFPNBackbone(nn.Module):
    """``body`` (timm ``features_only``) followed by ``fpn``; ``out_channels`` as torchvision's detectors read it.

    Args:
        name: a timm model name, e.g. 'msg_transformer_tiny' or 'mg_ssaf_tiny'.
        out_channels: channels of every pyramid level.
        out_indices: the stages fed to the pyramid.
        extra_blocks: levels added after the last one (torchvision's detectors: ``LastLevelMaxPool()``, 'pool');
            None for none.
        **model_kwargs: passed to ``timm.create_model`` (``pretrained``, ``drop_path_rate``, ``depths``, ...).
    """

    def __init__(
            self,
            name: str,
            out_channels: int = 256,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            extra_blocks: Optional[ExtraFPNBlock] = None,
            **model_kwargs: Any,
    ) -> None:
        super().__init__()
        self.body = timm.create_model(name, features_only=True, out_indices=tuple(out_indices), **model_kwargs)
        self.fpn = FeaturePyramidNetwork(
            in_channels_list=self.body.feature_info.channels(),
            out_channels=out_channels,
            extra_blocks=extra_blocks,
        )
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Args: x: (B, 3, H, W) NCHW images (padded by the detector's transform).
        Returns: {'0': (B, out_channels, H/4, W/4), ..., '3': (..., H/32, W/32)} and the extra blocks' levels
        ('pool': (..., H/64, W/64)), NCHW, sides rounded up (for the default ``out_indices``)."""
        maps = self.body(x)  # [B, C_i, H_i, W_i] per stage, NCHW
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


def timm_fpn_backbone(name: str, out_channels: int = 256, **kwargs: Any) -> TimmFPNBackbone:
    """A detection backbone, levels '0'-'3' and 'pool' as torchvision's ``resnet_fpn_backbone``:
    ``torchvision.models.detection.MaskRCNN(timm_fpn_backbone('mg_ssaf_tiny'), num_classes=...)``.
    See ``TimmFPNBackbone`` for the arguments."""
    kwargs.setdefault('extra_blocks', LastLevelMaxPool())
    return TimmFPNBackbone(name, out_channels=out_channels, **kwargs)


class SemanticFPN(nn.Module):
    """Semantic segmentation with a feature pyramid: Panoptic FPN's semantic branch, shortened (Kirillov et al.,
    CVPR 2019): each level goes through a 3x3 conv, is upsampled to the finest level (stride 4) and summed; a 1x1
    conv gives class scores, upsampled bilinearly to the input size.

    Args:
        backbone: a ``TimmFPNBackbone`` (its levels '0', '1', ...; extra levels such as 'pool' are not used).
        num_classes: classes scored per pixel (background included).
        head_channels: channels of the per-level convs.
    """

    def __init__(self, backbone: TimmFPNBackbone, num_classes: int, head_channels: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        num_levels = len(backbone.body.feature_info.channels())
        self.level_convs = nn.ModuleList(nn.Sequential(
            nn.Conv2d(backbone.out_channels, head_channels, 3, padding=1, bias=False),
            nn.GroupNorm(min(32, head_channels), head_channels),
            nn.ReLU(inplace=True),
        ) for _ in range(num_levels))
        self.classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: (B, 3, H, W) NCHW. Returns: (B, num_classes, H, W) logits, NCHW."""
        levels = self.backbone(x)
        finest = None
        for i, conv in enumerate(self.level_convs):
            y = conv(levels[str(i)])  # B, head_channels, H_i, W_i
            if finest is None:
                finest = y
            else:
                finest = finest + F.interpolate(y, size=finest.shape[-2:], mode='bilinear', align_corners=False)
        return F.interpolate(self.classifier(finest), size=x.shape[-2:], mode='bilinear', align_corners=False)
