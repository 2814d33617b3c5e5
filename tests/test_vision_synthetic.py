"""Calibration images distilled from batch-norm statistics (quantizer.vision.synthetic)."""

import pytest
import torch
from torch import nn

from quantizer.vision.synthetic import _BNStatLoss, _pixel_bounds, distill_images

# Tiny convolutions: one torch thread (tests/conftest.py) is faster than two on a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(seed=0):
    """conv-BN-ReLU x2 + classifier whose BN running statistics are those of a reachable batch
    (smooth, colour-shifted images), so matching them is possible."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=1.0), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    target = torch.nn.functional.avg_pool2d(torch.randn(16, 3, 36, 36), 5, stride=1) * 2
    target = target + torch.tensor([0.8, -0.5, 0.2]).reshape(1, 3, 1, 1)
    net.train()
    with torch.no_grad():
        net(target)  # momentum 1: the running statistics become this batch's
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


def bn_loss(net, x):
    stats = _BNStatLoss(net)
    try:
        with torch.no_grad():
            net(x)
        return float(stats.pop())
    finally:
        stats.remove()


def test_distilled_images_match_batchnorm_statistics_better_than_their_start(one_thread):
    net = small_net()
    flags = [p.requires_grad for p in net.parameters()]
    start = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = distill_images(net, 8, steps=60, batch_size=8, lr=0.05, init=start, class_weight=0.0, jitter=2,
                         seed=0, size=32)
    lo, hi = _pixel_bounds()
    assert out.shape == (8, 3, 32, 32)
    assert bool((out >= lo).all() and (out <= hi).all())
    clamped = torch.max(torch.min(start, hi), lo)
    assert bn_loss(net, out) < 0.7 * bn_loss(net, clamped)
    # The model is left as it was: no hooks, no gradients requested, still in eval mode.
    assert not net.training and [p.requires_grad for p in net.parameters()] == flags
    assert all(len(m._forward_hooks) == 0 for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_class_term_moves_images_towards_their_seeded_classes(one_thread):
    net = small_net()
    start = torch.zeros(6, 3, 32, 32)
    kw = dict(steps=40, batch_size=6, lr=0.05, init=start, jitter=0, seed=1, size=32)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (6,), generator=gen)  # the small net's 10 classes, drawn as distill_images does
    with_class = distill_images(net, 6, class_weight=1.0, **kw)
    without = distill_images(net, 6, class_weight=0.0, **kw)
    assert torch.equal(with_class, distill_images(net, 6, class_weight=1.0, **kw))  # seeded
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert float(ce(net(with_class), labels)) < float(ce(net(without), labels))


def test_distill_images_rejects_bad_arguments():
    net = small_net()
    with pytest.raises(ValueError, match="n=0"):
        distill_images(net, 0)
    with pytest.raises(ValueError, match="init shape"):
        distill_images(net, 2, init=torch.zeros(3, 3, 32, 32), size=32)
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        distill_images(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, size=32)
