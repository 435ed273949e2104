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

    from .context import AnalysisContext
    from .rewrite_context import RewriteContext


class OpHandler(Protocol):
    """What every op handler provides."""

    def propagate(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """Set output channel maps, create/couple/block channels."""

    def apply(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Slice constants and fix attributes for the surviving channels."""


_HANDLERS: dict[str, OpHandler] = {}
#: Handlers of ops in other domains (com.microsoft's fused attention): (domain, op) -> handler.
_DOMAIN_HANDLERS: dict[tuple[str, str], OpHandler] = {}


def register(*op_types: str, domain: str = ""):
    """Class decorator: instantiate the handler once and register it for ``op_types``."""

    def wrap(cls):
        instance = cls()
        for op in op_types:
            table, key = (_HANDLERS, op) if not domain else (_DOMAIN_HANDLERS, (domain, op))
            if key in table:
                raise ValueError(f"handler for {op} registered twice")
            table[key] = instance
        return cls

    return wrap


def handler_for(op_type: str, domain: str = "") -> OpHandler | None:
    """The handler of an op, or None (the op then blocks)."""
    if domain not in ("", "ai.onnx"):
        return _DOMAIN_HANDLERS.get((domain, op_type))
    return _HANDLERS.get(op_type)


def ops() -> list[str]:
    """Every default-domain op type with a handler, sorted (the README's support table is
    checked against it)."""
    return sorted(_HANDLERS)


def domain_ops() -> list[str]:
    """Ops of other domains with a handler, as ``domain::op``."""
    return sorted(f"{d}::{op}" for d, op in _DOMAIN_HANDLERS)
