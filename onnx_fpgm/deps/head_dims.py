"""Head dimensions: channels within the kept attention heads (Torch-Pruning's ``prune_head_dims``).

A head record (a split whose free level holds attention heads, see ``blocks.py``) may have one
more level that loses entries: its ``head_dim`` level, the *dim level*. Entry ``j`` of it goes
from every head of the record at once, so the kept positions stay a grid (heads kept x dims
kept) and the Reshape to ``(heads, head_dim)`` only needs its constant ``head_dim`` rewritten.

A *key* is ``(record, j)``: the atoms at index ``j`` of the record's dim level. Keys are tied
(union-find) when

* one atom sits at both (a tensor split twice: q of a packed qkv),
* atoms at them are coupled by the analysis, the coupling of a head's atoms into one head aside
  (repeat_kv's copies with the KV head they copy; two splits joined element-wise),
* a MatMul contracts them (``q @ k^T`` over ``head_dim``: ``q[..., j]`` meets ``k[..., j]``, so
  q head ``h`` keeps the dims its KV head keeps; ``blocks.require_contracted``).

A *unit* is a set of tied keys: its atoms are removed together (on top of whole heads) and the
product stays exact because every removed ``j`` is gone from both operands of every contraction
and from the output projection's input rows (``o_proj`` reads V's dims; the softmax scale
``1/sqrt(d)`` is a constant the rewrite leaves as it is, or, computed from a Shape of q, is fed
its original value: ``computed_scale``). Units over the same records form a
group, scored by FPGM over the members' rows of its atoms (q and k rows of all heads as one
vector per unit; v rows). A unit stays whole, with a reason, when a level of a record in it
must keep its entries for another reason (``dims_whole``: rotary's cos/sin tables and
a size read by Shape that is no constant scale and does not follow the plan (``symbolic_sizes``),
a computed Reshape element or Slice bound, a KV cache without ``--allow-interface-change``),
when its atoms are coupled with channels outside every head grid, when a head of it is blocked,
or when its records do not hold the same entries of it. Constant operands (rotary's cos/sin
tables when stored) are sliced on the dims kept; rotate_half's Slice bounds move to the kept
counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .blocks import SplitRecord


@dataclass
class HeadDims:
    """The units of the head dimensions and their groups.

    Attributes:
        atoms: the atoms of each unit.
        blocked: why each unit stays, or None.
        groups: unit ids of each group (units over the same records).
        records: the records of each group.
    """

    atoms: list[np.ndarray] = field(default_factory=list)
    blocked: list[str | None] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    records: list[list[int]] = field(default_factory=list)


def dim_level(record: SplitRecord) -> tuple[int | None, str | None]:
    """(the record's dim level, None when it may lose entries, else why not); the level is
    None when the record has none (not heads, or no level within a head)."""
    if not record.heads:
        return None, "not attention heads"
    if record.free_level is None:
        return None, f"head_dim at {record.where}: its heads stay whole"
    sizes = record.labels.shape
    others = [lv for lv in range(len(sizes)) if lv != record.free_level and sizes[lv] > 1]
    open_ = [lv for lv in others if lv not in record.dims_whole]
    if len(open_) == 1:
        return open_[0], None
    if open_:
        return None, f"split at {record.where} has several levels within a head"
    if not others:
        return None, f"split at {record.where} has no head_dim level"
    return others[-1], f"head_dim at {record.where}: {record.dims_whole[others[-1]]}"


class UnionFind:
    """Union-find over keys, with a blocking reason per key."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.why: list[str | None] = [None] * n

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, key: int, why: str) -> None:
        if self.why[key] is None:
            self.why[key] = why


