"""Head-aware permutation groups of attention layers, derived from the traced computation.

An attention layer is found from what it computes, not from its class or parameter names: an
*output projection* is a linear layer (``nn.Linear`` or Hugging Face's transposed ``Conv1D``)
whose input is computed, through a softmax (or ``scaled_dot_product_attention``), from the
outputs of other linear layers, its *projections*. On a float64 copy with every parameter
re-drawn at O(1) scale, the Jacobian of the output projection's input columns with respect to
the projection outputs (and to any parameter read on the way, e.g. a relative-position bias
table) gives the layout exactly, whatever the fusion or interleaving of q, k and v:

* a value row feeds one column per query head of its block (``o`` column ``(h, d)``),
* a query row feeds every column of its head, a key row every column of its block of query
  heads (grouped-query attention when a block holds several heads),
* a bias-table entry feeds the columns of one head.

From the layout come the groups (Vaswani et al. 2017; the head symmetries used by Imfeld et al.,
"Transformer Fusion with Optimal Transport", ICLR 2024):

* ``heads``: whole (key/value) heads, moving q, k, v rows, ``o`` columns and bias tables;
* ``query_heads``: the query heads sharing one key/value head (grouped-query attention);
* ``head_v``: the value dimensions of one key/value head with the ``o`` columns they feed;
* ``head_qk``: the query/key dimensions of one head, jointly, except those a rotary embedding
  rotates (their frequencies are fixed by position).

Every group is then checked structurally (a random permutation must keep the float64 copy's
output to 1e-9); what fails is refused with the reason. ``nn.MultiheadAttention``, whose
projections are not called as modules, gets the same layout from its packed ``in_proj``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..checks import move_inputs, run_model
from .hf_layers import linear_axes
from .records import AxisMember, PermutationGroup, SkippedGroup
from .verify import structural_copy

log = logging.getLogger(__name__)

#: Parameters read inside an attention layer above this size are not per-head tables (their
#: dependency matrices would be too large to form); they only block the within-head groups.
_MAX_TABLE = 1 << 16
_SOFTMAX_NODES = ("Softmax", "ScaledDotProduct", "FlashAttention", "EfficientAttention")


# --------------------------------------------------------------------------------------------
# The layout of one attention layer
# --------------------------------------------------------------------------------------------

#: One tensor axis holding one role: (state-dict key, axis, positions of shape (heads, dims)).
_Slots = tuple[tuple[str, int, torch.Tensor], ...]


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
    query: _Slots
    key: _Slots
    value: _Slots
    output: _Slots
    tables: _Slots = ()
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
# A float64 copy at O(1) scale, and the Jacobian probe
# --------------------------------------------------------------------------------------------


@dataclass
class _Capture:
    module: nn.Module
    output: torch.Tensor | None = None  # a leaf standing for the module's output
    input: torch.Tensor | None = None


def _capture_linears(work: nn.Module, inputs: Any) -> dict[str, _Capture]:
    """Run ``work`` once; every linear-like module's output becomes a leaf, its input is kept.

    ``nn.Linear`` weights are caught wherever ``F.linear`` reads them, so attention code that calls
    its projections functionally (torchvision's Swin) is read like any other; other linear-like
    modules (``Conv1D``, linears with their own forward) through module hooks. The first call wins.
    """
    captures = {name: _Capture(m) for name, m in work.named_modules() if linear_axes(m) is not None}
    inside_mha = {f"{n}.{c}" for n, m in work.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_modules() if c}
    for name in inside_mha:
        captures.pop(name, None)
    functional = {id(c.module.weight): c for c in captures.values() if type(c.module).forward is nn.Linear.forward}

    def capture(cap: _Capture, x: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or cap.output is not None:
            return None
        cap.input = x if isinstance(x, torch.Tensor) else None
        cap.output = output.detach().requires_grad_(True)
        return cap.output.clone()  # a non-leaf: the model may write into it (Falcon's fused qkv)

    class _Linears(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in (F.linear, torch._C._nn.linear):
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                cap = functional.get(id(weight))
                if cap is not None:
                    replaced = capture(cap, args[0] if args else kwargs.get("input"), out)
                    return out if replaced is None else replaced
            return out

    handles = [c.module.register_forward_hook(lambda m, a, out, c=c: capture(c, a[0] if a else None, out))
               for c in captures.values() if id(c.module.weight) not in functional]
    try:
        with torch.enable_grad(), _Linears():
            run_model(work, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {n: c for n, c in captures.items() if c.output is not None}


def _graph_leaves(root: torch.Tensor) -> tuple[list[torch.Tensor], bool]:
    """The leaf tensors (captured outputs, parameters) the autograd graph of ``root`` reads, and
    whether it passes a softmax-like node."""
    leaves, seen, stack, softmax = [], set(), [root.grad_fn], False
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        name = fn.name()
        softmax = softmax or any(s in name for s in _SOFTMAX_NODES)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves, softmax


def _dependencies(root: torch.Tensor, leaves: Sequence[torch.Tensor], activations: int) -> list[torch.Tensor]:
    """Which columns (last axis) of ``root`` depend on which leaf entries, as bool matrices.

    The first ``activations`` leaves are activations: their entries are their features (last
    axis, summed over batch and positions), giving ``(columns, features)``; the other leaves are
    parameters, giving ``(columns, *shape)``. Dependencies are exact zeros of batched gradients.
    """
    columns = root.shape[-1]
    chunk = max(1, min(64, (1 << 21) // max(1, root.numel())))  # columns per batched backward (memory)
    shapes = [(leaf.shape[-1],) if i < activations else tuple(leaf.shape) for i, leaf in enumerate(leaves)]
    deps = [torch.zeros((columns,) + shape, dtype=torch.bool) for shape in shapes]
    for start in range(0, columns, chunk):
        n = min(columns, start + chunk) - start
        basis = torch.zeros((n, root[..., 0].numel(), columns), dtype=root.dtype, device=root.device)
        basis[torch.arange(n), :, torch.arange(start, start + n)] = 1.0
        basis = basis.reshape((n,) + tuple(root.shape))
        grads = torch.autograd.grad(root, list(leaves), basis, retain_graph=True, allow_unused=True,
                                    is_grads_batched=True)
        for i, (dep, grad) in enumerate(zip(deps, grads)):
            if grad is None:
                continue
            g = grad.abs()
            if i < activations:
                g = g.reshape(n, -1, g.shape[-1]).sum(1)
            dep[start:start + n] = (g > 0).reshape((n,) + shapes[i]).cpu()
    return deps


# --------------------------------------------------------------------------------------------
# From dependencies to a layout
# --------------------------------------------------------------------------------------------


class _NoLayout(Exception):
    """The dependency pattern is not one the head groups describe (the layer is refused)."""


def _rotary_dims(model: nn.Module) -> int | None:
    """Rotated query/key dims per head, from rotary embeddings' ``inv_freq`` buffers (None: none)."""
    sizes = {int(b.numel()) for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] == "inv_freq"}
    if not sizes:
        return None
    return 2 * max(sizes) if len(sizes) == 1 else -1


