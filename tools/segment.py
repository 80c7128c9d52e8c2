"""A small real dense-prediction run on CPU: semantic segmentation of synthetic scenes with a known answer.

Each scene is a textured background with a few textured shapes on it (ellipses, rectangles, triangles), drawn with
numpy and PIL from a seed; a shape's class decides its texture (stripes of one orientation, a checkerboard, dots)
and its hue band, its shape and size are random, shapes overlap, and the label map is drawn with the image, so the
answer is exact. The model is ``models.dense.SemanticFPN`` on a timm backbone (``features_only``) trained from
scratch with AdamW; the script prints the loss per epoch and the validation mIoU (per-class IoU from a confusion
matrix, averaged over the classes present in the ground truth or the prediction).

    python tools/segment.py --model msg_transformer_tiny --size 320 320 --depths 1 1 1 1 --seed 0
"""
from __future__ import annotations

import argparse
import colorsys
import os
import sys
import time
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.nn import functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.dense import SemanticFPN, TimmFPNBackbone  # noqa: E402

# Class 0 is the background; class c >= 1 has texture TEXTURES[c - 1] and hue band c - 1 of NUM_SHAPE_CLASSES.
TEXTURES = ('horizontal stripes', 'vertical stripes', 'checkerboard', 'dots')
NUM_CLASSES = len(TEXTURES) + 1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as the backbones' data config


