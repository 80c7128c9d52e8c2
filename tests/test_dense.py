"""Dense prediction on our backbones (docs/dense.md): torchvision's Faster / Mask R-CNN on ``models.dense``'s FPN
backbone at the detectors' default sizes, smp's and HF transformers' UPerNet through timm ``features_only`` at
512x512, and tools/segment.py for a few steps.

Kept fast on 2 cores: Mask R-CNN trains the tiny variants as they are; the other cases use them with one block per
stage (``depths=(1, 1, 1, 1)``: the same code, the same feature shapes), batch 1-2, narrow heads. The packages from
requirements-dense.txt (and transformers, left out of it for its size) are skipped with one line when absent.
"""
import math
import re

import pytest
import torch

import models  # noqa: F401  (registers msg_transformer_* and mg_ssaf_* with timm)
from models.dense import SemanticFPN, TimmFPNBackbone, timm_fpn_backbone

TINY = ('msg_transformer_tiny', 'mg_ssaf_tiny')
SHALLOW = (1, 1, 1, 1)  # one block per stage: the tests' speed, not a variant
SEG_SIZE = 512          # the usual ADE20K crop (the MG-SSAF paper's UPerNet setting)


def scene() -> tuple:
    """One 3x480x640 image (values in [0, 1]) with two boxes, their labels and masks (a detection target)."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 480, 640, generator=g)
    boxes = torch.tensor([[60., 50., 300., 200.], [300., 250., 600., 400.]])
    masks = torch.zeros(2, 480, 640, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = 1
        image[:, y0:y1, x0:x1] *= 0.5
    return image, dict(boxes=boxes, labels=torch.tensor([1, 2]), masks=masks)


@pytest.mark.parametrize('detector', ['MaskRCNN', 'FasterRCNN'])
@pytest.mark.parametrize('name', TINY)
def test_torchvision_detector(name, detector):
    """One training step and one evaluation forward at torchvision's default sizes: the 480x640 image is resized
    to 800x1066 and padded to 800x1088 (min_size 800, max_size 1333, size_divisible 32); the pyramid has
    ceil(800 / s) x ceil(1088 / s) levels for s = 4, 8, 16, 32 and 'pool' at 64."""
    from torchvision.models import detection
    torch.manual_seed(0)
    # Mask R-CNN with the tiny models as they are (full depth); Faster R-CNN, the same backbone route, shallow.
    backbone = timm_fpn_backbone(name, out_channels=64, **({} if detector == 'MaskRCNN' else {'depths': SHALLOW}))
    model = getattr(detection, detector)(backbone, num_classes=3)
    t = model.transform
    assert (t.min_size, t.max_size, t.size_divisible) == ((800,), 1333, 32)  # the defaults, untouched
    levels = {}
    backbone.register_forward_hook(lambda m, i, out: levels.update({k: tuple(v.shape) for k, v in out.items()}))
    image, target = scene()
    if detector == 'FasterRCNN':
        del target['masks']

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model([image], [target])
    expected = {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert set(losses) == expected | ({'loss_mask'} if detector == 'MaskRCNN' else set())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert levels == {str(i): (1, 64, math.ceil(800 / 4 / 2 ** i), math.ceil(1088 / 4 / 2 ** i)) for i in range(4)} \
        | {'pool': (1, 64, 13, 17)}
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in backbone.body.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    first = next(backbone.body.parameters())
    before = first.detach().clone()
    optimizer.step()
    assert not torch.equal(before, first)

    model.eval()
    with torch.no_grad():
        (out,) = model([image])
    n = len(out['boxes'])
    assert out['boxes'].shape == (n, 4) and out['labels'].shape == out['scores'].shape == (n,)
    if n:  # boxes in the coordinates of the 480x640 input (up to rounding: 800 * 0.6 may exceed 480 by an ulp)
        assert (out['boxes'] >= 0).all() and (out['boxes'][:, 2:] <= torch.tensor([640., 480.]) + 1e-3).all()
    if detector == 'MaskRCNN':
        assert out['masks'].shape == (n, 1, 480, 640)


@pytest.mark.parametrize('name', TINY)
def test_smp_upernet(name):
    """segmentation_models_pytorch's UPerNet with the backbone as a ``tu-`` (timm universal) encoder: forward and
    backward at 512x512, per-pixel logits at the input size, every backbone parameter gets a gradient."""
    smp = pytest.importorskip('segmentation_models_pytorch', reason='pip install -r requirements-dense.txt')
    torch.manual_seed(0)
    model = smp.UPerNet(encoder_name=f'tu-{name}', encoder_weights=None, classes=5, decoder_channels=64,
                        depths=SHALLOW)
    x = torch.randn(2, 3, SEG_SIZE, SEG_SIZE)
    out = model(x)  # batch 2: the head's pooling branch batch-norms 1x1 maps
    assert out.shape == (2, 5, SEG_SIZE, SEG_SIZE) and torch.isfinite(out).all()
    torch.nn.functional.cross_entropy(out, torch.randint(0, 5, (2, SEG_SIZE, SEG_SIZE))).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize('name', ['mg_ssaf_tiny'])
def test_transformers_upernet(name):
    """HF transformers' UperNetForSemanticSegmentation with TimmBackboneConfig: its TimmBackbone calls
    ``timm.create_model(..., features_only=True)``, so the models must be registered (``import models``) in the
    process first. Forward with labels (the loss) and backward at 512x512."""
    transformers = pytest.importorskip('transformers', reason='pip install transformers (left out of '
                                                              'requirements-dense.txt for its size)')
    torch.manual_seed(0)
    backbone_config = transformers.TimmBackboneConfig(backbone=name, out_indices=(0, 1, 2, 3),
                                                      use_pretrained_backbone=False)
    config = transformers.UperNetConfig(backbone_config=backbone_config, num_labels=5, hidden_size=64,
                                        use_auxiliary_head=False)
    model = transformers.UperNetForSemanticSegmentation(config)
    assert model.backbone.channels == [96, 192, 384, 768]  # MG-SSAF-T's stages
    labels = torch.randint(0, 5, (2, SEG_SIZE, SEG_SIZE))
    out = model(pixel_values=torch.randn(2, 3, SEG_SIZE, SEG_SIZE), labels=labels)
    assert out.logits.shape == (2, 5, SEG_SIZE, SEG_SIZE) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


def test_semantic_fpn_shapes():
    """``SemanticFPN`` gives logits at the input size, also for a size that is not a multiple of 32."""
    torch.manual_seed(0)
    model = SemanticFPN(TimmFPNBackbone('mg_ssaf_tiny', out_channels=32, depths=SHALLOW), num_classes=3,
                        head_channels=16)
    assert model(torch.randn(1, 3, 200, 328)).shape == (1, 3, 200, 328)


def test_segment_example_few_steps(capsys):
    """tools/segment.py at its default size (320x320, not a multiple of 224) for a few steps: it trains, prints
    the loss and a validation mIoU in [0, 1]; a second run with the same seed prints the same."""
    from tools import segment
    args = ['--depths', *map(str, SHALLOW), '--epochs', '1', '--max-steps', '1', '--batch-size', '1',
            '--train-images', '2', '--val-images', '1', '--seed', '3']
    metrics = segment.main(args)
    printed = capsys.readouterr().out
    assert 'segment: msg_transformer_tiny depths [1, 1, 1, 1], 320x320' in printed
    loss = re.search(r'epoch 0: train loss (\d+\.\d+)', printed)
    miou = re.search(r'val mIoU (\d\.\d+)', printed)
    assert loss and float(loss.group(1)) == pytest.approx(metrics['train_loss'][0], abs=1e-4)
    assert miou and float(miou.group(1)) == pytest.approx(metrics['miou'], abs=1e-4) and 0 <= metrics['miou'] <= 1
    assert repr(segment.main(args)) == repr(metrics)  # repr: an absent class's IoU is nan


def test_miou_from_confusion():
    """Per-class IoU from the confusion matrix; the mean leaves out a class absent from truth and prediction."""
    from tools.segment import confusion_matrix, iou_from_confusion
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 1]])
    cm = confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    metrics = iou_from_confusion(cm)
    assert metrics['iou'][:2] == [0.5, 2 / 3] and math.isnan(metrics['iou'][2])
    assert metrics['miou'] == pytest.approx((0.5 + 2 / 3) / 2)