def _layout_from_dependencies(name: str, out_name: str, out_module: nn.Module,
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
        raise _NoLayout("no query/key rows or no value rows found")
    head_sets = [s for s in multi if not any(o < s for o in multi)]
    head_sets.sort(key=min)
    covered = sorted(c for s in head_sets for c in s)
    if len(covered) != len(set(covered)):
        raise _NoLayout("query heads overlap in the output projection's columns")
    heads = len(head_sets)
    v_dim = len(head_sets[0])
    if any(len(s) != v_dim for s in head_sets):
        raise _NoLayout("heads of unequal value width")
    head_of_col = {c: h for h, s in enumerate(head_sets) for c in s}
    out_cols = torch.tensor([sorted(s) for s in head_sets])  # (heads, v_dim)

    # key blocks: sets that are unions of several head sets (grouped-query attention)
    block_sets = [s for s in multi if s not in head_sets]
    for s in block_sets:
        if not all(c in head_of_col for c in s) or len(s) % v_dim:
            raise _NoLayout("a key row reaches part of a head")
    proj_key = [key for key, _, _ in projections]
    proj_mod = [m for _, m, _ in projections]

    def slots(members: list[list[tuple[int, int]]]) -> _Slots:
        """(heads, dims) positions per projection tensor; every head's rows in one projection."""
        per_proj = {p for unit in members for p, _ in unit}
        if len(per_proj) != 1:
            raise _NoLayout("one role is spread over several projections")
        p = per_proj.pop()
        index = torch.tensor([sorted(r for _, r in unit) for unit in members])
        return tuple(_projection_slots(proj_key[p], proj_mod[p], index, canonical))

    if block_sets:  # grouped-query attention
        blocks = sorted(block_sets, key=min)
        heads_in = [sorted({head_of_col[c] for c in s}) for s in blocks]
        order = [h for hs in heads_in for h in hs]
        if sorted(order) != list(range(heads)) or len({len(hs) for hs in heads_in}) != 1:
            raise _NoLayout("key/value heads do not split the query heads into equal blocks")
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
                raise _NoLayout("query and key rows of a head cannot be told apart")
    if len({len(u) for u in q_units + k_units}) != 1:
        raise _NoLayout("query and key rows of unequal width")
    # value rows: one column in each head of one block, at the same rank
    v_units: list[list[tuple[int, int]]] = [[] for _ in blocks]
    block_of_head = {h: b for b, hs in enumerate(heads_in) for h in hs}
    for (p, r), cols in single:
        hs = sorted(head_of_col.get(c, -1) for c in cols)
        if -1 in hs or len(set(hs)) != len(hs) or hs != sorted(heads_in[block_of_head[hs[0]]]):
            raise _NoLayout("a value row reaches columns outside one block of heads")
        v_units[block_of_head[hs[0]]].append((p, r, cols))
    value_rows = []
    for unit in v_units:
        unit.sort(key=lambda x: x[1])
        if len(unit) != v_dim:
            raise _NoLayout("value rows do not fill the heads")
        for rank, (_, _, cols) in enumerate(unit):
            for c in cols:
                if int(out_cols[head_of_col[c], rank]) != c:
                    raise _NoLayout("value rows and output columns are ordered differently")
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
            raise _NoLayout(f"{key} mixes heads")
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
    raise _NoLayout(f"{key} has no axis indexed by head")


# --------------------------------------------------------------------------------------------
# Finding the layouts of a model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionSearch:
    """Attention layers found in a model, and attention-like layers that could not be read."""

    layouts: tuple[AttentionLayout, ...]
    refused: tuple[SkippedGroup, ...]

    @property
    def cut_outputs(self) -> set[str]:
        """Modules whose outputs are head dimensions (the projections)."""
        return {p for lay in self.layouts for p in lay.producers if p not in lay.consumers}

    @property
    def cut_inputs(self) -> set[str]:
        """Modules whose inputs are head dimensions (the output projections)."""
        return {c for lay in self.layouts for c in lay.consumers if c not in lay.producers}

    @property
    def internal_axes(self) -> set[tuple[str, int]]:
        return {a for lay in self.layouts for a in lay.internal_axes}


def find_attention(model: nn.Module, example_inputs: Any, canonical: dict[str, str], seed: int = 0) -> AttentionSearch:
    """The attention layers of ``model`` with their head layouts, read off a structural copy."""
    layouts, refused = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            layout = multihead_attention_layout(name, module, canonical)
            if layout is None:
                refused.append(SkippedGroup(name, module.num_heads, "attention with separate key/value dimensions"))
            else:
                layouts.append(layout)
    has_linear = any(linear_axes(m) is not None for m in model.modules() if not isinstance(m, nn.MultiheadAttention))
    if not has_linear:
        return AttentionSearch(tuple(layouts), tuple(refused))
    from ..checks import model_device

    try:
        work = structural_copy(model, seed)
        for p in work.parameters():
            p.requires_grad_(True)  # frozen per-head tables must show their dependencies too
        captures = _capture_linears(work, move_inputs(example_inputs, model_device(work), torch.float64))
    except Exception as exc:  # no float64 copy (a lock, float32-only code): only nn.MultiheadAttention's layouts
        with torch.no_grad():
            run_model(model, example_inputs)  # raises ExampleInputError if the inputs are at fault
        log.warning("no attention layouts read from %s: %s: %s", type(model).__name__, type(exc).__name__, exc)
        return AttentionSearch(tuple(layouts), tuple(refused))
    by_leaf = {id(c.output): n for n, c in captures.items()}
    param_names = {id(p): n for n, p in work.named_parameters()}
    rotary = _rotary_dims(work)
    mha_params = {id(p) for m in work.modules() if isinstance(m, nn.MultiheadAttention) for p in m.parameters()}
    modules = dict(model.named_modules())
    for out_name, cap in captures.items():
        if cap.input is None or cap.input.grad_fn is None:
            continue
        leaves, softmax = _graph_leaves(cap.input)
        proj_leaves = [leaf for leaf in leaves if id(leaf) in by_leaf]
        if not softmax or not proj_leaves:
            continue
        params = [leaf for leaf in leaves if id(leaf) in param_names]
        if any(id(leaf) in mha_params for leaf in params):
            continue  # the softmax is an nn.MultiheadAttention's, whose layout comes from the module
        big = [param_names[id(leaf)] for leaf in params if leaf.numel() > _MAX_TABLE]
        params = [leaf for leaf in params if leaf.numel() <= _MAX_TABLE]
        deps = _dependencies(cap.input, proj_leaves + params, len(proj_leaves))
        projections = [(by_leaf[id(leaf)], modules[by_leaf[id(leaf)]], dep) for leaf, dep in zip(proj_leaves, deps)]
        projections.sort(key=lambda x: list(modules).index(x[0]))
        name = _common_prefix([p for p, _, _ in projections] + [out_name])
        tables, others = [], []
        for leaf, dep in zip(params, deps[len(proj_leaves):]):
            if not bool(dep.any()):
                continue
            (tables if any(s > 1 for s in leaf.shape) and leaf.dim() >= 2 else others).append((param_names[id(leaf)], dep))
        try:
            layout = _layout_from_dependencies(
                name, out_name, modules[out_name], [(k, modules[k], d) for k, _, d in projections], tables,
                [n for n, _ in others] + big, canonical, rotary)
        except _NoLayout as exc:
            size = int(cap.input.shape[-1])
            layer = out_name.rsplit(".", 1)[0]
            refused.append(SkippedGroup(f"{layer}.heads", size, f"attention layout not recognised from the projections "
                                        f"called as modules before {out_name}: {exc}"))
            continue
        layouts.append(layout)
    return AttentionSearch(tuple(layouts), tuple(refused))


def _common_prefix(names: Sequence[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix) or names[0]


# --------------------------------------------------------------------------------------------
# Groups of a layout
# --------------------------------------------------------------------------------------------


def _members(units: Sequence[Sequence[tuple[str, int, torch.Tensor]]]) -> tuple[AxisMember, ...]:
    """Merge per-unit (key, axis, positions) into one AxisMember per (key, axis): index (units, block)."""
    merged: dict[tuple[str, int], list[list[torch.Tensor]]] = {}
    for u, unit in enumerate(units):
        for key, axis, positions in unit:
            rows = merged.setdefault((key, axis), [[] for _ in units])
            rows[u].append(positions.reshape(-1))
    members = []
    for (key, axis), rows in merged.items():
        index = torch.stack([torch.cat(r) for r in rows])
        members.append(AxisMember(key, axis, index))
    return tuple(members)


def layout_groups(layout: AttentionLayout) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Head groups of one layout (before verification), and what is refused up front."""
    groups, skipped = [], []
    kv, heads = layout.kv_heads, layout.heads
    per = heads // kv
    base = layout.name
    prod, cons = layout.producers, layout.consumers

    def q_rows(block: int) -> list:
        return [(k, a, pos[block * per:(block + 1) * per]) for k, a, pos in layout.query]

    def o_cols(block: int) -> list:
        return [(k, a, pos[block * per:(block + 1) * per]) for k, a, pos in layout.output]

    def rows(slots: _Slots, i: int) -> list:
        return [(k, a, pos[i]) for k, a, pos in slots]

    if kv > 1:
        units = [q_rows(g) + rows(layout.key, g) + rows(layout.value, g) + o_cols(g)
                 + [(k, a, pos[g * per:(g + 1) * per]) for k, a, pos in layout.tables] for g in range(kv)]
        groups.append(PermutationGroup(f"{base}.heads", kv, _members(units), prod, cons, "heads"))
    if per > 1:
        for g in range(kv):
            units = [rows(layout.query, h) + rows(layout.output, h) + rows(layout.tables, h)
                     for h in range(g * per, (g + 1) * per)]
            name = f"{base}.kv{g}.query_heads" if kv > 1 else f"{base}.heads"
            groups.append(PermutationGroup(name, per, _members(units), prod, cons, "heads"))
    for g in range(kv):
        if layout.v_note:
            skipped.append(SkippedGroup(f"{base}.head{g}.v", layout.v_dim, layout.v_note))
        elif layout.v_dim > 1:
            units = [[(k, a, pos[g, d]) for k, a, pos in layout.value]
                     + [(k, a, pos[g * per:(g + 1) * per, d]) for k, a, pos in layout.output] for d in range(layout.v_dim)]
            groups.append(PermutationGroup(f"{base}.head{g}.v", layout.v_dim, _members(units), prod, cons, "head_v"))
        free = range(layout.rotary, layout.qk_dim)
        if layout.qk_note:
            skipped.append(SkippedGroup(f"{base}.head{g}.qk", layout.qk_dim, layout.qk_note))
            continue
        if layout.rotary:
            kept = f"; dims {layout.rotary}..{layout.qk_dim - 1} are not rotated and permute" if len(free) > 1 else ""
            skipped.append(SkippedGroup(f"{base}.head{g}.qk", layout.rotary,
                                        f"a rotary embedding rotates query/key dims 0..{layout.rotary - 1} of each head "
                                        f"with fixed frequencies{kept}"))
        if len(free) > 1:
            units = [[(k, a, pos[g * per:(g + 1) * per, d]) for k, a, pos in layout.query]
                     + [(k, a, pos[g, d]) for k, a, pos in layout.key] for d in free]
            groups.append(PermutationGroup(f"{base}.head{g}.qk", len(free), _members(units), prod, cons, "head_qk"))
    return groups, skipped


def merge_sharing(groups: list[PermutationGroup], axes: set[tuple[str, int]] | None = None
                  ) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Groups that move the same positions of one tensor axis (of ``axes``, or any) become one group.

    Tied weights make this necessary: T5's encoder and decoder residual streams share the
    embedding matrix, and every layer reuses the first layer's relative-position bias table, so
    their permutations must be one. Groups of unequal sizes, or reaching the shared axis at
    different positions, are refused.
    """
    parent = list(range(len(groups)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, int], dict[int, int]] = defaultdict(dict)  # (tensor, axis) -> position -> group
    for i, g in enumerate(groups):
        for m in g.members:
            if axes is None or (m.name, m.axis) in axes:
                positions = owner[m.name, m.axis]
                for pos in m.index.reshape(-1).tolist():
                    parent[find(i)] = find(positions.setdefault(pos, i))
    components: dict[int, list[PermutationGroup]] = defaultdict(list)
    for i, g in enumerate(groups):
        components[find(i)].append(g)
    merged, refused = [], []
    for parts in components.values():
        members: dict[tuple[str, int], AxisMember] = {}
        reason = "" if len({g.size for g in parts}) == 1 else f"groups of different sizes share {parts[1].name}'s tensors"
        for g in parts:
            for m in g.members:
                if (m.name, m.axis) in members and not torch.equal(members[m.name, m.axis].index, m.index):
                    reason = reason or f"{m.name} (axis {m.axis}) is shared by several groups at different positions"
                members[m.name, m.axis] = m
        if reason:
            refused.extend(SkippedGroup(g.name, g.size, reason) for g in parts)
        elif len(parts) == 1:
            merged.append(parts[0])
        else:
            merged.append(PermutationGroup(parts[0].name, parts[0].size, tuple(members.values()),
                                           tuple(dict.fromkeys(p for g in parts for p in g.producers)),
                                           tuple(dict.fromkeys(c for g in parts for c in g.consumers)), parts[0].kind))
    return merged, refused


def head_groups(search: AttentionSearch, exclude: Collection[str] = ()) -> tuple[list[PermutationGroup], list[SkippedGroup]]:
    """Every head group of the layouts found (not yet verified), and the refused ones with reasons."""
    groups, skipped = [], list(search.refused)
    for layout in search.layouts:
        if layout.producers and layout.producers[0] in exclude:
            continue
        found, refused = layout_groups(layout)
        groups.extend(found)
        skipped.extend(refused)
    tables = {(k, a) for layout in search.layouts for k, a, _ in layout.tables}
    whole, refused = merge_sharing([g for g in groups if g.kind == "heads"], tables)
    skipped.extend(refused)
    return whole + [g for g in groups if g.kind != "heads"], skipped


_FAILED = {
    "heads": "whole heads (a per-head quantity the layout does not move, e.g. ALiBi slopes computed from the head "
             "index, or a bias assembled outside the projection)",
    "head_qk": "query/key dims (a position-dependent op such as a rotary embedding acts on them)",
    "head_v": "value dims",
}


def head_refusal(skipped: SkippedGroup, kind: str) -> SkippedGroup:
    """A verification refusal of a head group, with what permuting it means."""
    if kind not in _FAILED:
        return skipped
    return SkippedGroup(skipped.name, skipped.size, f"permuting {_FAILED[kind]} changed the function: {skipped.reason}",
                        skipped.kind)
