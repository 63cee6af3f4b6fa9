"""Built-in model factories.

Contract: ``factory(**kwargs) -> torch.nn.Module``. Every factory here

* is deterministic given ``torch.manual_seed`` (all randomness comes from torch's global generator,
  in a fixed construction order), so a separate process rebuilds the same initial parameters;
* builds the same state-dict keys for the same kwargs, which the archive's layout table relies on;
* takes only JSON-representable arguments, so that the call can be recorded as a
  :class:`trajectory.specs.Spec`;
* never downloads or loads pretrained weights.

The CIFAR models follow the paper's authors ("A Walk with SGD", Xing et al. 2018): VGG-11 with
BatchNorm and a 512-512-classes classifier for 32x32 inputs, a pre-activation ResNet-56, and an MLP
(``mlp(in_features=784, hidden=(500, 350), batchnorm=True)`` is their MNIST network). Where
torchvision provides a building block (VGG feature layers, ResNet-18) it is used rather than
re-implemented; torchvision has no pre-activation CIFAR ResNet, so that one is written here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "mlp",
    "mlp_bn",
    "cnn",
    "cnn_bn",
    "vgg11_bn",
    "resnet18",
    "preact_resnet",
    "preact_resnet20",
    "preact_resnet56",
    "transformer",
    "count_parameters",
]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable-or-not parameters (buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _he_init_(model: nn.Module) -> nn.Module:
    """He-normal (fan-out) convolutions, unit/zero BatchNorm affine; Linear layers keep torch's default.

    This is the initialisation the paper's authors apply to their CIFAR networks; doing it in one
    place also makes layers we swap into torchvision models (a new stem conv) match the rest.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


# --------------------------------------------------------------------------------------------- MLP
def mlp(
    in_features: int = 40,
    num_classes: int = 10,
    hidden: Sequence[int] = (100, 100),
    batchnorm: bool = False,
) -> nn.Module:
    """Fully connected ReLU network: Flatten, then ``Linear -> [BatchNorm1d] -> ReLU`` per hidden width.

    The input is flattened first, so the same factory serves MNIST-1D vectors ``(N, 40)``, MNIST
    images ``(N, 1, 28, 28)`` with ``in_features=784`` or CIFAR images with ``in_features=3072``.
    ``hidden`` may be empty (multinomial logistic regression). The paper's MNIST network is
    ``mlp(in_features=784, hidden=(500, 350), batchnorm=True)``.
    """
    in_features = _positive_int(in_features, "in_features")
    num_classes = _positive_int(num_classes, "num_classes")
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"hidden must be a sequence of layer widths, got {hidden!r}")
    widths = [_positive_int(h, "hidden width") for h in hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for width in widths:
        layers.append(nn.Linear(prev, width))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU(inplace=True))
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def mlp_bn(
    in_features: int = 40,
    num_classes: int = 10,
    hidden: Sequence[int] = (100, 100),
) -> nn.Module:
    """:func:`mlp` with BatchNorm after every hidden Linear layer (a separate name for the CLI)."""
    return mlp(in_features=in_features, num_classes=num_classes, hidden=hidden, batchnorm=True)


