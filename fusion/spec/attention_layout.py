"""The head layout of one attention layer: where each head and dimension lives in its tensors.

An :class:`AttentionLayout` names, for one attention layer, the q/k/v rows of its projections, the
input columns of its output projection and any per-head tables, each as ``(heads, dims)`` positions.
It is read off the dependency matrices that :mod:`fusion.spec.attention_probe` measures, whatever
the fusion or interleaving of q, k and v:

* a value row feeds one column per query head of its block (``o`` column ``(h, d)``),
* a query row feeds every column of its head, a key row every column of its block of query
  heads (grouped-query attention when a block holds several heads),
* a bias-table entry feeds the columns of one head.

Rotary embeddings are found from their ``inv_freq`` buffers. ``nn.MultiheadAttention``, whose
projections are not called as modules, gets its layout from its packed ``in_proj`` instead.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from .hf_layers import linear_axes

# --------------------------------------------------------------------------------------------
# The layout of one attention layer
# --------------------------------------------------------------------------------------------

#: One tensor axis holding one role: (state-dict key, axis, positions of shape (heads, dims)).
Slots = tuple[tuple[str, int, torch.Tensor], ...]


@dataclass(frozen=True)
class AttentionLayout:
    """Where each head and dimension of one attention layer lives.

    Attributes:
        name: the attention layer (common prefix of its projections' module names).
        query: q positions, each ``(heads, qk_dim)``.
        key: k positions, each ``(kv_heads, qk_dim)``.
        value: v positions, each ``(kv_heads, v_dim)``.
        output: ``o`` input positions, each ``(heads, v_dim)``.
        tables: per-head tensors (relative-position bias), each position ``(heads, 1)``.
        rotary: how many leading query/key dims of each head a rotary embedding rotates.
        qk_note: why query/key dims are not permuted at all ('' if they are).
        v_note: why value dims are not permuted ('' if they are).
        producers: module names of the projections; consumers: the output projection.
    """

    name: str
    query: Slots
    key: Slots
    value: Slots
    output: Slots
    tables: Slots = ()
    rotary: int = 0
    qk_note: str = ""
    v_note: str = ""
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()

    @property
    def heads(self) -> int:
        return int(self.output[0][2].shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.value[0][2].shape[0])

    @property
    def qk_dim(self) -> int:
        return int(self.query[0][2].shape[1])

    @property
    def v_dim(self) -> int:
        return int(self.value[0][2].shape[1])

    @property
    def internal_axes(self) -> set[tuple[str, int]]:
        """Every (tensor, axis) whose positions are head dimensions."""
        return {(k, a) for slots in (self.query, self.key, self.value, self.output) for k, a, _ in slots}


def _projection_slots(key: str, module: nn.Module, rows: torch.Tensor, canonical: dict[str, str]) -> list:
    out_axis, _ = linear_axes(module)
    slots = [(canonical.get(f"{key}.weight", f"{key}.weight"), out_axis, rows)]
    if getattr(module, "bias", None) is not None:
        slots.append((canonical.get(f"{key}.bias", f"{key}.bias"), 0, rows))
    return slots


def multihead_attention_layout(name: str, mha: nn.MultiheadAttention, canonical: dict[str, str]) -> AttentionLayout | None:
    """The layout of ``nn.MultiheadAttention`` from its packed ``in_proj`` ([q; k; v] rows)."""
    if not mha._qkv_same_embed_dim:
        return None

    def key(local: str) -> str:
        full = f"{name}.{local}"
        return canonical.get(full, full)

    e, h = mha.embed_dim, mha.num_heads
    heads = torch.arange(e).reshape(h, e // h)
    roles = []
    for offset, extra in ((0, None), (e, "bias_k"), (2 * e, "bias_v")):
        slots = [(key("in_proj_weight"), 0, heads + offset)]
        if mha.in_proj_bias is not None:
            slots.append((key("in_proj_bias"), 0, heads + offset))
        if extra and getattr(mha, extra) is not None:
            slots.append((key(extra), 2, heads))
        roles.append(tuple(slots))
    return AttentionLayout(name, roles[0], roles[1], roles[2], ((key("out_proj.weight"), 1, heads),),
                           producers=(name,), consumers=(name,))


# --------------------------------------------------------------------------------------------
# From dependencies to a layout
# --------------------------------------------------------------------------------------------


class NoLayout(Exception):
    """The dependency pattern is not one the head groups describe (the layer is refused)."""


def rotary_dims(model: nn.Module) -> int | None:
    """Rotated query/key dims per head, from rotary embeddings' ``inv_freq`` buffers (None: none)."""
    sizes = {int(b.numel()) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] == "inv_freq"}
    if not sizes:
        return None
    return 2 * max(sizes) if len(sizes) == 1 else -1


