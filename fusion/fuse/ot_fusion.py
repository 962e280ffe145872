"""OT fusion (Singh & Jaggi, "Model Fusion via Optimal Transport", NeurIPS 2020).

Layer by layer, each model's units are transported onto the first model's units (exact or
Sinkhorn plans from weights or activations; the maps of earlier layers carried into the next
layer's inputs), then the transported models are averaged. Built on the permutation spec, so
skip connections, BatchNorm, biases and members of unequal width are handled; the target width
is the first model's.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..align import align
from ..checks import check_finite, check_same_device
from ..errors import DataError, EnsembleError
from ..spec import PermutationSpec
from .average import average_state_dicts
from .norm import reset_bn_stats

__all__ = ["ot_fusion"]


def ot_fusion(
    models: Sequence[nn.Module],
    example_inputs: Any = None,
    data: Any = None,
    cost: str = "weight",
    reg: float | None = None,
    weights: Sequence[float] | None = None,
    reset_bn: bool = False,
    progress: bool = True,
    spec: PermutationSpec | None = None,
) -> nn.Module:
    """Fuse ``models`` into one model of ``models[0]``'s architecture and width by optimal transport.

    Args:
        models: two or more models of one architecture family (widths may differ; never modified).
        example_inputs: inputs to trace the architectures (or pass ``data``).
        data: batches; needed for ``cost="activation"`` and ``reset_bn``.
        cost: ``"weight"`` or ``"activation"`` ground cost.
        reg: None for the exact solver (``ot.emd``), or the entropic regularisation of
            ``ot.sinkhorn``.
        weights: averaging weights of the transported models (default uniform).
        reset_bn: recompute BatchNorm statistics of the fused model on ``data``.
        progress: show progress bars.
        spec: a precomputed spec of ``models[0]``.

    Returns:
        The fused model (a new copy of ``models[0]``'s architecture).

    Raises:
        EnsembleError: fewer than two models, or bad weights.
        AlignmentError, ArchitectureMismatchError, DeviceMismatchError, NonFiniteWeightsError, DataError.
    """
    models = list(models)
    if len(models) < 2:
        raise EnsembleError(f"ot_fusion needs at least two models, got {len(models)}")
    names = [f"models[{i}]" for i in range(len(models))]
    check_same_device(models, names)
    for model, name in zip(models, names):
        check_finite(model, name)
    if reset_bn and data is None:
        raise DataError("reset_bn needs calibration data")
    solver, strength = ("emd", 0.0) if reg is None else ("sinkhorn", float(reg))
    transported = [models[0].state_dict()]
    for model in models[1:]:
        result = align(models[0], model, example_inputs, method="ot", data=data, cost=cost, solver=solver,
                       reg=strength, progress=progress, spec=spec)
        spec = result.spec
        transported.append(result.model.state_dict())
    fused = copy.deepcopy(models[0])
    fused.load_state_dict(average_state_dicts(transported, weights))
    if reset_bn:
        fused = reset_bn_stats(fused, data, progress=progress, inplace=True)
    return fused