# --------------------------------------------------------------------------------------------- CNN
class _AddChannel(nn.Module):
    """Give ``(N, L)`` input a channel dimension; leave already-channelled input alone.

    MNIST-1D datasets yield plain vectors, and this lets a Conv1d network consume them directly
    without a data-side reshape that would have to be recorded too.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.spatial_dims + 1:
            return x.unsqueeze(1)
        return x


def cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    input_dim: int = 1,
    width: int = 32,
    batchnorm: bool = False,
) -> nn.Module:
    """A small three-stage convolutional network for 1-D signals (``input_dim=1``) or images (``input_dim=2``).

    Architecture (k = 5 for 1-D, 3x3 for 2-D; ``[BN]`` only with ``batchnorm=True``)::

        conv(in_channels -> width)   [BN] ReLU  MaxPool(2)
        conv(width -> 2*width)       [BN] ReLU  MaxPool(2)
        conv(2*width -> 4*width)     [BN] ReLU  global average pool
        Linear(4*width -> num_classes)

    Global average pooling makes the network independent of the input length / image size, so
    one factory serves MNIST-1D ``(N, 40)`` (a 2-D input gets a channel axis added) and CIFAR
    ``(N, 3, 32, 32)``. Parameter counts, for sizing benchmarks:

    * ``cnn()`` (MNIST-1D, 1 x 40): ~53 k
    * ``cnn(in_channels=3, input_dim=2)`` (CIFAR): ~94 k
    * ``cnn(in_channels=3, input_dim=2, width=64)``: ~373 k
    * ``cnn(in_channels=3, input_dim=2, width=128)``: ~1.48 M, the smallest documented width
      with at least 1 M parameters on CIFAR-shaped data
    """
    in_channels = _positive_int(in_channels, "in_channels")
    num_classes = _positive_int(num_classes, "num_classes")
    width = _positive_int(width, "width")
    if input_dim == 1:
        conv, bn, pool, gap, kernel = nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d, 5
    elif input_dim == 2:
        conv, bn, pool, gap, kernel = nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, 3
    else:
        raise ValueError(f"input_dim must be 1 (signals) or 2 (images), got {input_dim!r}")

    layers: list[nn.Module] = [_AddChannel(input_dim)]
    channels = [in_channels, width, 2 * width, 4 * width]
    for stage in range(3):
        # Bias is redundant in front of BatchNorm; dropping it keeps the parameter count honest.
        layers.append(conv(channels[stage], channels[stage + 1], kernel, padding=kernel // 2, bias=not batchnorm))
        if batchnorm:
            layers.append(bn(channels[stage + 1]))
        layers.append(nn.ReLU(inplace=True))
        layers.append(pool(2) if stage < 2 else gap(1))
    layers += [nn.Flatten(), nn.Linear(channels[-1], num_classes)]
    return _he_init_(nn.Sequential(*layers))


def cnn_bn(
    in_channels: int = 1,
    num_classes: int = 10,
    input_dim: int = 1,
    width: int = 32,
) -> nn.Module:
    """:func:`cnn` with BatchNorm after every convolution."""
    return cnn(in_channels=in_channels, num_classes=num_classes, input_dim=input_dim, width=width, batchnorm=True)


# --------------------------------------------------------------------------------------------- VGG
class _CifarVGG(nn.Module):
    """VGG feature extractor + small classifier, laid out like torchvision's ``VGG`` (same key names)."""

    def __init__(self, features: nn.Module, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = features
        # Five 2x2 max-pools take 32x32 to 1x1; adaptive pooling keeps larger inputs working and is
        # the identity for CIFAR, so there is no 7x7 replication and no 25088-wide Linear layer.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def vgg11_bn(num_classes: int = 10, dropout: float = 0.0) -> nn.Module:
    """VGG-11 with BatchNorm for 32x32 RGB input, as used by the paper's authors (~9.8 M parameters).

    The feature layers are torchvision's configuration "A" with BatchNorm
    (``torchvision.models.vgg.make_layers``); the classifier is sized for the 512 features a
    32x32 image leaves after five poolings: ``512 -> 512 -> 512 -> num_classes`` with ReLU, and
    dropout before the first two Linear layers (``dropout=0`` - the authors' setting - disables it).
    """
    from torchvision.models.vgg import cfgs, make_layers

    num_classes = _positive_int(num_classes, "num_classes")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    model = _CifarVGG(make_layers(cfgs["A"], batch_norm=True), num_classes, float(dropout))
    return _he_init_(model)


# ------------------------------------------------------------------------------------------ ResNet
def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem (~11.2 M parameters).

    The ImageNet stem (7x7 stride-2 convolution and a max-pool) would shrink a 32x32 image to 8x8
    before the first residual stage; it is replaced by a 3x3 stride-1 convolution and no pooling.
    The new convolution gets torchvision's own initialisation (He normal, fan-out).
    """
    from torchvision.models import resnet18 as tv_resnet18

    num_classes = _positive_int(num_classes, "num_classes")
    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


class _PreActBlock(nn.Module):
    """Pre-activation basic block: ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` plus identity or 1x1 projection.

    As in the paper's authors' ResNet-56, the projection shortcut (used when the block changes
    resolution or width) is applied to the block's raw input.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + self.shortcut(x)


class _PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int, width: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = width
        for stage in range(3):
            planes = width * 2**stage
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)  # pre-activation nets need a final BN-ReLU
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(torch.relu(self.bn(x)))
        return self.fc(torch.flatten(x, 1))


def preact_resnet(depth: int = 56, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """Pre-activation CIFAR ResNet (He et al. 2016) of depth ``6n + 2`` with stage widths w, 2w, 4w.

    ``depth=56, width=16`` is the paper's ResNet-56 (~0.86 M parameters); ``depth=20`` gives
    ~0.27 M. torchvision has no CIFAR-style or pre-activation ResNet, hence a local implementation.
    """
    depth = _positive_int(depth, "depth")
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
    model = _PreActResNet(
        (depth - 2) // 6,
        _positive_int(num_classes, "num_classes"),
        _positive_int(width, "width"),
        _positive_int(in_channels, "in_channels"),
    )
    return _he_init_(model)


def preact_resnet20(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """:func:`preact_resnet` with ``depth=20`` (a quick CIFAR ResNet for CPU experiments)."""
    return preact_resnet(20, num_classes=num_classes, width=width, in_channels=in_channels)


def preact_resnet56(num_classes: int = 10, width: int = 16, in_channels: int = 3) -> nn.Module:
    """:func:`preact_resnet` with ``depth=56``: the ResNet-56 of the paper's experiments."""
    return preact_resnet(56, num_classes=num_classes, width=width, in_channels=in_channels)



# ------------------------------------------------------------------------------------- Transformer
class _PatchTransformer(nn.Module):
    """Patch embedding + learned positions + pre-built ``nn.TransformerEncoderLayer`` blocks + mean pool + head."""

    def __init__(self, in_features: int, patch: int, dim: int, depth: int, heads: int, num_classes: int) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, in_features // patch, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], -1, self.patch)) + self.pos  # (N, tokens, dim)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(1))


def transformer(
    in_features: int = 40,
    num_classes: int = 10,
    patch: int = 4,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
) -> nn.Module:
    """A small transformer classifier for 1-D signals (MNIST-1D): the ``in_features`` values are cut into
    ``in_features / patch`` tokens of ``patch`` values, embedded by one Linear layer, given learned positions,
    run through ``depth`` ``nn.TransformerEncoderLayer`` blocks (post-norm, ReLU, no dropout), mean-pooled and
    classified. Defaults: 10 tokens, ~68 k parameters. Any input of ``in_features`` values per sample works
    (it is reshaped to tokens)."""
    in_features = _positive_int(in_features, "in_features")
    patch = _positive_int(patch, "patch")
    dim = _positive_int(dim, "dim")
    heads = _positive_int(heads, "heads")
    if in_features % patch:
        raise ValueError(f"in_features ({in_features}) must be a multiple of patch ({patch})")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    return _PatchTransformer(in_features, patch, dim, _positive_int(depth, "depth"), heads,
                             _positive_int(num_classes, "num_classes"))
