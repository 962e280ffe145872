"""CNN and hybrid patterns outside torch-pruning's index mappings: the channel flow covers them exactly.

Every model here is small; each test builds the spec, checks it structurally (float64 copy, every
parameter re-drawn at O(1), :func:`fusion.structural_difference`) and checks what it covers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusion
from fusion.spec.patterns import flow_groups
from fusion.spec.verify import STRUCTURAL_TOLERANCE


def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class Head(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class MixedKernels(nn.Module):
    """MixNet: split the channels, one depthwise kernel size per part, concatenate."""

    def __init__(self):
        super().__init__()
        self.stem, self.pw = conv_bn(3, 8, 3), conv_bn(8, 12)
        self.dw = nn.ModuleList([nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in ((4, 3), (8, 5))])
        self.pwl, self.head = conv_bn(12, 8), Head(8)

    def forward(self, x):
        x = self.stem(x)
        parts = torch.split(self.pw(x), [4, 8], dim=1)
        return self.head(x + self.pwl(torch.cat([conv(p) for conv, p in zip(self.dw, parts)], 1)))


class Ghost(nn.Module):
    """GhostNet: a primary conv, a cheap depthwise conv of it, concatenated, then sliced."""

    def __init__(self):
        super().__init__()
        self.stem, self.primary, self.cheap = conv_bn(3, 8, 3), conv_bn(8, 6), conv_bn(6, 6, 3, groups=6)
        self.head = Head(10)

    def forward(self, x):
        a = self.primary(self.stem(x))
        return self.head(torch.cat([a, self.cheap(a)], 1)[:, :10])


class Shuffle(nn.Module):
    """ShuffleNet-V2 unit: split, one branch transformed, concatenate, interleave the two halves."""

    def __init__(self):
        super().__init__()
        self.stem, self.branch, self.head = conv_bn(3, 8, 3), nn.Sequential(conv_bn(4, 4), conv_bn(4, 4, 3, 4)), Head(8)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        return self.head(x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w))


class Res2(nn.Module):
    """Res2Net: hierarchical splits, each part added to the previous part's output."""

    def __init__(self, scale: int = 4, width: int = 3):
        super().__init__()
        self.stem, self.conv1 = conv_bn(3, 8, 3), conv_bn(8, scale * width)
        self.convs = nn.ModuleList([conv_bn(width, width, 3) for _ in range(scale - 1)])
        self.conv3, self.head, self.width = conv_bn(scale * width, 8), Head(8), width

    def forward(self, x):
        x = self.stem(x)
        parts = torch.split(self.conv1(x), self.width, 1)
        out, prev = [], None
        for i, conv in enumerate(self.convs):
            prev = conv(parts[i] if prev is None else parts[i] + prev)
            out.append(prev)
        return self.head(x + self.conv3(torch.cat(out + [parts[-1]], 1)))


