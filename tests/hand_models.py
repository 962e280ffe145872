"""Small hand-built models exercising each coupling construct of the permutation spec."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


class MLP(nn.Module):
    def __init__(self, sizes=(8, 16, 12, 4)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class Residual(nn.Module):
    """conv-bn stem, two residual blocks on one stream, a downsampling shortcut."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.a1, self.a2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(c, 2 * c, 3, padding=1), nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.short = nn.Conv2d(c, 2 * c, 1)
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a2(F.relu(self.a1(x)))
        x = self.bn(self.b2(F.relu(self.b1(x)))) + self.short(x)
        return self.head(F.adaptive_avg_pool2d(F.relu(x), 1).flatten(1))


class Concat(nn.Module):
    """Two branches concatenated along channels, read by one conv; a flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.mix = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.left(x), self.right(x)], dim=1)))
        x = F.adaptive_avg_pool2d(F.relu(self.mix(x)), 4)
        return self.fc(x.flatten(1))


class Chunk(nn.Module):
    """A conv whose output is split by torch.chunk into two consumers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.top, self.bottom = nn.Conv2d(4, 6, 1), nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        a, b = torch.chunk(F.relu(self.conv(x)), 2, dim=1)
        y = F.relu(self.top(a)) * torch.sigmoid(self.bottom(b))
        return self.fc(y.mean(dim=(2, 3)))


class Depthwise(nn.Module):
    """MobileNet-style block: expand, depthwise, project, with a residual."""

    def __init__(self, c=6, e=12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e), nn.BatchNorm2d(e), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1), nn.BatchNorm2d(c))
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.fc(x.mean(dim=(2, 3)))


class Grouped(nn.Module):
    """ResNeXt-style bottleneck with a grouped 3x3 conv and GroupNorm."""

    def __init__(self, c=8, w=12, groups=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.reduce = nn.Conv2d(c, w, 1)
        self.gn = nn.GroupNorm(groups, w)
        self.grouped = nn.Conv2d(w, w, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(w)
        self.restore = nn.Conv2d(w, c, 1)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.gn(self.reduce(x)))
        y = F.relu(self.bn(self.grouped(y)))
        x = x + self.restore(y)
        return self.fc(x.mean(dim=(2, 3)))


class TiedEmbedding(nn.Module):
    """A language-model-like net whose output head shares the embedding matrix."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, 16)
        self.back = nn.Linear(16, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        x = self.embed(tokens)
        x = x + self.back(F.gelu(self.hidden(x)))
        return self.head(self.norm(x))


def tiny_vit() -> nn.Module:
    """torchvision's VisionTransformer (class token, positional embedding, attention), tiny."""
    return VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                             mlp_dim=32, num_classes=5)


def randomize_bn(model: nn.Module, example: torch.Tensor, steps: int = 3) -> nn.Module:
    """Give normalisation layers non-default affine parameters and running statistics."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(steps):
            model(torch.randn(4, *example.shape[1:]))
    return model.eval()


class UNet(nn.Module):
    """Encoder-decoder with a transposed convolution and a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.d1, self.out = nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        u = F.relu(self.up(F.relu(self.e2(a))))
        return self.out(F.relu(self.d1(torch.cat([u, a], 1))))


class Recurrent(nn.Module):
    """Embedding and a linear layer feeding an LSTM, whose hidden units are not permuted."""

    def __init__(self):
        super().__init__()
        self.embed, self.pre = nn.Embedding(20, 8), nn.Linear(8, 8)
        self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 5)

    def forward(self, tokens):
        hidden, _ = self.lstm(F.relu(self.pre(self.embed(tokens))))
        return self.fc(hidden[:, -1])


class TinyVGG16(nn.Module):
    """VGG-16's layout (five blocks of 2, 2, 3, 3, 3 conv-BN-ReLU, each ending in a 2x2 max-pool) at small widths."""

    def __init__(self, in_channels=1, num_classes=10, widths=(4, 8, 8, 16, 16)):
        super().__init__()
        layers, previous = [], in_channels
        for width, count in zip(widths, (2, 2, 3, 3, 3)):
            for _ in range(count):
                layers += [nn.Conv2d(previous, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                previous = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(previous, num_classes)

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))