def layout_from_dependencies(name: str, out_name: str, out_module: nn.Module,
                              projections: list[tuple[str, nn.Module, torch.Tensor]],
                              tables: list[tuple[str, torch.Tensor]], others: list[str],
                              canonical: dict[str, str], rotary: int | None) -> AttentionLayout:
    """Read q/k/v rows, o columns and per-head tables off the dependency matrices."""
    rows = []  # (projection index, row, frozenset of o columns)
    for p, (_, _, dep) in enumerate(projections):
        for r in range(dep.shape[1]):
            cols = frozenset(torch.nonzero(dep[:, r]).flatten().tolist())
            if cols:
                rows.append((p, r, cols))
    by_set: dict[frozenset, list[tuple[int, int]]] = defaultdict(list)
    for p, r, cols in rows:
        by_set[cols].append((p, r))
    multi = {s: rs for s, rs in by_set.items() if len(rs) > 1}
    single = [(rs[0], s) for s, rs in by_set.items() if len(rs) == 1]
    if not multi or not single:
        raise NoLayout("no query/key rows or no value rows found")
    head_sets = [s for s in multi if not any(o < s for o in multi)]
    head_sets.sort(key=min)
    covered = sorted(c for s in head_sets for c in s)
    if len(covered) != len(set(covered)):
        raise NoLayout("query heads overlap in the output projection's columns")
    heads = len(head_sets)
    v_dim = len(head_sets[0])
    if any(len(s) != v_dim for s in head_sets):
        raise NoLayout("heads of unequal value width")
    head_of_col = {c: h for h, s in enumerate(head_sets) for c in s}
    out_cols = torch.tensor([sorted(s) for s in head_sets])  # (heads, v_dim)

    # key blocks: sets that are unions of several head sets (grouped-query attention)
    block_sets = [s for s in multi if s not in head_sets]
    for s in block_sets:
        if not all(c in head_of_col for c in s) or len(s) % v_dim:
            raise NoLayout("a key row reaches part of a head")
    proj_key = [key for key, _, _ in projections]
    proj_mod = [m for _, m, _ in projections]

    def slots(members: list[list[tuple[int, int]]]) -> Slots:
        """(heads, dims) positions per projection tensor; every head's rows in one projection."""
        per_proj = {p for unit in members for p, _ in unit}
        if len(per_proj) != 1:
            raise NoLayout("one role is spread over several projections")
        p = per_proj.pop()
        index = torch.tensor([sorted(r for _, r in unit) for unit in members])
        return tuple(_projection_slots(proj_key[p], proj_mod[p], index, canonical))

    if block_sets:  # grouped-query attention
        blocks = sorted(block_sets, key=min)
        heads_in = [sorted({head_of_col[c] for c in s}) for s in blocks]
        order = [h for hs in heads_in for h in hs]
        if sorted(order) != list(range(heads)) or len({len(hs) for hs in heads_in}) != 1:
            raise NoLayout("key/value heads do not split the query heads into equal blocks")
        q_units = [multi[head_sets[h]] for h in order]
        k_units = [multi[s] for s in blocks]
    else:
        blocks = head_sets
        heads_in = [[h] for h in range(heads)]
        order = list(range(heads))
        q_units, k_units = [], []
        for s in head_sets:
            unit = sorted(multi[s])
            projs = sorted({p for p, _ in unit})
            if len(projs) == 2:
                q_units.append([u for u in unit if u[0] == projs[0]])
                k_units.append([u for u in unit if u[0] == projs[1]])
            elif len(projs) == 1 and len(unit) % 2 == 0:
                q_units.append(unit[: len(unit) // 2])
                k_units.append(unit[len(unit) // 2:])
            else:
                raise NoLayout("query and key rows of a head cannot be told apart")
    if len({len(u) for u in q_units + k_units}) != 1:
        raise NoLayout("query and key rows of unequal width")
    # value rows: one column in each head of one block, at the same rank
    v_units: list[list[tuple[int, int]]] = [[] for _ in blocks]
    block_of_head = {h: b for b, hs in enumerate(heads_in) for h in hs}
    for (p, r), cols in single:
        hs = sorted(head_of_col.get(c, -1) for c in cols)
        if -1 in hs or len(set(hs)) != len(hs) or hs != sorted(heads_in[block_of_head[hs[0]]]):
            raise NoLayout("a value row reaches columns outside one block of heads")
        v_units[block_of_head[hs[0]]].append((p, r, cols))
    value_rows = []
    for unit in v_units:
        unit.sort(key=lambda x: x[1])
        if len(unit) != v_dim:
            raise NoLayout("value rows do not fill the heads")
        for rank, (_, _, cols) in enumerate(unit):
            for c in cols:
                if int(out_cols[head_of_col[c], rank]) != c:
                    raise NoLayout("value rows and output columns are ordered differently")
        value_rows.append([(p, r) for p, r, _ in unit])

    out_axis = linear_axes(out_module)[1]
    output = ((canonical.get(f"{out_name}.weight", f"{out_name}.weight"), out_axis, out_cols[order]),)
    table_slots = []
    for tkey, dep in tables:  # dep: (columns, *table shape)
        table_slots.append(_table_slot(tkey, dep, head_of_col, heads, order, canonical))
    qk_dim = len(q_units[0])
    rot = 0
    qk_note = ""
    if rotary is not None:
        rot = qk_dim if rotary < 0 else min(rotary, qk_dim)
        if rotary < 0:
            qk_note = "rotary embeddings of several sizes act on the query/key dims"
    if others:
        note = f"{others[0]} acts inside the heads (shared across them)"
        qk_note = qk_note or note
    return AttentionLayout(
        name=name, query=slots(q_units), key=slots(k_units), value=slots(value_rows), output=output,
        tables=tuple(table_slots), rotary=rot, qk_note=qk_note,
        v_note=f"{others[0]} acts inside the heads (shared across them)" if others else "",
        producers=tuple(dict.fromkeys(proj_key)), consumers=(out_name,),
    )


def _table_slot(key: str, dep: torch.Tensor, head_of_col: dict[int, int], heads: int, order: list[int],
                canonical: dict[str, str]) -> tuple[str, int, torch.Tensor]:
    """The axis of a per-head table along which entries belong to one head each."""
    flat = dep.reshape(dep.shape[0], -1)
    head_of_entry = torch.full((flat.shape[1],), -1)
    for e in torch.nonzero(flat.any(0)).flatten().tolist():
        hs = {head_of_col[c] for c in torch.nonzero(flat[:, e]).flatten().tolist()}
        if len(hs) != 1:
            raise NoLayout(f"{key} mixes heads")
        head_of_entry[e] = hs.pop()
    shape = dep.shape[1:]
    head_of_entry = head_of_entry.reshape(shape)
    for axis, size in enumerate(shape):
        if size != heads:
            continue
        idx = torch.arange(size).reshape([-1 if a == axis else 1 for a in range(len(shape))]).expand(shape)
        used = head_of_entry >= 0
        # entries at index i along this axis belong to head f(i), one head per index
        pairs = set(zip(idx[used].tolist(), head_of_entry[used].tolist()))
        mapping = dict(pairs)
        if len(mapping) == len(pairs) == heads and len(set(mapping.values())) == heads:
            inverse = {h: i for i, h in mapping.items()}
            return canonical.get(key, key), axis, torch.tensor([[inverse[h]] for h in order])
    raise NoLayout(f"{key} has no axis indexed by head")
