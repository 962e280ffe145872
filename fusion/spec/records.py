"""The records of a permutation spec: groups of coupled tensor axes, refused groups, the spec."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import PermutationError, SpecMismatchError

__all__ = ["AxisMember", "PermutationGroup", "PermutationSpec", "SkippedGroup", "SKIP_KINDS"]

#: Why a set of units is left in place (:attr:`SkippedGroup.kind`), with what each kind means.
SKIP_KINDS: dict[str, str] = {
    "output": "the units are the model's output (never permuted, by design)",
    "ignored": "the caller listed the layer in ignored_layers",
    "unread": "no layer reads the units",
    "unsupported": "a layer or construct without a permutation rule",
    "unmapped": "torch-pruning's index mapping is out of range, inconsistent or partial",
    "unmoved tensor": "a tensor indexed by the units is moved by no rule",
    "verification": "a random permutation changed the function of the float64 structural copy",
    "trace": "tracing, grouping or verifying raised an error in third-party code",
}


@dataclass(frozen=True, eq=False)
class AxisMember:
    """One tensor axis moved by a permutation group.

    Attributes:
        name: state-dict key of the parameter or buffer.
        axis: the axis of that tensor which the group permutes.
        index: LongTensor of shape ``(size, block)``; row ``u`` lists the positions along ``axis``
            that unit ``u`` of the group occupies.
    """

    name: str
    axis: int
    index: torch.Tensor

    @property
    def block(self) -> int:
        """How many positions along the axis one unit occupies."""
        return int(self.index.shape[1])

    def __iter__(self) -> Iterator[Any]:
        # Allows ``for name, axis in group.members``.
        return iter((self.name, self.axis))

    def __repr__(self) -> str:
        return f"AxisMember({self.name!r}, axis={self.axis}, block={self.block})"


@dataclass(frozen=True, eq=False)
class PermutationGroup:
    """A set of tensor axes that one permutation must move together.

    Attributes:
        name: stable name, derived from the first layer (in module order) producing the units.
        size: number of units (the length of a permutation of this group).
        members: every ``(name, axis)`` the group moves, with its unit-to-position index.
        producers: module (or parameter) names whose outputs are these units.
        consumers: module names that read these units as inputs.
        kind: ``"channels"`` for ordinary hidden units, ``"heads"``, ``"head_qk"`` or ``"head_v"``
            for attention groups.
    """

    name: str
    size: int
    members: tuple[AxisMember, ...]
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    kind: str = "channels"

    @property
    def axes(self) -> tuple[tuple[str, int], ...]:
        """The ``(parameter or buffer name, axis)`` pairs moved by this group."""
        return tuple((m.name, m.axis) for m in self.members)

    def __repr__(self) -> str:
        return f"PermutationGroup({self.name!r}, size={self.size}, members={len(self.members)})"


@dataclass(frozen=True)
class SkippedGroup:
    """Units that are left unpermuted, and why.

    Attributes:
        name: the layer (or group) producing the units.
        size: number of units.
        reason: a sentence for people.
        kind: a key of :data:`SKIP_KINDS`, for programs (coverage counts from it, never from ``reason``).
    """

    name: str
    size: int
    reason: str
    kind: str = "unsupported"

    def __post_init__(self) -> None:
        if self.kind not in SKIP_KINDS:
            raise ValueError(f"unknown skip kind {self.kind!r}; expected one of {sorted(SKIP_KINDS)}")


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """The permutation symmetries of one architecture.

    Computed once per architecture by :func:`permutation_spec` and valid for every model whose
    state dict has the same keys and shapes.

    Attributes:
        groups: the permutation groups, in the model's module order.
        skipped: hidden-unit sets that could not be permuted safely, each with a reason.
        shapes: state-dict key -> shape of the architecture the spec was built for.
        architecture: class name of the model.
    """

    groups: tuple[PermutationGroup, ...]
    skipped: tuple[SkippedGroup, ...]
    shapes: dict[str, tuple[int, ...]]
    architecture: str
    _by_name: dict[str, PermutationGroup] = field(default_factory=dict, repr=False)
    _by_tensor: dict[str, list[tuple[PermutationGroup, AxisMember]]] = field(default_factory=dict, repr=False)

    _position: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for i, group in enumerate(self.groups):
            self._position[group.name] = i
            self._by_name[group.name] = group
            for member in group.members:
                self._by_tensor.setdefault(member.name, []).append((group, member))

    @property
    def names(self) -> list[str]:
        """Group names in order."""
        return [g.name for g in self.groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[PermutationGroup]:
        return iter(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> PermutationGroup:
        return self.group(name)

    def group(self, name: str) -> PermutationGroup:
        """The group called ``name``; raises :class:`PermutationError` listing close names if absent."""
        try:
            return self._by_name[name]
        except KeyError:
            close = [n for n in self._by_name if name.split(".")[0] in n][:5]
            hint = f"; similar names: {close}" if close else ""
            raise PermutationError(f"no permutation group named {name!r} in this spec{hint}") from None

    def position(self, name: str) -> int:
        """Index of group ``name`` in :attr:`groups` (permutations are applied in this order)."""
        return self._position[name]

    def members_of(self, tensor_name: str) -> list[tuple[PermutationGroup, AxisMember]]:
        """Every ``(group, member)`` that moves an axis of the tensor called ``tensor_name``."""
        return list(self._by_tensor.get(tensor_name, ()))

    @property
    def permuted_tensors(self) -> list[str]:
        """State-dict keys of all tensors that some group moves."""
        return list(self._by_tensor)

    def group_of_layer(self, layer: str) -> PermutationGroup:
        """The group whose units are the outputs of module ``layer``.

        Raises:
            PermutationError: if ``layer`` produces no permutable group (unknown name, the model's
                output layer, or a refused group).
        """
        for group in self.groups:
            if layer in group.producers and group.kind == "channels":
                return group
        for skipped in self.skipped:
            if skipped.name == layer:
                raise PermutationError(f"layer {layer!r} produces no permutable units: {skipped.reason}")
        known = sorted({p for g in self.groups for p in g.producers})
        if not any(key.startswith(layer + ".") for key in self.shapes):
            raise PermutationError(
                f"no layer named {layer!r} in {self.architecture}; permutable layers: {known[:8]}..."
            )
        raise PermutationError(
            f"layer {layer!r} produces no permutable group (it may be the output layer or only consume "
            f"permuted units); permutable layers include {known[:8]}"
        )

    def check_state_dict(self, state: dict[str, torch.Tensor], argument: str = "model") -> None:
        """Raise :class:`SpecMismatchError` unless ``state`` has this spec's keys and shapes."""
        for key, shape in self.shapes.items():
            if key not in state:
                raise SpecMismatchError(
                    f"{argument} has no tensor {key!r}: the spec was built for another architecture "
                    f"({self.architecture})"
                )
            if tuple(state[key].shape) != shape:
                raise SpecMismatchError(
                    f"{argument}: {key!r} has shape {tuple(state[key].shape)} but the spec expects {shape} "
                    f"(built for {self.architecture}); build a spec for this model"
                )
        extra = [k for k in state if k not in self.shapes]
        if extra:
            raise SpecMismatchError(
                f"{argument} has tensor {extra[0]!r} unknown to the spec (built for {self.architecture})"
            )

    def check_model(self, model: nn.Module, argument: str = "model") -> None:
        """Raise :class:`SpecMismatchError` unless ``model`` has this spec's architecture."""
        self.check_state_dict(model.state_dict(), argument)

    def summary(self) -> str:
        """A human-readable table of groups and skipped units."""
        lines = [f"PermutationSpec for {self.architecture}: {len(self.groups)} groups, {len(self.skipped)} skipped"]
        width = max([len(g.name) for g in self.groups] + [10])
        lines.append(f"  {'group':<{width}}  {'size':>6}  {'kind':<9} tensors")
        for g in self.groups:
            lines.append(f"  {g.name:<{width}}  {g.size:>6}  {g.kind:<9} {len(g.members)}")
        for s in self.skipped:
            lines.append(f"  skipped {s.name} ({s.size}) [{s.kind}]: {s.reason}")
        return "\n".join(lines)