class SplitAttention(nn.Module):
    """ResNeSt/SK: radix branches summed, a softmax over the radix weights each branch per channel."""

    def __init__(self, c: int = 6, radix: int = 2):
        super().__init__()
        self.stem, self.conv = conv_bn(3, c, 3), conv_bn(c, c * radix, 3, groups=radix)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c * radix, 1)
        self.head, self.radix = Head(c), radix

    def forward(self, x):
        x = self.conv(self.stem(x))
        b, rc = x.shape[:2]
        parts = x.view(b, self.radix, rc // self.radix, *x.shape[2:])
        attn = self.fc2(F.relu(self.fc1(parts.sum(1).mean((2, 3), keepdim=True))))
        attn = attn.view(b, self.radix, -1, 1, 1).softmax(1)
        return self.head((parts * attn).sum(1))


class ScaledStdConv(nn.Conv2d):
    """A weight-standardised convolution with a per-output-channel gain (NFNet)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k, padding=k // 2)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1))

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         weight=self.gain.view(-1)).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, padding=self.padding)


class StdConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = ScaledStdConv(3, 8, 3), ScaledStdConv(8, 8, 3), Head(8)

    def forward(self, x):
        return self.head(self.b(F.relu(self.a(x))))


class Mixer(nn.Module):
    """MLP-Mixer: a token-mixing MLP on the transposed tokens, a channel MLP, layer norms."""

    def __init__(self, tokens: int = 16, c: int = 8):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 4, stride=4)
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.token = nn.Sequential(nn.Linear(tokens, 12), nn.GELU(), nn.Linear(12, tokens))
        self.channel = nn.Sequential(nn.Linear(c, 16), nn.GELU(), nn.Linear(16, c))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.token(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.channel(self.norm2(x))
        return self.fc(x.mean(1))


class WindowsAndMerging(nn.Module):
    """Swin: channels-last tokens cut into windows (view/permute), a channel MLP, then patch merging
    (four strided slices concatenated along channels, a norm and a reduction)."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.embed, self.norm = nn.Conv2d(3, c, 2, stride=2), nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 12), nn.GELU(), nn.Linear(12, c))
        self.merge_norm, self.reduction, self.fc = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c, bias=False), nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # B H W C
        b, h, w, c = x.shape
        win = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        win = win + self.mlp(self.norm(win))
        x = win.view(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.fc(self.reduction(self.merge_norm(x)).mean((1, 2)))


def spec_of(model: nn.Module, size: int = 16) -> tuple[fusion.PermutationSpec, torch.Tensor]:
    x = torch.randn(2, 3, size, size)
    return fusion.permutation_spec(model, x), x


def moved_fraction(model: nn.Module, spec: fusion.PermutationSpec) -> float:
    moved = {m.name for g in spec.groups for m in g.members}
    sizes = {k: v.numel() for k, v in model.state_dict().items() if v.is_floating_point()}
    return sum(sizes[k] for k in moved) / sum(sizes.values())


@pytest.mark.parametrize("cls", [MixedKernels, Ghost, Shuffle, Res2, SplitAttention, StdConvNet, WindowsAndMerging])
def test_pattern_is_covered_exactly(cls):
    model = cls().eval()
    spec, x = spec_of(model)
    assert fusion.structural_difference(model, spec, x, seed=1) <= STRUCTURAL_TOLERANCE
    assert moved_fraction(model, spec) >= 0.95, spec.summary()
    assert all(s.kind == "output" for s in spec.skipped), spec.summary()


def test_a_split_into_parts_gives_one_group_per_part():
    model = MixedKernels().eval()
    spec, _ = spec_of(model)
    pw = [g for g in spec.groups if "pw.0" in g.producers]
    assert sorted(g.size for g in pw) == [4, 8]


def test_a_shuffle_moves_the_next_layer_by_the_interleaved_order():
    model = Shuffle().eval()
    spec, _ = spec_of(model)
    stem = next(g for g in spec.groups if "stem.0" in g.producers and g.size == 4 and
                any(m.name == "head.fc.weight" for m in g.members))
    fc = next(m for m in stem.members if m.name == "head.fc.weight")
    # untouched half a = stem channels 0..3 lands at even positions after the interleave
    assert sorted(fc.index.flatten().tolist()) == [0, 2, 4, 6]


def test_weight_standardisation_gain_moves_with_the_output_channels():
    model = StdConvNet().eval()
    spec, _ = spec_of(model)
    group = spec.group_of_layer("a")
    assert ("a.gain", 0) in group.axes


def test_patch_merging_repeats_each_channel_four_times_in_the_reduction():
    model = WindowsAndMerging().eval()
    spec, _ = spec_of(model)
    group = spec.group_of_layer("embed")
    reduction = next(m for m in group.members if m.name == "reduction.weight")
    assert reduction.block == 4 and reduction.index[0].tolist() == [0, 6, 12, 18]


def test_token_mixing_weights_stay_in_place_and_channels_stay_permutable():
    model = Mixer().eval()
    spec, x = spec_of(model)
    moved = {m.name for g in spec.groups for m in g.members}
    assert not any(name.startswith("token.") for name in moved)
    assert {"channel.0.weight", "norm1.weight", "embed.weight"} <= moved
    assert any("token mixing" in s.reason for s in spec.skipped)
    assert fusion.structural_difference(model, spec, x, seed=2) <= STRUCTURAL_TOLERANCE


def test_flow_pins_the_inputs_and_outputs():
    model = Ghost().eval()
    x = torch.randn(2, 3, 16, 16)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    groups, skipped = flow_groups(model, x, {k: k for k in model.state_dict()}, order)
    moved = {(m.name, m.axis) for g in groups for m in g.members}
    assert ("stem.0.weight", 1) not in moved and ("head.fc.weight", 0) not in moved
    assert [s.kind for s in skipped] == ["output"]


def test_an_operation_without_a_rule_refuses_its_units_with_the_reason():
    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.sort(self.a(x), dim=-1).values)

    model = Sorted()
    groups, skipped = flow_groups(model, torch.randn(3, 4), {}, {"a": 0, "b": 1})
    assert not groups
    assert any("sort" in s.reason and s.kind == "unsupported" for s in skipped if s.name == "a")


def test_the_model_is_not_modified():
    model = SplitAttention().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec_of(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "_forward_hooks") and m._forward_hooks for m in model.modules())


class EinsumAttention(nn.Module):
    """MaxViT-style attention written with einsum, and a Swin-V2-style bias assembled in the forward."""

    def __init__(self, c: int = 8, heads: int = 2):
        super().__init__()
        self.embed, self.qkv, self.proj, self.fc = nn.Linear(3, c), nn.Linear(c, 3 * c, bias=False), nn.Linear(c, c), \
            nn.Linear(c, 5)
        self.q_bias, self.v_bias, self.heads = nn.Parameter(torch.randn(c)), nn.Parameter(torch.randn(c)), heads

    def forward(self, x):
        x = self.embed(x.flatten(2).transpose(1, 2))  # B N C
        b, n, c = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = torch.einsum("bhid,bhjd->bhij", q, k).softmax(-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, c)
        return self.fc((x + self.proj(out)).mean(1))


def test_einsum_attention_and_a_bias_built_in_the_forward_are_covered_exactly():
    model = EinsumAttention().eval()
    spec, x = spec_of(model, size=4)
    assert fusion.structural_difference(model, spec, x, seed=3) <= STRUCTURAL_TOLERANCE
    moved = {(m.name, m.axis) for g in spec.groups for m in g.members}
    assert {("qkv.weight", 0), ("q_bias", 0), ("v_bias", 0), ("proj.weight", 1)} <= moved
