"""What the dependency analysis finds: channel maps, channel owners, groups (the data types).

Later stages (planning, verification, compensation) read these; the analysis itself
(``analysis.build_analysis``, with ``context.AnalysisContext`` as its working state) writes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .blocks import SplitMap
from .repeats import RepeatCopies


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
    dims: bool = False  # the channels are head dimensions within the heads (``head_dims``)

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
    #: Softmax scales computed from a Shape, fed their original values by the rewrite when an
    #: axis it reads shrinks (``computed_scale``): Shape node name -> (axes read, [(tensor
    #: name, value)]).
    computed_scales: dict[str, tuple[tuple[int, ...], list[tuple[str, np.ndarray]]]] = \
        field(default_factory=dict)
    #: repeat_kv Reshapes (by name) whose KV heads stay whole and whose query slots prune.
    slot_repeats: dict[str, RepeatCopies] = field(default_factory=dict)
    #: Head dims (``head_dims``): the atoms of class ``n_base_classes + u`` for each unit u,
    #: classes of their own beside the heads they cut across; each atom's unit class or -1.
    dim_atoms: list[np.ndarray] = field(default_factory=list)
    dim_class_of_atom: np.ndarray | None = None

    @property
    def n_base_classes(self) -> int:
        """Classes of ``class_of_atom`` (the head dims' units come after them)."""
        return len(self.class_blocked) - len(self.dim_atoms)

    def class_of(self, group: Group) -> np.ndarray:
        """Each atom's class in ``group``'s terms: its unit for head dims, else its class."""
        if group.dims and self.dim_class_of_atom is not None:
            return self.dim_class_of_atom
        return self.class_of_atom

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
            first = self.n_base_classes
            for c in np.asarray(removed_classes)[np.asarray(removed_classes) >= first].tolist():
                mask[self.dim_atoms[c - first]] = True
        return mask
