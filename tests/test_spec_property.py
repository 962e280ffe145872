"""Property: on any architecture built from common blocks, the permutation spec is never wrong.

Hypothesis draws random networks from blocks (convolutions, full/grouped/depthwise, with BatchNorm,
GroupNorm or LayerNorm; residual adds; concatenations; torch.split/chunk into two branches joined by
a concatenation or a gate; squeeze-excitation; weight-standardised convolutions with per-channel
gains; one convolution applied twice; heads that pool or flatten into a linear, or run
``nn.MultiheadAttention`` over the pixels, with optionally tied linear weights). For each:
``permutation_spec`` must return (or raise a ``fusion`` error, never anything else), and a random
permutation of every accepted group must keep the function of a float64 structural copy drawn with
*another* seed than the one the spec was verified with (``fusion.structural_difference``). Refused
groups only cost coverage, which is tallied by kind and printed at the end of the module.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

import fusion
from fusion.spec import STRUCTURAL_TOLERANCE

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_coverage():
    yield
    if TALLY["models"]:
        kinds = {k.removeprefix("kind:"): v for k, v in TALLY.items() if k.startswith("kind:")}
        print(f"\nspec property: {TALLY['models']} architectures, {TALLY['fusion_errors']} refused with a fusion error, "
              f"{TALLY['groups']} groups accepted, refused by kind {kinds}, "
              f"{TALLY['moved'] / max(TALLY['params'], 1):.1%} of parameter elements moved")


class WSConv(nn.Conv2d):
    """Weight-standardised convolution with a per-channel gain (NFNet's ScaledStdConv2d)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1)
        self.gain = nn.Parameter(torch.ones(c_out, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, self.gain * w, self.bias)


class ChannelLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm_layer(kind: str, c: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "gn":
        return nn.GroupNorm(2 if c % 2 == 0 else 1, c)
    if kind == "ln":
        return ChannelLayerNorm(c)
    return nn.Identity()


class RandomNet(nn.Module):
    """A network interpreting a list of block descriptors (see :func:`architectures`)."""

    def __init__(self, blocks: list[tuple], head: tuple, c_in: int = 3):
        super().__init__()
        self.blocks, self.head_kind = blocks, head
        self.layers = nn.ModuleList()
        c = c_in
        for block in blocks:
            layer, c = self._build(block, c)
            self.layers.append(layer)
        kind = head[0]
        if kind == "flatten":
            self.fc = nn.Linear(c * 4, head[1])
        elif kind == "attention":
            self.norm = nn.LayerNorm(c)
            self.attn = nn.MultiheadAttention(c, head[2], batch_first=True)
            self.fc = nn.Linear(c, head[1])
        elif kind == "tied":
            self.hidden, self.again = nn.Linear(c, c), nn.Linear(c, c)
            self.again.weight = self.hidden.weight
            self.fc = nn.Linear(c, head[1])
        else:
            self.fc = nn.Linear(c, head[1])

    @staticmethod
    def _build(block: tuple, c: int) -> tuple[nn.Module, int]:
        kind = block[0]
        if kind == "conv":
            _, out, k, groups, norm = block
            g = {"full": 1, "grouped": 2, "depthwise": c}[groups]
            out = c if groups == "depthwise" else out
            return nn.Sequential(nn.Conv2d(c, out, k, padding=k // 2, groups=g), norm_layer(norm, out)), out
        if kind == "residual":
            _, hidden, norm = block
            return nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), norm_layer(norm, hidden), nn.ReLU(),
                                 nn.Conv2d(hidden, c, 1)), c
        if kind == "concat":
            _, a, b = block
            return nn.ModuleList([nn.Conv2d(c, a, 3, padding=1), nn.Conv2d(c, b, 1)]), a + b
        if kind == "split":
            _, how, join, out, first = block
            first = (c + 1) // 2 if how == "chunk" else first  # torch.chunk's first part is the larger
            return nn.ModuleList([nn.Conv2d(first, out, 1), nn.Conv2d(c - first, out, 3, padding=1)]), (
                2 * out if join == "cat" else out)
        if kind == "se":
            _, r = block
            return nn.ModuleList([nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)]), c
        if kind == "ws":
            return WSConv(c, block[1]), block[1]
        if kind == "shared":
            return nn.Conv2d(c, c, 3, padding=1), c
        raise ValueError(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, layer in zip(self.blocks, self.layers):
            kind = block[0]
            if kind == "conv":
                x = F.relu(layer(x))
            elif kind == "residual":
                x = x + layer(x)
            elif kind == "concat":
                x = F.relu(torch.cat([layer[0](x), layer[1](x)], dim=1))
            elif kind == "split":
                if block[1] == "chunk":
                    a, b = torch.chunk(x, 2, dim=1)
                else:
                    a, b = torch.split(x, [layer[0].in_channels, x.shape[1] - layer[0].in_channels], dim=1)
                ya, yb = layer[0](a), layer[1](b)
                x = torch.cat([ya, yb], dim=1) if block[2] == "cat" else F.relu(ya) * torch.sigmoid(yb)
            elif kind == "se":
                scale = torch.sigmoid(layer[1](F.relu(layer[0](x.mean(dim=(2, 3), keepdim=True)))))
                x = x * scale
            elif kind == "ws":
                x = F.relu(layer(x))
            elif kind == "shared":
                x = F.relu(layer(F.relu(layer(x))))
        kind = self.head_kind[0]
        if kind == "flatten":
            return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))
        if kind == "attention":
            tokens = x.flatten(2).transpose(1, 2)
            h = self.norm(tokens)
            tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
            return self.fc(tokens.mean(1))
        x = x.mean(dim=(2, 3))
        if kind == "tied":
            x = self.again(F.relu(self.hidden(x)))
        return self.fc(x)


def _even(c: int) -> bool:
    return c % 2 == 0


@st.composite
def architectures(draw: Any) -> tuple[list[tuple], tuple]:
    """Block descriptors whose channel counts fit together, and a head."""
    widths = st.integers(2, 6).map(lambda n: 2 * n if draw(st.booleans()) else n)
    blocks, c = [], 3
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "residual", "concat", "split", "se", "ws", "shared"]))
        if kind == "conv":
            groups = draw(st.sampled_from(["full", "grouped", "depthwise"]))
            out = draw(widths)
            if groups == "grouped" and not (_even(c) and _even(out)):
                groups = "full"
            block = ("conv", out, draw(st.sampled_from([1, 3])), groups, draw(st.sampled_from(["bn", "gn", "ln", "none"])))
        elif kind == "residual":
            block = ("residual", draw(widths), draw(st.sampled_from(["bn", "gn", "ln", "none"])))
        elif kind == "concat":
            block = ("concat", draw(widths), draw(widths))
        elif kind == "split":
            if c < 2:
                continue
            block = ("split", draw(st.sampled_from(["chunk", "split"])), draw(st.sampled_from(["cat", "gate"])),
                     draw(widths), draw(st.integers(1, c - 1)))
        elif kind == "se":
            block = ("se", draw(st.integers(1, 4)))
        elif kind == "ws":
            block = ("ws", draw(widths))
        else:
            block = ("shared",)
        layer, c = RandomNet._build(block, c)
        blocks.append(block)
    head_kind = draw(st.sampled_from(["pool", "flatten", "attention", "tied"]))
    heads = draw(st.sampled_from([h for h in (1, 2, 3) if c % h == 0]))
    return blocks, (head_kind, draw(st.integers(2, 5)), heads)


