"""Channel propagation over the whole graph: channel maps, couplings, groups.

Every producer (a Conv's filters, a Gemm/MatMul's output features) creates *atoms*, one per output
channel. Each activation tensor may carry a :class:`ChannelMap`: the axis that holds channels and,
for each position on it, the atom found there (-1: a position no producer of ours owns, e.g. a
graph input's channel). Handlers move maps through ops (Transpose moves the axis, Flatten repeats
labels, Concat joins them, Split cuts them) and record three facts:

* coupling: two positions must hold the same channel (both inputs of a residual ``Add``), so their
  atoms are removed together (union-find -> *classes*);
* cuts: a ``Split``/``Slice`` cuts a producer into parts that are pruned as independent groups;
* blocks: a channel reaching something we cannot rewrite exactly (a graph output, an unknown op,
  a reduction over channels) is never removed; the reason is kept for the report.

A *group* is a set of classes that are scored together and pruned at one sparsity: the classes
coupled with each other plus the neighbouring channels of the same producer (unless cut).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_graphsurgeon as gs

from .blocks import SplitMap, SplitRecord, block_split_readers, resolve_splits
from .constants import FOLDABLE_OPS, ConstantFolder
from .registry import handler_for
from .shape_values import ELEMENT_MOVING_OPS, channel_labels, refine_shapes, tensor_elements

logger = logging.getLogger(__name__)

#: (op, input index) whose shape parameter the op's handler rewrites from surviving channels.
SHAPE_PARAMETER_INPUTS = frozenset({("Split", 1), ("Reshape", 1), ("Resize", 3), ("Slice", 1),
                                    ("Slice", 2), ("SplitToSequence", 1)})
#: Shape parameters whose handler reads them element by element (``shape_values``).
ELEMENTWISE_PARAMETER_INPUTS = frozenset({("Reshape", 1), ("Resize", 3)})
#: QOperator/integer layer ops (no handler): named in the report even when no channel of ours
#: reaches them. QDQ layers are float ops over DequantizeLinear and are pruned like float ones.
QUANTIZED_LAYERS = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                              "QGemm", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul",
                              "MatMulIntegerToFloat", "QAttention", "QLinearConvTranspose"})
#: Ops that may carry a channel count along in shape arithmetic.
SHAPE_ARITHMETIC = FOLDABLE_OPS - {"Shape"}


@dataclass(frozen=True)
class ChannelMap:
    """Which atom sits at each position of a tensor's channel axis.

    Attributes:
        axis: the channel axis (non-negative).
        labels: int64 atom id per position; -1 for positions that are not ours to prune.
        fold_member: member whose filter rows a per-channel scale here would fold into
            (a producer's direct output, possibly after a bias Add), for virtual BN folding.
        shape_index: set when the tensor is a 1-D shape vector whose element ``shape_index``
            is the channel count (``Shape`` of a mapped tensor).
        heads: the channels are attention heads merged back (``head_dim`` per head): the
            output projection reading them joins the heads' scoring.
    """

    axis: int
    labels: np.ndarray
    fold_member: int | None = None
    shape_index: int | None = None
    heads: bool = False

    def moved(self, axis: int, labels: np.ndarray | None = None) -> ChannelMap:
        """The same channels on another axis (and optionally other labels); no fold target."""
        return ChannelMap(axis, self.labels if labels is None else labels)

    def passed(self) -> ChannelMap:
        """The same channels after an op that changes values: the fold target is lost."""
        return replace(self, fold_member=None)


@dataclass
class Member:
    """One node's filters that belong to channels of a group (scored by FPGM)."""

    node: str
    op: str
    atoms: np.ndarray  # atom per row
    rows: np.ndarray  # (n, D) float filters, one per atom
    scale: np.ndarray  # (n,) virtual per-channel scale (BN folded virtually)
    creates: bool  # True: the node's own output channels; False: pass-through (depthwise)


@dataclass
class Source:
    """A node whose output channels are atoms ``start .. start + n``."""

    node: str
    op: str
    start: int
    n: int
    member: int


@dataclass
class Group:
    """Coupled channels pruned together.

    Attributes:
        id: index in the analysis' group list.
        classes: class ids of the group's channels, in a stable order.
        members: member ids contributing filters.
        producers: node names of the members (sources first).
        frozen: why the group cannot be pruned, or None.
    """

    id: int
    classes: np.ndarray
    members: list[int]
    producers: list[str]
    frozen: str | None = None
    heads: bool = False  # the channels are attention heads (--head-sparsity applies)

    @property
    def n_channels(self) -> int:
        return len(self.classes)


@dataclass
class Analysis:
    """Everything later stages need from the dependency analysis."""

    maps: dict[str, ChannelMap]
    sources: list[Source]
    members: list[Member]
    class_of_atom: np.ndarray
    class_blocked: list[str | None]
    groups: list[Group]
    blocked_tensors: list[tuple[str, str]] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)  # rank of each mapped tensor, if known
    #: Blocks of channels that must keep equal counts (grouped convs): (what, label blocks).
    balanced: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)
    #: Tensors whose channel axis is split over several axes, and each split's free level.
    split_maps: dict[str, SplitMap] = field(default_factory=dict)
    split_free: list[int | None] = field(default_factory=list)
    #: Values computed from a mapped tensor's shape (see AnalysisContext.shape_maps).
    shape_maps: dict[str, ChannelMap] = field(default_factory=dict)

    def all_labels(self):
        """(tensor name, flat labels) of every mapped tensor, split or not."""
        for name, cmap in self.maps.items():
            yield name, cmap.labels
        for name, smap in self.split_maps.items():
            yield name, smap.flat()

    @property
    def n_atoms(self) -> int:
        return len(self.class_of_atom)

    @property
    def group_of_class(self) -> np.ndarray:
        """Group id of every class (derived from ``groups``, computed once)."""
        cached = self.__dict__.get("_group_of_class")
        if cached is None:
            cached = np.empty(len(self.class_blocked), dtype=np.int64)
            for group in self.groups:
                cached[group.classes] = group.id
            self.__dict__["_group_of_class"] = cached
        return cached

    def removed_atoms(self, removed_classes: np.ndarray) -> np.ndarray:
        """Boolean mask over atoms for a set of removed class ids."""
        mask = np.zeros(self.n_atoms + 1, dtype=bool)  # last slot: label -1
        if len(removed_classes):
            is_removed_class = np.zeros(len(self.class_blocked), dtype=bool)
            is_removed_class[removed_classes] = True
            mask[:-1] = is_removed_class[self.class_of_atom]
        return mask


