"""Merging fine-tunes of one base: kernels, parameters, configs, the in-memory API and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from hand_models import MLP
from torch import nn

import fusion
from fusion.merging.methods import METHODS, MergeInputs
from fusion.merging.params import evaluate_setting
from fusion.merging.sparsify import keep_largest, keep_middle, keep_random


def _inputs(method: str, tensors, shared=None, per_input=None, generator=None) -> torch.Tensor:
    spec = METHODS[method]
    defaults = {p.name: p.default for p in spec.parameters if not p.required}
    shared = {**{k: v for k, v in defaults.items() if spec.parameter(k).scope == "shared"}, **(shared or {})}
    per_input = per_input or [{} for _ in tensors]
    per_input = [{**{k: v for k, v in defaults.items() if spec.parameter(k).scope != "shared"}, **p} for p in per_input]
    return spec.kernel(MergeInputs(tensors, spec.needs_base, shared, per_input, generator))


def _family(count: int = 3, scale: float = 0.05, seed: int = 0) -> tuple[nn.Module, list[nn.Module]]:
    """A base and fine-tunes sharing part of their update (as fine-tunes of one base do)."""
    torch.manual_seed(seed)
    base = MLP()
    shared = {name: scale * torch.randn_like(p) for name, p in base.named_parameters()}
    tunes = []
    for _ in range(count):
        tune = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in tune.named_parameters():
                p.add_(shared[name] + scale * torch.randn_like(p))
        tunes.append(tune)
    return base, tunes


# ---- kernels ---------------------------------------------------------------------------------

def test_task_arithmetic_adds_weighted_task_vectors_scaled_by_lambda():
    base, a, b = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    out = _inputs("task_arithmetic", [base, a, b], {"lambda": 0.5},
                  [{}, {"weight": 0.7}, {"weight": -0.2}])
    torch.testing.assert_close(out, base + 0.5 * (0.7 * (a - base) - 0.2 * (b - base)))


def test_ties_keeps_only_entries_agreeing_with_the_elected_sign():
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    b = torch.tensor([-3.0, -1.0, 1.0, 0.5])
    out = _inputs("ties", [base, a, b], None, [{}, {"weight": 1.0}, {"weight": 1.0}])
    # entry 0: sum -2 -> elect '-', only b agrees; entry 1: both '-', mean; entry 2: both '+'
    torch.testing.assert_close(out, torch.tensor([-3.0, -1.5, 2.0, 0.5]))


def test_linear_normalises_weights_by_their_sum():
    a, b = torch.randn(3, 3), torch.randn(3, 3)
    out = _inputs("linear", [a, b], None, [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, 0.25 * a + 0.75 * b)


def test_slerp_returns_the_endpoints_and_stays_on_the_sphere():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for t, expected in ((0.0, v0), (1.0, v1), (0.5, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))):
        torch.testing.assert_close(_inputs("slerp", [v0, v1], {"t": t}), expected)


def test_slerp_falls_back_to_linear_for_collinear_vectors():
    v0 = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(_inputs("slerp", [v0, 2 * v0], {"t": 0.25}), 1.25 * v0)


def test_model_stock_interpolates_by_the_angle_formula():
    base = torch.zeros(2)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5 * 3 ** 0.5])  # 60 degrees: cos = 0.5
    t = 2 * 0.5 / (1 + 0.5)
    torch.testing.assert_close(_inputs("model_stock", [base, w1, w2]), t * (w1 + w2) / 2)


def test_keep_largest_keeps_the_density_fraction_of_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, 1.0])
    torch.testing.assert_close(keep_largest(x, 0.25), torch.tensor([0, -5.0, 0, 0, 0, 0, 4.0, 0]))


def test_keep_largest_keeps_exactly_k_entries_when_magnitudes_tie():
    x = torch.tensor([3.0, -1.0, 1.0, 1.0, -1.0, 0.5])
    out = keep_largest(x, 0.5)
    assert int((out != 0).sum()) == 3 and out[0] == 3.0 and set(out[out != 0].abs().tolist()) == {3.0, 1.0}


def test_keep_middle_drops_the_gamma_outliers_then_the_smallest():
    x = torch.arange(1.0, 101.0)
    out = keep_middle(x, density=0.5, gamma=0.1)
    kept = x[out != 0]
    assert kept.tolist() == list(range(41, 91))


def test_random_drop_keeps_the_density_fraction_and_rescales_to_the_l1_norm():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1))  # not the mask's stream
    g = torch.Generator().manual_seed(0)
    out = keep_random(x, 0.3, rescale=True, generator=g)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.3) < 4 * (0.3 * 0.7 / x.numel()) ** 0.5
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    ratio = (out[out != 0] / x[out != 0])
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    assert ratio[0].item() == pytest.approx(1 / 0.3, rel=0.03)  # L1 rescaling ~ DARE's 1/density


# ---- parameters --------------------------------------------------------------------------------

def test_gradient_interpolates_linearly_over_layer_position():
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)


def test_first_matching_filter_wins_and_a_filterless_entry_is_the_fallback():
    setting = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": 0.2}, {"value": 0.9}]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0) == 0.2
    assert evaluate_setting(setting, "lm_head.weight", 0) == 0.9


def test_per_filter_t_reaches_the_matching_tensors_in_the_api():
    base, (tune,) = _family(1)
    out = fusion.merge_task_vectors(base, [tune], "slerp",
                                    parameters={"t": [{"filter": "layers.0", "value": 1.0}, {"value": 0.0}]})
    torch.testing.assert_close(out.layers[0].weight, tune.layers[0].weight)
    torch.testing.assert_close(out.layers[2].weight, base.layers[2].weight)


# ---- the in-memory API ----------------------------------------------------------------------------

def test_merge_task_vectors_returns_a_new_model_and_leaves_inputs_untouched():
    base, tunes = _family()
    before = [copy.deepcopy(m.state_dict()) for m in (base, *tunes)]
    out = fusion.merge_task_vectors(base, tunes, "ties", density=0.5)
    assert out is not base
    for model, state in zip((base, *tunes), before):
        for name, value in model.state_dict().items():
            assert torch.equal(value, state[name])


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"passthrough", "slerp"}))
def test_every_method_moves_the_base_towards_the_fine_tunes(method):
    base, tunes = _family()
    weights = [1 / 3] * 3 if METHODS[method].parameter("weight") else None  # unnormalised methods sum
    out = fusion.merge_task_vectors(base, tunes, method, weights=weights)
    mean = torch.stack([t.layers[0].weight for t in tunes]).mean(0)
    assert (out.layers[0].weight - mean).norm() < (base.layers[0].weight - mean).norm()


def test_same_seed_gives_the_same_dare_merge_and_another_seed_another():
    base, tunes = _family()
    a = fusion.merge_task_vectors(base, tunes, "dare_ties", density=0.5, seed=3)
    b = fusion.merge_task_vectors(base, tunes, "dare_ties", density=0.5, seed=3)
    c = fusion.merge_task_vectors(base, tunes, "dare_ties", density=0.5, seed=4)
    assert torch.equal(a.layers[0].weight, b.layers[0].weight)
    assert not torch.equal(a.layers[0].weight, c.layers[0].weight)


def test_align_first_recovers_a_ties_merge_when_a_member_is_a_hidden_permutation():
    base, tunes = _family(2, scale=0.02)
    example = torch.randn(2, 8)
    spec = fusion.permutation_spec(base, example)
    hidden = fusion.permute(tunes[1], fusion.random_permutation(spec, seed=1), spec)
    reference = fusion.merge_task_vectors(base, tunes, "ties", density=0.5)
    naive = fusion.merge_task_vectors(base, [tunes[0], hidden], "ties", density=0.5)
    aligned = fusion.merge_task_vectors(base, [tunes[0], hidden], "ties", density=0.5, align_first=True,
                                        example_inputs=example)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(aligned.state_dict()[name], value, atol=1e-6, rtol=0)
    assert (naive.layers[0].weight - reference.layers[0].weight).abs().max() > 0.1


# ---- bad input -------------------------------------------------------------------------------------

def test_task_vector_methods_refuse_a_missing_base():
    _, tunes = _family()
    with pytest.raises(fusion.MergeConfigError, match="needs a base"):
        fusion.merge_task_vectors(None, tunes, "ties")


def test_weights_of_the_wrong_length_are_refused():
    base, tunes = _family()
    with pytest.raises(fusion.MergeConfigError, match="weights has 2 entries but there are 3 models"):
        fusion.merge_task_vectors(base, tunes, "task_arithmetic", weights=[1.0, 1.0])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_densities_outside_zero_one_are_refused(density):
    base, tunes = _family()
    with pytest.raises(fusion.MergeConfigError, match="density"):
        fusion.merge_task_vectors(base, tunes, "ties", density=density)


def test_mismatched_shapes_are_refused_naming_the_tensor():
    base, tunes = _family()
    with pytest.raises(fusion.ArchitectureMismatchError, match="layers.0.weight"):
        fusion.merge_task_vectors(base, [tunes[0], MLP((8, 20, 12, 4))], "ties")


def test_non_finite_weights_are_refused_naming_model_and_tensor():
    base, tunes = _family()
    with torch.no_grad():
        tunes[1].layers[2].bias[0] = float("nan")
    with pytest.raises(fusion.NonFiniteWeightsError, match="layers.2.bias.*model1"):
        fusion.merge_task_vectors(base, tunes, "ties")


def test_slerp_needs_exactly_one_model_besides_the_base():
    base, tunes = _family()
    with pytest.raises(fusion.MergeConfigError, match="exactly 2"):
        fusion.merge_task_vectors(base, tunes, "slerp", t=0.5)


def test_unknown_methods_and_parameters_are_named():
    base, tunes = _family()
    with pytest.raises(fusion.MergeConfigError, match="unknown merge method 'tie'"):
        fusion.merge_task_vectors(base, tunes, "tie")
    with pytest.raises(fusion.MergeConfigError, match="unknown parameter 'lambda' for merge method 'linear'"):
        fusion.merge_task_vectors(base, tunes, "linear", lambda_=2.0)