def check_architecture(blocks: list[tuple], head: tuple, seed: int) -> None:
    torch.manual_seed(seed)
    model = RandomNet(blocks, head).eval()
    x = torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    TALLY["models"] += 1
    try:
        spec = fusion.permutation_spec(model, x)
    except fusion.FusionError:  # allowed (counted), unlike any other exception
        TALLY["fusion_errors"] += 1
        return
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the spec changed the model"
    TALLY["groups"] += len(spec.groups)
    TALLY.update(f"kind:{s.kind}" for s in spec.skipped)
    if not spec.groups:
        return
    perms = fusion.random_permutation(spec, seed=seed + 1)
    permuted = fusion.permute(model, perms, spec)
    TALLY["params"] += sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    TALLY["moved"] += sum(int((v != permuted.state_dict()[k]).sum()) for k, v in model.state_dict().items()
                          if v.is_floating_point())
    diff = fusion.structural_difference(model, spec, x, perms=perms, seed=seed + 2)
    assert diff <= STRUCTURAL_TOLERANCE, f"wrong spec on {blocks} {head}: structural difference {diff:.2e}"


COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=4, derandomize=True, **COMMON)
@given(arch=architectures(), seed=st.integers(0, 1000))
# Found by the slow test: a random permutation of two units is the identity half of the time, so the
# verifier permutes with a random cycle (every unit moves).
@example(arch=([("ws", 2)], ("pool", 2, 1)), seed=0)
# Found by the slow test: with two samples every ReLU of a 3-unit layer can be dead on a re-drawn copy, so
# nothing depends on the input; the verifier re-draws then, and biases are drawn positive.
@example(arch=([("residual", 2, "bn"), ("residual", 2, "bn")], ("tied", 2, 1)), seed=1)
# Found by the slow test: torch.chunk's two 2-unit halves mapped to the wrong consumers pass when both are
# swapped at once; the verifier also permutes small groups without each other.
@example(arch=([("conv", 4, 1, "full", "bn"), ("split", "chunk", "cat", 2, 1)], ("pool", 2, 1)), seed=1)
def test_random_architectures_get_a_spec_that_is_never_wrong(arch, seed):
    check_architecture(*arch, seed)


@pytest.mark.slow
@settings(max_examples=500, **COMMON)
@given(arch=architectures(), seed=st.integers(0, 10_000))
def test_many_random_architectures_get_a_spec_that_is_never_wrong(arch, seed):
    check_architecture(*arch, seed)