class AnalysisContext:
    """State shared by the handlers while channel maps are propagated."""

    def __init__(self, graph: gs.Graph, opset: int,
                 overridable: frozenset[str] = frozenset()) -> None:
        self.graph = graph
        self.opset = opset
        self.maps: dict[str, ChannelMap] = {}
        self.sources: list[Source] = []
        self.members: list[Member] = []
        self.n_atoms = 0
        self._pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._cuts: list[tuple[np.ndarray, np.ndarray]] = []
        self._blocked: list[tuple[np.ndarray, str]] = []
        self.blocked_tensors: list[tuple[str, str]] = []
        self.balanced: list[tuple[str, list[np.ndarray]]] = []
        self.consts = ConstantFolder(opset, overridable)
        #: Sequences cut from a mapped tensor (SplitToSequence): name -> channel map per part.
        self.sequences: dict[str, list[ChannelMap]] = {}
        #: Values computed from the shape of a mapped tensor: name -> its channel map.
        self.shape_maps: dict[str, ChannelMap] = {}
        #: Tensors whose channel axis a Reshape split over several axes (see blocks.py).
        self.split_maps: dict[str, SplitMap] = {}
        self.split_records: list[SplitRecord] = []
        #: Tensors whose shape a handler found where onnx's inference could not (a computed
        #: Reshape target); shapes are inferred onward from them, node by node.
        self.refined: set[str] = set()

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
        head_atoms = resolve_splits(self)
        n = self.n_atoms
        parent = np.arange(n, dtype=np.int64)

        def find(x: int) -> int:
            root = x
            while parent[root] != root:
                root = parent[root]
            while parent[x] != root:
                parent[x], x = root, parent[x]
            return root

        for a_arr, b_arr in self._pairs:
            for a, b in zip(a_arr.tolist(), b_arr.tolist()):
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
        roots = np.array([find(i) for i in range(n)], dtype=np.int64)
        unique_roots, class_of_atom = np.unique(roots, return_inverse=True)
        n_classes = len(unique_roots)

        class_blocked: list[str | None] = [None] * n_classes
        for labels, reason in self._blocked:
            for c in np.unique(class_of_atom[labels]).tolist():
                if class_blocked[c] is None:
                    class_blocked[c] = reason

        groups = self._build_groups(class_of_atom, n_classes, class_blocked)
        if head_atoms:
            head_class = np.zeros(n_classes, dtype=bool)
            head_class[class_of_atom[np.concatenate(head_atoms)]] = True
            for group in groups:
                group.heads = bool(head_class[group.classes].any())
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
        )

    def _ranks(self) -> dict[str, int]:
        tensors = self.graph.tensors()
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
        for src in self.sources:
            atoms = np.arange(src.start, src.start + src.n)
            cls = class_of_atom[atoms]
            for i in range(src.n - 1):
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


