"""Every torchvision classification model: a random full permutation keeps the function.

The default run checks a fast subset; ``-m slow`` runs the whole zoo. BatchNorm statistics are
made non-trivial first (random affine parameters, a few train-mode passes).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import EQUIV_TOL
from hand_models import randomize_bn

import fusion

#: Models whose parameter elements must be >= 95% moved by a random permutation.
HIGH_COVERAGE = ("resnet", "wide_resnet", "vgg", "mobilenet", "convnext", "densenet", "efficientnet", "regnet")
FAST = ["resnet18", "mobilenet_v3_small", "squeezenet1_1", "regnet_x_400mf", "efficientnet_b0"]
BIG_INPUT = ("vit", "swin", "maxvit")
OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": False},
           "inception_v3": {"aux_logits": False, "init_weights": False}}


#: torch-pruning's index mapping explodes on MaxViT's window partitions (>10 GiB); permutation_spec
#: stops it with a TraceError after minutes (see fusion/guard.py), too slow even for the slow suite.
EXPLODES = {
    name: "torch-pruning 1.6 cannot trace window attention: its index mapping explodes or fails (TraceError)"
    for name in ["maxvit_t", "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"]
}
#: torch-pruning 1.6 cannot trace channel shuffle at all: the spec must refuse, never guess.
UNTRACEABLE = ("shufflenet",)


def zoo() -> list:
    names = torchvision.models.list_models(module=torchvision.models)
    params = []
    for name in sorted(names):
        if name.startswith(UNTRACEABLE):
            continue
        marks = [pytest.mark.slow] if name not in FAST else []
        if name in EXPLODES:
            marks.append(pytest.mark.skip(reason=EXPLODES[name]))
        params.append(pytest.param(name, marks=marks))
    return params


#: Models over this many parameters are left to the zoo experiment (ex04 --max-params).
MAX_PARAMS = 200_000_000


@pytest.mark.parametrize("name", zoo())
def test_random_permutation_preserves_function(name):
    size = 224 if name.startswith(BIG_INPUT) else (96 if name == "inception_v3" else 64)
    x = torch.randn(2, 3, size, size)
    model = torchvision.models.get_model(name, num_classes=10, **OPTIONS.get(name, {}))
    if sum(p.numel() for p in model.parameters()) > MAX_PARAMS:
        pytest.skip(f"{name} has over {MAX_PARAMS // 10**6}M parameters")
    randomize_bn(model, x, steps=2)
    coverage = fusion.permutation_coverage(model, x, seed=1, label=name)
    if coverage.max_rel_diff > EQUIV_TOL:
        # Very deep, wide float32 nets (wide_resnet101_2: 1.5e-5) exceed the bound from summation
        # order alone; in float64 a correct permutation is exact to rounding.
        model, x = model.double(), x.double()
        spec = fusion.permutation_spec(model, x)
        permuted = fusion.permute(model, fusion.random_permutation(spec, seed=1), spec)
        assert fusion.verify_equivalence(model, permuted, x) <= 1e-10, coverage
    assert coverage.groups > 0
    if name.startswith(HIGH_COVERAGE):
        assert coverage.params_changed >= 0.95, coverage


def test_channel_shuffle_is_refused_with_a_trace_error():
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    with pytest.raises(fusion.TraceError, match="ShuffleNetV2"):
        fusion.permutation_spec(model, torch.randn(2, 3, 64, 64))
