"""The symbolic dims of a model's inputs, their roles, and the sizes chosen for them (the data
types ``input_sizes`` fills and the analysis, verification and MACs read)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import onnx

from ..model.runtime import ANONYMOUS, is_unknown, real_inputs
from .cache_inputs import cache_head_sizes, past_axes


class Role(Enum):
    """What a symbolic dim stands for; decides its candidate values."""

    BATCH = "batch"
    HEIGHT = "height"
    WIDTH = "width"
    CHANNELS = "channels"
    SEQUENCE = "sequence"
    PAST = "past sequence"  # a KV cache's past length (``cache_inputs``)
    HEAD_SIZE = "head size"  # a KV cache's head size, fixed by the op reading it (``value``)


@dataclass(frozen=True)
class SymbolicDim:
    """One symbolic dim of a graph input: where it is, its symbol key and its role."""

    input: str
    axis: int
    symbol: str  # dim_param, or "input:axis" for an anonymous dim
    role: Role
    value: int | None = None  # the only size it can take (Role.HEAD_SIZE)


@dataclass
class InputSizes:
    """The sizes used for verification, MACs and shape inference.

    Attributes:
        primary: shape of every real graph input (batch 1): MACs, first verification.
        secondary: another set the original model runs at (other batch/spatial sizes), or None
            when the model has no symbolic dims or accepts no second size.
        given: True when the caller gave ``input_shapes`` (the primary set is theirs).
        dims: the symbolic dims of the inputs.
        probes: onnxruntime runs spent on choosing.
        note: why the sizes are unconfirmed, when the model ran at none (``must_run`` off).
        budget_note: which candidate sizes were skipped for their activation memory.
    """

    primary: dict[str, tuple[int, ...]] = field(default_factory=dict)
    secondary: dict[str, tuple[int, ...]] | None = None
    given: bool = False
    dims: list[SymbolicDim] = field(default_factory=list)
    probes: int = 0
    note: str | None = None  # the model ran at none of them (accepted when nothing must run)
    budget_note: str | None = None  # sizes skipped for their activation memory

    @property
    def sets(self) -> list[dict[str, tuple[int, ...]]]:
        """The size sets to verify at (one or two)."""
        return [self.primary] + ([self.secondary] if self.secondary else [])

    def to_dict(self) -> dict:
        return {"primary": {k: list(v) for k, v in self.primary.items()},
                "secondary": None if self.secondary is None else
                {k: list(v) for k, v in self.secondary.items()},
                "given": self.given,
                "symbolic_dims": [f"{d.input}[{d.axis}]={d.symbol}" for d in self.dims]}


def symbolic_dims(model: onnx.ModelProto) -> list[SymbolicDim]:
    """Every symbolic or unknown dim of the real graph inputs, with its role."""
    found = []
    cache, head_sizes = past_axes(model), cache_head_sizes(model)
    for value in real_inputs(model):
        ttype = value.type.tensor_type
        if not ttype.HasField("shape"):
            continue
        dims = list(ttype.shape.dim)
        roles = [Role.PAST if (value.name, axis) in cache else role
                 for axis, role in enumerate(_roles(dims, ttype.elem_type))]
        for axis, dim in enumerate(dims):
            if is_unknown(dim):
                name = dim.dim_param.strip()
                symbol = name if name not in ANONYMOUS else f"{value.name}:{axis}"
                fixed = head_sizes.get((value.name, axis))
                found.append(SymbolicDim(value.name, axis, symbol, Role.HEAD_SIZE, fixed)
                             if fixed else SymbolicDim(value.name, axis, symbol, roles[axis]))
    return found


def _roles(dims, elem_type: int) -> list[Role]:
    """Roles by rank and layout: NCHW/NHWC images, [B, T(, F)] sequences, else sequence-like."""
    rank = len(dims)
    roles = [Role.BATCH] + [Role.SEQUENCE] * (rank - 1)
    is_float = onnx.helper.tensor_dtype_to_np_dtype(elem_type).kind == "f" if elem_type else True
    if rank == 4 and is_float:
        def small(d):
            return not is_unknown(d) and d.dim_value <= 4

        nhwc = small(dims[3]) and not small(dims[1])
        roles[1:] = ([Role.HEIGHT, Role.WIDTH, Role.CHANNELS] if nhwc else
                     [Role.CHANNELS, Role.HEIGHT, Role.WIDTH])
    elif rank == 5 and is_float:
        roles[1:] = [Role.CHANNELS, Role.SEQUENCE, Role.HEIGHT, Role.WIDTH]
    return roles