def build_analysis(graph: gs.Graph, opset: int,
                   overridable: frozenset[str] = frozenset()) -> Analysis:
    """Propagate channel maps through ``graph`` (topologically ordered) and build the groups.

    ``overridable`` names initializers that are also graph inputs: not treated as constants.
    """
    ctx = AnalysisContext(graph, opset, overridable)
    for node in graph.nodes:
        if ctx.refined:
            refine_shapes(node, ctx)
        ctx.check_shape_taint(node)
        subgraph_reason = _subgraph_reason(node)
        handler = handler_for(node.op, node.domain or "")
        if subgraph_reason:
            ctx.block_inputs(node, subgraph_reason)
            _block_outer_references(node, ctx, subgraph_reason)
            continue
        if handler is None:
            ctx.block_inputs(node, f"consumed by unsupported op {node.op} ({node.name})")
            if node.op in QUANTIZED_LAYERS and node.outputs:
                ctx.blocked_tensors.append(
                    (node.outputs[0].name, f"{node.op} {node.name}: QOperator quantized layers "
                                           "are not pruned (no handler)"))
            continue
        block_split_readers(node, handler, ctx)
        try:
            handler.propagate(node, ctx)
        except Exception as err:  # a handler bug must never yield a wrong model: block instead
            logger.warning("analysis of %s (%s) failed: %s", node.name, node.op, err)
            ctx.block_inputs(node, f"could not analyse {node.op} ({node.name}): {err}")
            for out in node.outputs:
                ctx.maps.pop(out.name, None)
                ctx.split_maps.pop(out.name, None)
    for out in graph.outputs:
        ctx.block_tensor(out, f"reaches graph output {out.name}")
        if out.name in ctx.shape_maps:
            ctx.block(ctx.shape_maps[out.name], f"channel count reaches graph output {out.name}")
    return ctx.finish()


def _subgraph_reason(node: gs.Node) -> str | None:
    if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return f"consumed by control-flow op {node.op} ({node.name}), left untouched"
    return None


def _block_outer_references(node: gs.Node, ctx: AnalysisContext, reason: str) -> None:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for sub in value.nodes:
                for tensor in sub.inputs:
                    ctx.block_tensor(tensor, reason)
                _block_outer_references(sub, ctx, reason)
