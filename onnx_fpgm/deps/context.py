"""The analysis' working state: what handlers read and record while channel maps propagate.

Handlers set each output's channel map and record couplings, cuts and blocks here; ``finish``
turns them into classes and groups (``channels.Analysis``). See ``analysis.py`` for the model.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..model.outer_scope import with_bodies
from .blocks import SplitMap, SplitRecord, resolve_splits
from .channels import Analysis, ChannelMap, Group, Member, Source
from .constants import FOLDABLE_OPS, ConstantFolder
from .head_dims import HeadDims, UnionFind, resolve_head_dims
from .repeats import RepeatCopies, resolve_repeats
from .shape_values import ELEMENT_MOVING_OPS, channel_labels, tensor_elements

logger = logging.getLogger(__name__)

#: (op, input index) whose shape parameter the op's handler rewrites from surviving channels.
SHAPE_PARAMETER_INPUTS = frozenset({("Split", 1), ("Reshape", 1), ("Resize", 3), ("Slice", 1),
                                    ("Slice", 2), ("SplitToSequence", 1), ("Expand", 1)})
#: Shape parameters whose handler reads them element by element (``shape_values``).
ELEMENTWISE_PARAMETER_INPUTS = frozenset({("Reshape", 1), ("Resize", 3), ("Expand", 1)})
#: Ops that may carry a channel count along in shape arithmetic.
SHAPE_ARITHMETIC = FOLDABLE_OPS - {"Shape"}


class AnalysisContext:
    """State shared by the handlers while channel maps are propagated."""

    def __init__(self, graph: gs.Graph, opset: int,
                 overridable: frozenset[str] = frozenset(),
                 cache_inputs: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        #: KV-cache inputs whose head axis may shrink (``--allow-interface-change``), see
        #: ``interface.cache_inputs``; a Concat joining one gives it the channels it joins.
        self.cache_inputs = cache_inputs
        #: Graph outputs whose channels may be removed (present.* of such a cache input).
        self.changeable_outputs: set[str] = set()
        self.opset = opset
        self.maps: dict[str, ChannelMap] = {}
        self.sources: list[Source] = []
        self.members: list[Member] = []
        self.n_atoms = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        #: Couplings of whole heads (``couple_heads``): not couplings of their dims.
        self._head_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._cuts: list[tuple[np.ndarray, np.ndarray]] = []
        self._blocked: list[tuple[np.ndarray, str]] = []
        #: Atoms of constant channels (zero padding joined on the channel axis) and where.
        self._constant_runs: list[tuple[np.ndarray, str]] = []
        self.blocked_tensors: list[tuple[str, str]] = []
        self.balanced: list[tuple[str, list[np.ndarray]]] = []
        self.consts = ConstantFolder(opset, overridable)
        #: Sequences cut from a mapped tensor (SplitToSequence): name -> channel map per part.
        self.sequences: dict[str, list[ChannelMap]] = {}
        #: Values computed from the shape of a mapped tensor: name -> its channel map.
        self.shape_maps: dict[str, ChannelMap] = {}
        #: Softmax scales computed from a Shape (``Analysis.computed_scales``).
        self.computed_scales: dict[str, tuple[tuple[int, ...], list]] = {}
        #: Tensors whose channel axis a Reshape split over several axes (see blocks.py).
        self.split_maps: dict[str, SplitMap] = {}
        self.split_records: list[SplitRecord] = []
        #: Tensors whose shape a handler found where onnx's inference could not (a computed
        #: Reshape target); shapes are inferred onward from them, node by node.
        self.refined: set[str] = set()
        #: Cuts of a split tensor that hold none of its entries (Phi-3's rotary pass-through
        #: ``q[..., rotary_dim:]`` when the rotary covers the whole head): a Concat joins nothing.
        self.empty_cuts: set[str] = set()
        #: Heads repeated for their readers (repeat_kv), coupled when the analysis finishes.
        self.repeats: list[RepeatCopies] = []
        #: Atoms whose head dims go together: contracted (``q @ k^T``) or copied (repeat_kv).
        self.contracted: list[tuple[np.ndarray, np.ndarray]] = []
        #: Couplings of the uses of a shared weight (``shared_weights``), made in ``finish``
        #: unless they would meet a blocked channel.
        self._shared: list[tuple[np.ndarray, np.ndarray]] = []

    # ---- reading the graph ----
    def map(self, tensor: gs.Tensor | None) -> ChannelMap | None:
        if tensor is None or not tensor.name:
            return None
        return self.maps.get(tensor.name)

    def set_map(self, tensor: gs.Tensor, cmap: ChannelMap | SplitMap | None) -> None:
        if cmap is None or not np.any(cmap.labels >= 0):
            return
        if isinstance(cmap, SplitMap):
            self.split_maps[tensor.name] = cmap
        else:
            self.maps[tensor.name] = cmap

    def split_map(self, tensor: gs.Tensor | None) -> SplitMap | None:
        if tensor is None or not tensor.name:
            return None
        return self.split_maps.get(tensor.name)

    @staticmethod
    def shape(tensor: gs.Tensor | None) -> tuple[int | None, ...] | None:
        """Static shape with None for unknown dims; None when the rank is unknown."""
        if tensor is None:
            return None
        shape = tensor.shape
        if shape is None:
            return None
        return tuple(d if isinstance(d, (int, np.integer)) and d >= 0 else None for d in shape)

    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The tensor's value when it is a constant (folding small constant subgraphs)."""
        return self.consts.value(tensor)

    # ---- recording facts ----
    def new_source(self, node: gs.Node, rows: np.ndarray) -> np.ndarray:
        """Create one atom per filter row of ``node``; returns the atom labels."""
        n = rows.shape[0]
        atoms = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        member = self.add_member(node, atoms, rows, creates=True)
        self.sources.append(Source(node.name, node.op, self.n_atoms, n, member))
        self.n_atoms += n
        return atoms

    def new_constant_atoms(self, n: int, where: str) -> np.ndarray:
        """Atoms for ``n`` constant channels (padding appended by ``where``): they hold no
        filters and constrain nothing, so a channel they meet (the main branch of a residual
        Add) stays free, and removing it removes the constant channel too. A class of constant
        atoms that meets no filters is blocked in ``finish`` (nothing would score it)."""
        atoms = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        self.n_atoms += n
        self._constant_runs.append((atoms, where))
        return atoms

    def new_virtual(self, n: int) -> np.ndarray:
        """``n`` atoms of no producer (copies of channels, see ``repeats``): they join the
        classes of what they are coupled with and carry no filters."""
        atoms = np.arange(self.n_atoms, self.n_atoms + n, dtype=np.int64)
        self.n_atoms += n
        return atoms

    def add_member(self, node: gs.Node, atoms: np.ndarray, rows: np.ndarray, creates: bool) -> int:
        keep = atoms >= 0
        rows = rows.reshape(rows.shape[0], -1)
        if not keep.all():  # boolean indexing copies: a whole layer stays a view
            rows = rows[keep]
        self.members.append(
            Member(node.name, node.op, atoms[keep], rows, np.ones(len(rows)), creates)
        )
        return len(self.members) - 1

    def scale_member(self, cmap: ChannelMap, scale: np.ndarray) -> None:
        """Fold a per-channel scale virtually into the producer's filters (BN after Conv)."""
        if cmap.fold_member is None:
            return
        member = self.members[cmap.fold_member]
        scale = np.broadcast_to(np.asarray(scale, dtype=np.float64).reshape(-1), cmap.labels.shape)
        position = {int(a): i for i, a in enumerate(cmap.labels)}
        idx = np.array([position[int(a)] for a in member.atoms], dtype=np.int64)
        member.scale = member.scale * scale[idx]

    def couple(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """Positions of ``a`` and ``b`` hold the same channel; a fixed (-1) partner blocks."""
        a = np.asarray(a)
        b = np.asarray(b)
        both = (a >= 0) & (b >= 0)
        if both.any():
            self._pairs.append((a[both], b[both]))
        lone = np.concatenate([a[(a >= 0) & (b < 0)], b[(b >= 0) & (a < 0)]])
        if len(lone):
            self._blocked.append((lone, f"coupled with channels that cannot be pruned at {where}"))

    def share(self, a: np.ndarray, b: np.ndarray) -> None:
        """Positions of ``a`` and ``b`` read one shared weight's entries: coupled in ``finish``
        when neither meets a blocked channel (else each use keeps its own slice)."""
        self._shared.append((np.asarray(a), np.asarray(b)))

    def couple_heads(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        """``couple`` for heads named by one atom each (a split level's representative): the
        heads are the same, but not their dims (``head_dims``)."""
        n = len(self._pairs)
        self.couple(a, b, where)
        self._head_pairs.extend(self._pairs[n:])
        del self._pairs[n:]

    def head_labels(self, smap: SplitMap, position: int, where: str) -> np.ndarray:
        """Atoms of their own for the entries of level ``position`` (the heads of a score
        tensor), each coupled with its head as a whole (``couple_heads``)."""
        atoms = self.new_virtual(smap.labels.shape[position])
        representative = smap.representative(position)
        atoms[representative < 0] = -1
        self.couple_heads(atoms, representative, where)
        return atoms

    def balance(self, blocks: list[np.ndarray], what: str) -> None:
        """These blocks of channels must keep equal counts (the groups of a grouped conv)."""
        self.balanced.append((what, blocks))

    def cut(self, labels: np.ndarray, position: int) -> None:
        """A Split/Slice boundary between ``position - 1`` and ``position``."""
        if 0 < position < len(labels) and labels[position - 1] >= 0 and labels[position] >= 0:
            self._cuts.append((labels[position - 1 : position], labels[position : position + 1]))

    def block(self, cmap: ChannelMap | np.ndarray | None, reason: str) -> None:
        if cmap is None:
            return
        labels = cmap.labels if isinstance(cmap, (ChannelMap, SplitMap)) else np.asarray(cmap)
        labels = labels[labels >= 0]
        if len(labels):
            self._blocked.append((labels, reason))

    def block_tensor(self, tensor: gs.Tensor | None, reason: str) -> None:
        cmap = self.map(tensor) or self.split_map(tensor)
        if cmap is not None and np.any(cmap.labels >= 0):
            self.blocked_tensors.append((tensor.name, reason))
            self.block(cmap, reason)

    def block_inputs(self, node: gs.Node, reason: str) -> None:
        for tensor in node.inputs:
            self.block_tensor(tensor, reason)

    # ---- shape values ----
    # A value computed from a mapped tensor's Shape that may hold its channel count is
    # *tainted*: it may flow through shape arithmetic and end as the shape parameter of an op
    # whose handler rewrites that parameter from the surviving channels (Split sizes, Reshape
    # target, Resize sizes). Any other use would keep a stale channel count: it blocks.
    # Through ops that only move elements (Gather, Slice, Concat, Cast, ...) the taint is
    # followed element by element (``shape_values``), so picking the batch out of a shape
    # vector leaves the channels free.
    def check_shape_taint(self, node: gs.Node) -> None:
        tainted = [(i, t) for i, t in enumerate(node.inputs)
                   if t is not None and t.name in self.shape_maps]
        if not tainted:
            return
        if node.op in ELEMENT_MOVING_OPS and node.op != "Shape" and \
                not any(self.map(t) for t in node.inputs) and self._taint_elements(node):
            return
        for index, tensor in tainted:
            cmap = self.shape_maps[tensor.name]
            data = self.map(node.inputs[0])
            if (node.op, index) in ELEMENTWISE_PARAMETER_INPUTS and data is not None:
                continue  # the handler checks (or couples) every channel count, element-wise
            if (node.op, index) in SHAPE_PARAMETER_INPUTS and data is not None and \
                    np.array_equal(data.labels, cmap.labels):
                continue  # the handler rewrites this parameter from the same channels
            if node.op in SHAPE_ARITHMETIC and not any(self.map(t) for t in node.inputs):
                for out in node.outputs:
                    self.shape_maps[out.name] = cmap
                continue
            self.block(cmap, f"channel count read by {node.op} {node.name}")

    def _taint_elements(self, node: gs.Node) -> bool:
        """Taint ``node``'s output with exactly the channel counts among its elements.

        False when the output's elements cannot be followed (then the whole-vector rules apply).
        """
        if len(node.outputs) != 1:
            return False
        elements = tensor_elements(node.outputs[0], self)
        if elements is None:
            return False
        labels = channel_labels(elements)
        if labels is not None:
            self.shape_maps[node.outputs[0].name] = ChannelMap(0, labels)
        return True

    # ---- finishing ----
    def finish(self) -> Analysis:
        head_atoms, head_slabs = resolve_splits(self)
        slabs_from = len(self._pairs)  # a head's atoms into one head: not a coupling of dims
        for slab, where in head_slabs:
            self.couple(np.full_like(slab, slab[0]), slab, where)
        self._pairs.extend(self._head_pairs)
        slabs_to = len(self._pairs)
        blocked = np.concatenate([labels for labels, _ in self._blocked] or
                                 [np.zeros(0, np.int64)])
        slot_repeats = resolve_repeats(self.repeats, self.split_records, blocked, self.couple,
                                       self.block)
        self._pairs.extend(self._unblocked_shares())
        n = self.n_atoms
        parent = np.arange(n, dtype=np.int64)

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        def union(pairs) -> None:
            for a_arr, b_arr in pairs:
                for a, b in zip(a_arr.tolist(), b_arr.tolist()):
                    ra, rb = find(a), find(b)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)

        union(self._pairs[:slabs_from])
        union(self._pairs[slabs_to:])
        fine_roots = np.array([find(i) for i in range(n)], dtype=np.int64) if head_slabs \
            else None
        union(self._pairs[slabs_from:slabs_to])
        roots = np.array([find(i) for i in range(n)], dtype=np.int64)
        unique_roots, class_of_atom = np.unique(roots, return_inverse=True)
        n_classes = len(unique_roots)

        class_blocked: list[str | None] = [None] * n_classes
        for labels, reason in self._blocked:
            for c in np.unique(class_of_atom[labels]).tolist():
                if class_blocked[c] is None:
                    class_blocked[c] = reason

        self._block_unscored(class_of_atom, n_classes, class_blocked)
        groups = self._build_groups(class_of_atom, n_classes, class_blocked)
        if head_atoms:
            head_class = np.zeros(n_classes, dtype=bool)
            head_class[class_of_atom[np.concatenate(head_atoms)]] = True
            for group in groups:
                group.heads = bool(head_class[group.classes].any())
        dims = resolve_head_dims(self.split_records, fine_roots, self.contracted,
                                 class_of_atom, class_blocked) if fine_roots is not None \
            else HeadDims()
        dim_class_of_atom = self._add_dim_groups(dims, groups, class_blocked)
        return Analysis(
            maps=self.maps,
            sources=self.sources,
            members=self.members,
            class_of_atom=class_of_atom,
            class_blocked=class_blocked,
            groups=groups,
            blocked_tensors=self.blocked_tensors,
            ranks=self._ranks(),
            balanced=self.balanced,
            split_maps=self.split_maps,
            split_free=[r.free_level for r in self.split_records],
            shape_maps=self.shape_maps,
            computed_scales=self.computed_scales,
            slot_repeats=slot_repeats,
            dim_atoms=dims.atoms,
            dim_class_of_atom=dim_class_of_atom,
        )

    def _unblocked_shares(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The ``share`` pairs none of whose atoms is in a class that holds a blocked atom."""
        if not self._shared:
            return []
        classes = UnionFind(self.n_atoms)
        for a_arr, b_arr in self._pairs:
            for a, b in zip(a_arr.tolist(), b_arr.tolist()):
                classes.union(a, b)
        blocked = {classes.find(a) for labels, _ in self._blocked for a in labels.tolist()}
        return [(a, b) for a, b in self._shared
                if not any(classes.find(x) in blocked for x in np.concatenate([a, b]).tolist())]

    def _add_dim_groups(self, dims: HeadDims, groups: list[Group],
                        class_blocked: list[str | None]) -> np.ndarray:
        """The head dims' units as classes after the others (``Analysis.dim_atoms``), one
        group per set of units over the same records; returns each atom's unit class."""
        first = len(class_blocked)
        class_blocked.extend(dims.blocked)
        dim_class = np.full(self.n_atoms, -1, dtype=np.int64)
        for unit, atoms in enumerate(dims.atoms):
            dim_class[atoms] = first + unit
        for units in dims.groups:
            classes = np.array([first + u for u in units], dtype=np.int64)
            atoms = np.concatenate([dims.atoms[u] for u in units])
            inside = np.zeros(self.n_atoms, dtype=bool)
            inside[atoms] = True
            members = [i for i, m in enumerate(self.members) if inside[m.atoms].any()]
            members.sort(key=lambda i: (not self.members[i].creates, i))
            producers = list(dict.fromkeys(self.members[i].node for i in members))
            frozen = next((class_blocked[c] for c in classes if class_blocked[c]), None)
            if not members:
                frozen = frozen or "head dims meet no filters"
            groups.append(Group(len(groups), classes, members, producers, frozen, dims=True))
        return dim_class

    def _block_unscored(self, class_of_atom: np.ndarray, n_classes: int,
                        class_blocked: list[str | None]) -> None:
        """Classes of constant channels alone (no member holds a filter of them) stay."""
        if not self._constant_runs:
            return
        scored = np.zeros(n_classes, dtype=bool)
        for member in self.members:
            scored[class_of_atom[member.atoms]] = True
        for atoms, where in self._constant_runs:
            for c in np.unique(class_of_atom[atoms]).tolist():
                if not scored[c] and class_blocked[c] is None:
                    class_blocked[c] = f"constant channels of {where} meet no filters"

    def _ranks(self) -> dict[str, int]:
        tensors = {name: t for g in with_bodies(self.graph) for name, t in g.tensors().items()}
        ranks = {}
        for name in [*self.maps, *self.split_maps]:
            shape = tensors[name].shape if name in tensors else None
            if shape is not None:
                ranks[name] = len(shape)
        return ranks

    def _build_groups(
        self, class_of_atom: np.ndarray, n_classes: int, class_blocked: list[str | None]
    ) -> list[Group]:
        gparent = list(range(n_classes))

        def gfind(x: int) -> int:
            while gparent[x] != x:
                gparent[x] = gparent[gparent[x]]
                x = gparent[x]
            return x

        cut_pairs = {(int(a[0]), int(b[0])) for a, b in self._cuts}
        runs = [np.arange(src.start, src.start + src.n) for src in self.sources]
        for atoms in [*runs, *(atoms for atoms, _ in self._constant_runs)]:
            cls = class_of_atom[atoms]
            for i in range(len(atoms) - 1):
                if (int(atoms[i]), int(atoms[i + 1])) in cut_pairs:
                    continue
                ra, rb = gfind(int(cls[i])), gfind(int(cls[i + 1]))
                if ra != rb:
                    gparent[max(ra, rb)] = min(ra, rb)
        group_of_class = np.array([gfind(c) for c in range(n_classes)], dtype=np.int64)

        # Stable order: groups by their smallest atom, classes by their smallest atom.
        first_atom = np.full(n_classes, np.iinfo(np.int64).max)
        np.minimum.at(first_atom, class_of_atom, np.arange(len(class_of_atom)))
        order = np.lexsort((first_atom, group_of_class))
        groups: dict[int, list[int]] = {}
        for c in order.tolist():
            groups.setdefault(int(group_of_class[c]), []).append(c)
        ordered = sorted(groups.values(), key=lambda cs: first_atom[cs[0]])

        member_group: list[set[int]] = []
        for m in self.members:
            member_group.append(set(np.unique(group_of_class[class_of_atom[m.atoms]]).tolist()))
        result: list[Group] = []
        for gid, cls in enumerate(ordered):
            root = int(group_of_class[cls[0]])
            members = [i for i, gs_ in enumerate(member_group) if root in gs_]
            members.sort(key=lambda i: (not self.members[i].creates, i))
            producers = list(dict.fromkeys(self.members[i].node for i in members))
            frozen = next((class_blocked[c] for c in cls if class_blocked[c] is not None), None)
            result.append(Group(gid, np.array(cls, dtype=np.int64), members, producers, frozen))
        return result
