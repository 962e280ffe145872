"""Small reference architectures for tests, experiments and the demo.

Plain :class:`torch.nn.Module` s built from standard layers only, so torch.fx and torch-pruning
trace them: an MLP, a VGG-style CNN and a ResNet-style CNN with residual blocks (He et al. 2016,
with a 1x1 convolution + normalisation shortcut where the shape changes), for images (2-D) or
signals such as MNIST-1D (1-D, :class:`ResNet1d`), normalised by BatchNorm or by a LayerNorm over
channels and length (``GroupNorm(1, C)``, the form of LayerNorm that keeps channels permutable). Each takes
a ``width_multiplier`` that scales every hidden width, as in the width studies of the model
merging literature. Training lives in :mod:`fusion.fuse.finetune`.

Example:
    >>> model = build_model("resnet", in_channels=1, width=8, num_classes=10)
    >>> model(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError

__all__ = ["MLP", "MODELS", "NORMS", "BasicBlock", "ResNet1d", "SmallResNet", "VGGSmall", "build_model"]


def _scaled(width: int, width_multiplier: float) -> int:
    """``width * width_multiplier`` rounded, at least 1."""
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
    return max(1, round(width * width_multiplier))


class MLP(nn.Module):
    """A multi-layer perceptron: flatten, then ``Linear -> [BatchNorm1d] -> ReLU`` per hidden layer.

    Args:
        in_features: input features (64 for flattened 8x8 digits); inputs of any shape
            ``(N, ...)`` with that many features per sample are flattened first.
        hidden: widths of the hidden layers.
        num_classes: outputs of the last linear layer.
        width_multiplier: scales every hidden width.
        batch_norm: insert a BatchNorm1d after each hidden linear layer.

    Shapes:
        ``(N, in_features)`` or ``(N, *dims)`` with ``prod(dims) == in_features`` -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (512, 512, 512),
        num_classes: int = 10,
        width_multiplier: float = 1.0,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        previous = in_features
        for width in hidden:
            width = _scaled(width, width_multiplier)
            layers.append(nn.Linear(previous, width))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            previous = width
        layers.append(nn.Linear(previous, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_bn_relu(in_channels: int, out_channels: int, batch_norm: bool) -> list[nn.Module]:
    """A 3x3 same-padding convolution, optional BatchNorm, ReLU."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU()] if batch_norm else [conv, nn.ReLU()]


class VGGSmall(nn.Module):
    """A VGG-style CNN: per width a ``conv3x3 -> [BN] -> ReLU -> maxpool2`` stage, then linear layers.

    The pools use ``ceil_mode`` and the features end in a global average pool, so the network
    accepts any input of at least 1x1 pixels (8x8 digits included) whatever the number of stages.

    Args:
        in_channels: input channels (1 for digits/MNIST, 3 for CIFAR).
        widths: output channels of the convolution stages.
        num_classes: outputs of the last linear layer.
        batch_norm: insert a BatchNorm2d after each convolution (which then has no bias).
        hidden: widths of the hidden classifier linear layers (each followed by ReLU).
        width_multiplier: scales every convolution and hidden width.

    Shapes:
        ``(N, in_channels, H, W)`` -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        batch_norm: bool = True,
        hidden: Sequence[int] = (128,),
        width_multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        features: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            width = _scaled(width, width_multiplier)
            features += _conv_bn_relu(previous, width, batch_norm)
            features.append(nn.MaxPool2d(2, ceil_mode=True))
            previous = width
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        classifier: list[nn.Module] = []
        for width in hidden:
            width = _scaled(width, width_multiplier)
            classifier += [nn.Linear(previous, width), nn.ReLU()]
            previous = width
        classifier.append(nn.Linear(previous, num_classes))
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


#: Normalisations of the residual networks: BatchNorm, LayerNorm over (channels, length/pixels), none.
NORMS: tuple[str, ...] = ("batch", "layer", "none")


def _conv(dims: int) -> type[nn.Module]:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 (signals) or 2 (images), got {dims!r}")
    return nn.Conv1d if dims == 1 else nn.Conv2d


def _norm(norm: str, channels: int, dims: int) -> nn.Module:
    """The normalisation layer after a convolution: BatchNorm, GroupNorm(1, C) (LayerNorm over C and space) or none."""
    if norm == "batch":
        return nn.BatchNorm1d(channels) if dims == 1 else nn.BatchNorm2d(channels)
    if norm == "layer":
        return nn.GroupNorm(1, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class BasicBlock(nn.Module):
    """A residual block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity when the shape is kept, else a strided 1x1 convolution + normalisation.
    ``bn1``/``bn2`` are BatchNorm layers by default; with ``norm="layer"`` they are ``GroupNorm(1, C)``
    and with ``norm="none"`` identities (the convolutions then have biases).

    Args:
        in_channels, out_channels: channels in and out.
        stride: stride of the first convolution and of the shortcut.
        norm: ``"batch"``, ``"layer"`` or ``"none"``.
        dims: 2 for images ``(N, C, H, W)``, 1 for signals ``(N, C, L)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, norm: str = "batch", dims: int = 2) -> None:
        super().__init__()
        conv, bias = _conv(dims), norm != "batch"
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(norm, out_channels, dims)
        self.relu1 = nn.ReLU()
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn2 = _norm(norm, out_channels, dims)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(conv(in_channels, out_channels, 1, stride=stride, bias=bias),
                                          _norm(norm, out_channels, dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: a conv stem, stages of :class:`BasicBlock`, global pool, linear head.

    Stage ``i`` has ``width * 2**i`` channels (times ``width_multiplier``) and halves the spatial
    size (except the first), so the first block of each later stage has a 1x1-conv shortcut.

    Args:
        in_channels: input channels.
        width: channels of the stem and first stage.
        num_blocks: residual blocks per stage (ResNet-20 is ``(3, 3, 3)`` with ``width=16``).
        num_classes: outputs of the linear head.
        width_multiplier: scales every width.
        norm: ``"batch"`` (default), ``"layer"`` (``GroupNorm(1, C)``) or ``"none"``; see :class:`BasicBlock`.
        dims: 2 for images, 1 for signals (see :class:`ResNet1d`).

    Shapes:
        ``(N, in_channels, H, W)`` (``(N, in_channels, L)`` with ``dims=1``) -> ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        num_blocks: Sequence[int] = (1, 1, 1),
        num_classes: int = 10,
        width_multiplier: float = 1.0,
        norm: str = "batch",
        dims: int = 2,
    ) -> None:
        super().__init__()
        base = _scaled(width, width_multiplier)
        self.conv1 = _conv(dims)(in_channels, base, 3, padding=1, bias=norm != "batch")
        self.bn1 = _norm(norm, base, dims)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        previous = base
        for i, count in enumerate(num_blocks):
            channels = base * 2**i
            blocks = [BasicBlock(previous if j == 0 else channels, channels, 2 if i > 0 and j == 0 else 1, norm, dims)
                      for j in range(count)]
            stages.append(nn.Sequential(*blocks))
            previous = channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(out)))


class ResNet1d(SmallResNet):
    """:class:`SmallResNet` for 1-D signals (MNIST-1D: ``(N, 1, 40)``): Conv1d stem, residual stages, pool, head.

    Stage ``i`` has ``width * 2**i`` channels (times ``width_multiplier``) and halves the length
    (except the first); ``norm`` chooses BatchNorm (``"batch"``), a LayerNorm over channels and
    length (``"layer"``: ``GroupNorm(1, C)``) or none.

    Takes :class:`SmallResNet`'s arguments (``in_channels``, ``width``, ``num_blocks``, ``num_classes``,
    ``width_multiplier``, ``norm``) except ``dims``, which is 1.

    Shapes:
        ``(N, in_channels, L)`` -> ``(N, num_classes)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "dims" in kwargs:
            raise TypeError("ResNet1d is one-dimensional: it takes no dims argument")
        super().__init__(*args, **kwargs, dims=1)


#: Constructors by the names :func:`build_model` accepts.
MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "vgg": VGGSmall, "resnet": SmallResNet, "resnet1d": ResNet1d}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a reference model by name (``"mlp"``, ``"vgg"``, ``"resnet"``, ``"resnet1d"``) with keyword arguments.

    Raises:
        CheckpointError: unknown name.
    """
    key = str(name).lower()
    if key not in MODELS:
        raise CheckpointError(f"unknown model name {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[key](**kwargs)