def texture(kind: str, height: int, width: int, period: int, phase: Tuple[int, int]) -> np.ndarray:
    """A binary pattern, (height, width) bool: True on the pattern's ink."""
    rows = np.arange(height)[:, None] + phase[0]
    cols = np.arange(width)[None, :] + phase[1]
    half = period // 2
    if kind == 'horizontal stripes':
        return np.broadcast_to(rows % period < half, (height, width))
    if kind == 'vertical stripes':
        return np.broadcast_to(cols % period < half, (height, width))
    if kind == 'checkerboard':
        return (rows // half + cols // half) % 2 == 0
    if kind == 'dots':
        return ((rows % period - half) ** 2 + (cols % period - half) ** 2) <= (period / 4) ** 2
    raise ValueError(f'unknown texture {kind!r}; known: {TEXTURES}')


def make_scene(rng: np.random.Generator, height: int, width: int, max_shapes: int = 5) -> Tuple[np.ndarray, np.ndarray]:
    """One scene. Returns: image (height, width, 3) uint8 RGB, label map (height, width) int64 in [0, NUM_CLASSES)."""
    # Background: low-saturation blotches (coarse noise, upsampled) with pixel noise on top.
    coarse = rng.uniform(60, 200, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    background = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.Resampling.BILINEAR),
                            dtype=np.float32)
    background = background.mean(2, keepdims=True) * 0.7 + background * 0.3  # mostly grey
    image = background + rng.normal(0, 12, size=(height, width, 3))
    labels = np.zeros((height, width), dtype=np.int64)
    side = min(height, width)
    for _ in range(rng.integers(2, max_shapes + 1)):
        cls = int(rng.integers(1, NUM_CLASSES))
        h, w = (int(v) for v in rng.integers(side // 8, side // 2, size=2))
        top, left = int(rng.integers(-h // 4, height - 3 * h // 4)), int(rng.integers(-w // 4, width - 3 * w // 4))
        mask_img = Image.new('L', (width, height), 0)
        draw = ImageDraw.Draw(mask_img)
        shape = rng.integers(3)
        if shape == 0:
            draw.ellipse((left, top, left + w, top + h), fill=1)
        elif shape == 1:
            draw.rectangle((left, top, left + w, top + h), fill=1)
        else:
            draw.polygon([(left + w // 2, top), (left, top + h), (left + w, top + h)], fill=1)
        mask = np.asarray(mask_img, dtype=bool)
        hue = (cls - 1 + rng.uniform(0.1, 0.9)) / (NUM_CLASSES - 1)
        ink = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.7, 1.0))) * 255
        paper = ink * rng.uniform(0.2, 0.5)
        period = int(rng.integers(6, 14))
        pattern = texture(TEXTURES[cls - 1], height, width, period, tuple(int(p) for p in rng.integers(period, size=2)))
        fill = np.where(pattern[..., None], ink, paper) + rng.normal(0, 8, size=(height, width, 3))
        image[mask] = fill[mask]
        labels[mask] = cls
    return np.clip(image, 0, 255).astype(np.uint8), labels


class SyntheticScenes(torch.utils.data.Dataset):
    """``length`` scenes, scene i drawn from seed (``seed``, i): the same scenes in every run and worker.
    Items: image (3, H, W) float32 NCHW-ready, normalised; labels (H, W) int64."""

    def __init__(self, length: int, size: Tuple[int, int], seed: int) -> None:
        self.length, self.size, self.seed = length, size, seed
        self.mean = torch.tensor(MEAN).view(3, 1, 1) * 255
        self.std = torch.tensor(STD).view(3, 1, 1) * 255

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        image, labels = make_scene(np.random.default_rng((self.seed, index)), *self.size)
        image = torch.from_numpy(image).permute(2, 0, 1).float()  # 3, H, W
        return (image - self.mean) / self.std, torch.from_numpy(labels)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Args: pred, target: integer label maps of one shape. Returns: (num_classes, num_classes) int64 counts,
    rows the true class, columns the predicted one."""
    index = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(index, minlength=num_classes ** 2).view(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> Dict[str, object]:
    """Per-class IoU = TP / (TP + FP + FN), and mIoU = its mean over the classes present (in the ground truth or
    the prediction: TP + FP + FN > 0); a class in neither has no IoU (NaN) and is left out of the mean."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float('nan')))
    present = union > 0
    return {'iou': iou.tolist(), 'miou': float(iou[present].mean()) if present.any() else float('nan')}


def build_model(name: str, depths: Sequence[int] = (), drop_path_rate: float = 0.0) -> SemanticFPN:
    """The backbone ``name`` (its variant's depths unless ``depths``) with a 64-channel pyramid and head."""
    kwargs = dict(depths=tuple(depths)) if depths else {}
    backbone = TimmFPNBackbone(name, out_channels=64, drop_path_rate=drop_path_rate, **kwargs)
    return SemanticFPN(backbone, NUM_CLASSES, head_channels=64)


def train_one_epoch(model: torch.nn.Module, loader, optimizer, max_steps: int) -> float:
    """Cross-entropy over the pixels; at most ``max_steps`` batches. Returns the mean loss."""
    model.train()
    total, steps = 0.0, 0
    for images, labels in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        if steps == max_steps:
            break
    return total / max(steps, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> Dict[str, object]:
    """The confusion matrix over the whole loader and its IoUs (``iou_from_confusion``)."""
    model.eval()
    confusion = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    for images, labels in loader:
        confusion += confusion_matrix(model(images).argmax(1), labels, NUM_CLASSES)
    return iou_from_confusion(confusion)


def main(argv: Sequence[str] | None = None) -> Dict[str, object]:
    """Train and evaluate. Returns: ``iou`` (per class), ``miou`` and ``train_loss`` (per epoch)."""
    parser = argparse.ArgumentParser(description='train a segmentation head on synthetic textured scenes (CPU)')
    parser.add_argument('--model', default='msg_transformer_tiny', help='a timm name, e.g. mg_ssaf_tiny')
    parser.add_argument('--depths', type=int, nargs='+', default=(), help="blocks per stage (default: the variant's)")
    parser.add_argument('--size', type=int, nargs=2, default=(320, 320), metavar=('H', 'W'))
    parser.add_argument('--train-images', type=int, default=96)
    parser.add_argument('--val-images', type=int, default=64)
    parser.add_argument('--epochs', type=int, default=2)
    parser.add_argument('--max-steps', type=int, default=0, help='stop each epoch after this many batches (0: all)')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0, help="torch's CPU threads (0: torch's default)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = tuple(args.size)
    # The validation scenes come from another seed stream than the training ones: no scene is in both.
    train_set = SyntheticScenes(args.train_images, size, seed=2 * args.seed)
    val_set = SyntheticScenes(args.val_images, size, seed=2 * args.seed + 1)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                               generator=generator)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size)
    model = build_model(args.model, args.depths)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(f'segment: {args.model} depths {list(args.depths) or "default"}, {size[0]}x{size[1]}, '
          f'{len(train_set)} train / {len(val_set)} val scenes, {NUM_CLASSES} classes, seed {args.seed}, '
          f'{torch.get_num_threads()} threads', flush=True)

    start = time.time()
    steps = args.max_steps or len(train_loader)
    losses = []
    for epoch in range(args.epochs):
        losses.append(train_one_epoch(model, train_loader, optimizer, steps))
        print(f'epoch {epoch}: train loss {losses[-1]:.4f} ({time.time() - start:.0f} s)', flush=True)
    metrics = dict(evaluate(model, val_loader), train_loss=losses)
    ious = ' '.join('-' if v != v else f'{v:.3f}' for v in metrics['iou'])
    print(f'val mIoU {metrics["miou"]:.4f} (per class: {ious}) after {time.time() - start:.0f} s', flush=True)
    return metrics


if __name__ == '__main__':
    main()
