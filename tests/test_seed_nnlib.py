"""Seed 003 (BONSAI nn-library): fancy regressable layers and graph-module surgery, as its users write them.

Imports change from ``nn_lib.models.fancy_layers`` / ``nn_lib.models`` to ``fusion.layers`` /
``fusion.inspect``. nn-library's ``GraphModulePlus`` methods are plain functions here
(``set_output(graph_module, layer)``, ``merge_graph_modules(...)``); fusion does not patch ``torch.fx``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from torch.fx import symbolic_trace

import fusion
from fusion.errors import FusionError, LayerError
from fusion.inspect import CrossMoments, merge_graph_modules, set_output
from fusion.layers import (
    LowRankConv2d,
    LowRankLinear,
    ProcrustesConv2d,
    ProcrustesLinear,
    Regressable,
    RegressableConv2d,
    RegressableLinear,
)

ALL_LAYERS = [
    lambda: RegressableLinear(6, 5), lambda: LowRankLinear(6, 5, rank=2), lambda: ProcrustesLinear(6, 5),
    lambda: RegressableConv2d(3, 4, 3), lambda: LowRankConv2d(3, 4, 3, rank=2), lambda: ProcrustesConv2d(3, 4, 3),
]


def test_readme_low_rank_conv_model_runs_and_trains() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        LowRankConv2d(in_channels=3, out_channels=64, kernel_size=3, rank=8),
        nn.ReLU(),
        nn.Conv2d(in_channels=64, out_channels=64, kernel_size=3),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(10)
    )
    x, labels = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    assert model(x).shape == (32, 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model[0].down.weight.grad is not None


@pytest.mark.parametrize("make", ALL_LAYERS)
def test_every_fancy_layer_is_regressable_picklable_and_trains(make) -> None:
    torch.manual_seed(1)
    layer = make()
    assert isinstance(layer, Regressable)
    x = torch.randn(4, 6) if isinstance(layer, (RegressableLinear, LowRankLinear, ProcrustesLinear)) else torch.randn(4, 3, 5, 5)
    target = torch.randn_like(layer(x))
    before = copy.deepcopy(layer)
    loss = (layer(x) - target).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in layer.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert (layer(x) - target).square().mean() < loss
    assert not torch.equal(before.weight_matrix(), layer.weight_matrix())
    clone = pickle.loads(pickle.dumps(layer))
    assert torch.equal(clone(x), layer(x))


def test_regressable_linear_fits_a_function_learned_by_another_model_by_least_squares() -> None:
    teacher = nn.Linear(10, 4).double()
    x = torch.randn(200, 10, dtype=torch.float64)
    student = RegressableLinear(10, 4).double().fit(x, teacher(x).detach())
    torch.testing.assert_close(student.weight, teacher.weight)
    torch.testing.assert_close(student.bias, teacher.bias)


def test_streamed_fit_from_moments_equals_the_one_batch_fit() -> None:
    teacher = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    batches = [torch.randn(50, 10, dtype=torch.float64) for _ in range(4)]
    streamed = RegressableLinear(10, 4).double()
    moments = CrossMoments()
    for x in batches:
        streamed.update_moments(moments, x, teacher(x).detach())
    streamed.fit_moments(moments)
    whole = torch.cat(batches)
    once = RegressableLinear(10, 4).double().fit(whole, teacher(whole).detach())
    torch.testing.assert_close(streamed.weight, once.weight)
    solution = torch.linalg.lstsq(torch.cat([whole, torch.ones(200, 1, dtype=torch.float64)], 1), teacher(whole)).solution
    torch.testing.assert_close(once.weight, solution[:-1].T.detach())


def test_low_rank_linear_fit_is_the_best_rank_r_map() -> None:
    x = torch.randn(300, 8, dtype=torch.float64)
    w = torch.randn(6, 8, dtype=torch.float64)
    layer = LowRankLinear(8, 6, rank=3, bias=False).double().fit(x, x @ w.T)
    u, s, vh = torch.linalg.svd(x @ w.T, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(layer(x), best, rtol=1e-6, atol=1e-8)
    assert int(torch.linalg.matrix_rank(layer.weight_matrix().detach())) == 3


@pytest.mark.parametrize(("bias", "scale"), [(True, True), (True, False), (False, True), (False, False)])
def test_procrustes_linear_recovers_rotation_with_optional_shift_and_scale(bias: bool, scale: bool) -> None:
    x = torch.randn(400, 5, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    factor = 2.0 if scale else 1.0
    shift = torch.randn(5, dtype=torch.float64) if bias else torch.zeros(5, dtype=torch.float64)
    layer = ProcrustesLinear(5, 5, bias=bias, scale=scale).double().fit(x, factor * x @ rotation.T + shift)
    torch.testing.assert_close(layer.weight_matrix(), factor * rotation)
    assert (layer.bias is None) == (not bias)


def test_procrustes_between_unequal_widths_is_semi_orthogonal_during_training() -> None:
    layer = ProcrustesLinear(8, 3, scale=False).double()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(5):
        loss = layer(torch.randn(16, 8, dtype=torch.float64)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w = layer.weight_matrix().detach()
    torch.testing.assert_close(w @ w.T, torch.eye(3, dtype=torch.float64))


def test_conv_layers_fit_a_convolution_exactly_from_patches() -> None:
    teacher = nn.Conv2d(3, 5, 3, stride=2, padding=1).double()
    x = torch.randn(40, 3, 9, 9, dtype=torch.float64)
    y = teacher(x).detach()
    dense = RegressableConv2d(3, 5, 3, stride=2, padding=1).double().fit(x, y)
    torch.testing.assert_close(dense.weight, teacher.weight)
    low = LowRankConv2d(3, 5, 3, rank=5, stride=2, padding=1).double().fit(x, y)
    torch.testing.assert_close(low(x), y)
    rotated = ProcrustesConv2d(3, 5, 3, stride=2, padding=1).double()
    assert ProcrustesConv2d(3, 5, 3, stride=2, padding=1).double().fit(x, rotated(x).detach()).weight_matrix().shape == (5, 27)


def test_bad_rank_and_mismatched_targets_are_rejected() -> None:
    with pytest.raises(LayerError, match=r"rank must be an int in 1\.\.4"):
        LowRankLinear(6, 4, rank=5)
    with pytest.raises(FusionError, match="targets"):
        RegressableConv2d(3, 4, 3).fit(torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6))


# ------------------------------------------------------------------------------------- graph modules
def _cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_set_output_chops_off_the_head_of_a_traced_model() -> None:
    model = _cnn()
    graphified_model = symbolic_trace(model)
    x = torch.randn(2, 3, 8, 8)
    body = set_output(graphified_model, "2")
    assert torch.equal(body(x), model[:3](x))
    assert not hasattr(body, "5") and hasattr(graphified_model, "5")
    assert torch.equal(set_output(model, "3")(x), model[:4](x))


def test_merge_graph_modules_stitches_two_models_with_a_fitted_layer() -> None:
    torch.manual_seed(2)
    model_a, model_b = _cnn().eval(), _cnn().eval()
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        hidden_a, hidden_b = set_output(model_a, "1")(x), set_output(model_b, "1")(x)
    stitch_layer = RegressableConv2d(8, 8, 1).fit(hidden_a, hidden_b)
    stitched = merge_graph_modules(
        {"a": model_a, "stitch": stitch_layer, "b": model_b},
        {"stitch": "a.1", "b.1": "stitch"},
    )
    with torch.no_grad():
        torch.testing.assert_close(stitched(x), model_b[2:](stitch_layer(model_a[:2](x))))
    assert {n.split(".")[0] for n, _ in stitched.named_modules() if n} == {"a", "stitch", "b"}
    assert not hasattr(stitched.b, "0")


def test_merge_graph_modules_rejects_cycles_and_unknown_names() -> None:
    with pytest.raises(FusionError, match="cycle"):
        merge_graph_modules({"a": _cnn(), "b": _cnn()}, {"a": "b", "b": "a"})
    with pytest.raises(FusionError, match="names no model"):
        merge_graph_modules({"a": _cnn()}, {"a.1": "z"})


def test_low_rank_layers_are_two_plain_layers_whose_rank_units_permute() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(LowRankConv2d(3, 16, 3, rank=4), nn.ReLU(), RegressableConv2d(16, 8, 3), nn.ReLU(),
                          nn.Flatten(), LowRankLinear(8 * 4 * 4, 12, rank=5), nn.ReLU(), nn.Linear(12, 10)).double().eval()
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    spec = fusion.permutation_spec(model, x)
    assert {(g.name, g.size) for g in spec.groups} >= {("0.down", 4), ("0.up", 16), ("5.down", 5)}
    permuted = fusion.permute(model, fusion.random_permutation(spec, seed=1), spec)
    assert fusion.verify_equivalence(model, permuted, x) < 1e-12


def test_fusion_layers_imports_first_in_a_fresh_interpreter():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import fusion.layers"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
