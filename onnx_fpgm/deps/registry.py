"""One registry of op handlers: all op-specific channel knowledge lives in the handlers.

A handler answers two questions about one node:

* ``propagate(node, ctx)`` (analysis): given the channel maps of the node's inputs, which channel
  map does each output carry, which channels are coupled, which are created (a producer's filters),
  and which are blocked (with a reason)?
* ``apply(node, ctx)`` (rewrite): given which channel positions survive on each input and output,
  slice the node's constant inputs and fix its attributes.

Handlers are stateless singletons; all context comes in as arguments. An op without a handler
blocks every channel that reaches it (never defaulted to "element-wise").
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from .analysis import AnalysisContext
    from .rewrite_context import RewriteContext


class OpHandler(Protocol):
    """What every op handler provides."""

    def propagate(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """Set output channel maps, create/couple/block channels."""

    def apply(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Slice constants and fix attributes for the surviving channels."""


_HANDLERS: dict[str, OpHandler] = {}


def register(*op_types: str):
    """Class decorator: instantiate the handler once and register it for ``op_types``."""

    def wrap(cls):
        instance = cls()
        for op in op_types:
            if op in _HANDLERS:
                raise ValueError(f"handler for {op} registered twice")
            _HANDLERS[op] = instance
        return cls

    return wrap


def handler_for(op_type: str, domain: str = "") -> OpHandler | None:
    """The handler of an op in the default ONNX domain, or None (the op then blocks)."""
    if domain not in ("", "ai.onnx"):
        return None
    return _HANDLERS.get(op_type)


def ops() -> list[str]:
    """Every op type with a handler, sorted (the README's support table is checked against it)."""
    return sorted(_HANDLERS)