def resolve_head_dims(records: list[SplitRecord], fine_roots: np.ndarray,
                      contracted: list[tuple[np.ndarray, np.ndarray]],
                      class_of_atom: np.ndarray, class_blocked: list[str | None]) -> HeadDims:
    """The units (see the module docstring). ``fine_roots``: per atom, its class under every
    coupling but the coupling of a head's atoms into one head."""
    n_atoms = len(fine_roots)
    slabs, key_record, key_index, key_why = [], [], [], []
    atom_key = np.full(n_atoms, -1, dtype=np.int64)
    extra_keys: list[tuple[int, int]] = []  # (atom, key) of atoms in a second record
    atom_why: dict[int, str] = {}
    for r, record in enumerate(records):
        level, why = dim_level(record)  # a level that must stay: keys blocked, for the report
        if level is None:
            if record.heads:
                for atom in record.labels[record.labels >= 0].tolist():
                    atom_why.setdefault(atom, why)
            continue
        for j in range(record.labels.shape[level]):
            slab = np.take(record.labels, j, axis=level).reshape(-1)
            key = len(key_record)
            key_record.append(r)
            key_index.append(j)
            slabs.append(slab)
            key_why.append(why)
            for atom in slab[slab >= 0].tolist():
                if atom_key[atom] < 0:
                    atom_key[atom] = key
                else:
                    extra_keys.append((atom, key))
    result = HeadDims()
    if not key_record:
        return result
    keys = UnionFind(len(key_record))
    for key, why in enumerate(key_why):
        if why is not None:
            keys.block(key, why)
    for key, slab in enumerate(slabs):
        if np.any(slab < 0):
            keys.block(key, f"head_dim at {records[key_record[key]].where} holds channels not "
                            "ours")
    for atom, key in extra_keys:
        keys.union(int(atom_key[atom]), key)
    _tie_fine_classes(keys, fine_roots, atom_key, atom_why)
    for a_atoms, b_atoms in contracted:
        for a, b in zip(a_atoms.tolist(), b_atoms.tolist()):
            ka, kb = (int(atom_key[x]) if x >= 0 else -1 for x in (a, b))
            if ka >= 0 and kb >= 0:
                keys.union(ka, kb)
            elif ka >= 0 or kb >= 0:
                other = b if ka >= 0 else a
                keys.block(max(ka, kb), atom_why.get(other, "contracted with channels that are "
                                                            "not a head's"))
    for key, slab in enumerate(slabs):
        atoms = slab[slab >= 0]
        reasons = [class_blocked[c] for c in np.unique(class_of_atom[atoms]).tolist()
                   if class_blocked[c] is not None]
        if reasons:
            keys.block(key, reasons[0])
    _collect(result, keys, slabs, key_record, key_index, records)
    return result


def _tie_fine_classes(keys: UnionFind, fine_roots: np.ndarray, atom_key: np.ndarray,
                      atom_why: dict[int, str]) -> None:
    """Keys whose atoms are coupled are tied; a key coupled with an atom at no key stays."""
    keyed = np.flatnonzero(atom_key >= 0)
    roots = fine_roots[keyed]
    order = np.argsort(roots, kind="stable")
    roots, keyed = roots[order], keyed[order]
    same = np.flatnonzero(roots[1:] == roots[:-1])
    for i in same.tolist():
        keys.union(int(atom_key[keyed[i]]), int(atom_key[keyed[i + 1]]))
    outside = np.flatnonzero((atom_key < 0) & np.isin(fine_roots, roots))
    if not len(outside):
        return
    first_key = {int(r): int(atom_key[a]) for r, a in zip(roots.tolist(), keyed.tolist())}
    for atom in outside.tolist():
        keys.block(first_key[int(fine_roots[atom])],
                   atom_why.get(atom, "coupled with channels outside the heads' grid"))


def _collect(result: HeadDims, keys: UnionFind, slabs, key_record, key_index, records) -> None:
    """Units from the tied keys, grouped by the records they span."""
    by_root: dict[int, list[int]] = {}
    for key in range(len(key_record)):
        by_root.setdefault(keys.find(key), []).append(key)
    by_records: dict[tuple[int, ...], list[list[int]]] = {}
    for members in by_root.values():
        spanned = tuple(sorted({key_record[k] for k in members}))
        by_records.setdefault(spanned, []).append(members)
    for spanned, units in by_records.items():
        why = _check_group(units, key_record, key_index, records)
        ids = []
        for members in sorted(units, key=min):
            atoms = np.unique(np.concatenate([slabs[k][slabs[k] >= 0] for k in members]))
            reason = why or next((keys.why[k] for k in members if keys.why[k]), None)
            ids.append(len(result.atoms))
            result.atoms.append(atoms)
            result.blocked.append(reason)
        result.groups.append(ids)
        result.records.append(list(spanned))


def _check_group(units: list[list[int]], key_record, key_index, records) -> str | None:
    """Every record of a unit holds the same entries of it (``j`` in q is ``j`` in k; with
    rotary, the pair ``j, j + d/2`` in both): the kept entries then line up in every record."""
    for members in units:
        held: dict[int, set[int]] = {}
        for k in members:
            held.setdefault(key_record[k], set()).add(key_index[k])
        if len({frozenset(v) for v in held.values()}) > 1:
            where = records[key_record[members[0]]].where
            return f"head_dim at {where}: entries are paired out of order"
    return None
