"""Specification of fusion.analysis.ntk: empirical NTK, spectrum, alignment and the NTK along a path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion.analysis.ntk import empirical_ntk, kernel_alignment, ntk_alignment, ntk_eigenvalues, ntk_path
from fusion.errors import DataError


def _tiny(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _finite_difference_jacobian(model: nn.Module, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(n, out, parameters) Jacobian by central differences, parameter by parameter."""
    params = [p for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    columns = []
    for k in range(flat.numel()):
        outputs = []
        for sign in (1.0, -1.0):
            shifted = flat.clone()
            shifted[k] += sign * eps
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(shifted, params)
                outputs.append(model(x))
        columns.append((outputs[0] - outputs[1]) / (2 * eps))
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, params)
    return torch.stack(columns, -1)


def test_full_ntk_equals_finite_difference_jacobian_products() -> None:
    model = _tiny()
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    j1, j2 = _finite_difference_jacobian(model, x1), _finite_difference_jacobian(model, x2)
    full = empirical_ntk(model, x1, x2, reduce="full")
    assert full.shape == (4, 3, 2, 2)
    torch.testing.assert_close(full, torch.einsum("naf,mbf->nmab", j1, j2), rtol=1e-7, atol=1e-8)


def test_trace_ntk_is_the_trace_of_each_block() -> None:
    model = _tiny()
    x = torch.randn(5, 3, dtype=torch.float64)
    full = empirical_ntk(model, x, reduce="full")
    trace = empirical_ntk(model, x)
    assert trace.shape == (5, 5)
    torch.testing.assert_close(trace, full.diagonal(dim1=2, dim2=3).sum(-1))
    torch.testing.assert_close(trace, trace.T)


def test_ntk_leaves_a_train_mode_batchnorm_model_untouched() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    empirical_ntk(model, torch.randn(6, 3))
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eigenvalues_are_nonnegative_descending_and_sum_to_the_trace() -> None:
    model = _tiny()
    kernel = empirical_ntk(model, torch.randn(6, 3, dtype=torch.float64), reduce="full")
    values = ntk_eigenvalues(kernel)
    assert values.shape == (12,)
    assert torch.all(values[:-1] >= values[1:]) and values.min() > -1e-9
    torch.testing.assert_close(values.sum(), kernel.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).sum().double())


def test_alignment_is_one_for_proportional_kernels_and_below_one_otherwise() -> None:
    x = torch.randn(6, 3, dtype=torch.float64)
    kernel = empirical_ntk(_tiny(0), x)
    assert kernel_alignment(kernel, 3.0 * kernel) == pytest.approx(1.0)
    assert ntk_alignment(_tiny(0), _tiny(1), x) < 0.999
    assert ntk_alignment(_tiny(0), _tiny(0), x, centered=True) == pytest.approx(1.0)


def test_ntk_path_starts_at_a_and_ends_at_b() -> None:
    x = torch.randn(5, 3, dtype=torch.float64)
    path = ntk_path(_tiny(0), _tiny(1), x, alphas=3)
    assert path.alphas == (0.0, 0.5, 1.0)
    assert path.distance_to_a[0] == pytest.approx(0.0, abs=1e-12) and path.distance_to_b[-1] == pytest.approx(0.0, abs=1e-12)
    assert path.distance_to_a[-1] > 0 and path.distance_to_b[0] > 0
    assert all(t > 0 for t in path.trace)


def test_bad_reduce_and_empty_inputs_are_rejected() -> None:
    with pytest.raises(DataError, match="reduce must be one of"):
        empirical_ntk(_tiny(), torch.randn(2, 3, dtype=torch.float64), reduce="diag")
    with pytest.raises(DataError, match="non-empty batch"):
        empirical_ntk(_tiny(), torch.randn(0, 3, dtype=torch.float64))
