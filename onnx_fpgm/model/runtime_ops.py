"""Ops that onnxruntime registers and onnx's checker does not know.

onnxruntime's own tools write some of its contrib ops in the default domain
(``SimplifiedLayerNormalization`` by the onnxruntime-genai model builder): onnxruntime runs the
file, ``onnx.checker`` refuses it ("No Op registered for SimplifiedLayerNormalization with
domain_version of 22"). Such a model is loaded with a note, and checked (the input at load, the
pruned model at export) on a copy in which those nodes sit in a private domain the checker
skips: everything else is checked as usual, and the export must pass what the input passed.
"""
from __future__ import annotations

import functools

import onnx

#: The domain the checker's copy moves onnxruntime-only nodes to (declared, never written out).
PRIVATE_DOMAIN = "onnx_fpgm.runtime_only"
_DEFAULT_DOMAINS = ("", "ai.onnx")


def unknown_to_onnx(model: onnx.ModelProto) -> set[tuple[str, str]]:
    """(op, domain) of nodes in the default domain whose op onnx has no schema for."""
    return {(node.op_type, node.domain) for node in _all_nodes(model.graph)
            if node.domain in _DEFAULT_DOMAINS and not onnx.defs.has(node.op_type)}


def runtime_only_ops(model: onnx.ModelProto) -> list[str]:
    """Default-domain ops of ``model`` that onnx does not know and onnxruntime registers.

    Empty when every op is known to onnx (onnxruntime is then not imported at all), or when
    some unknown op is unknown to onnxruntime too (a real error: the checker's word stands).
    """
    unknown = unknown_to_onnx(model)
    if not unknown:
        return []
    registered = _onnxruntime_default_domain_ops()
    if any(op not in registered for op, _ in unknown):
        return []
    return sorted(op for op, _ in unknown)


@functools.cache  # onnxruntime's schema list does not change within a process
def _onnxruntime_default_domain_ops() -> frozenset[str]:
    # imported on first use: keeps onnxruntime off the CLI's start-up path
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    return frozenset(s.name for s in ort_state.get_all_operator_schema()
                     if s.domain in _DEFAULT_DOMAINS)


def move_to_private_domain(model: onnx.ModelProto, ops: list[str]) -> None:
    """In place (on the checker's copy): ``ops``' default-domain nodes to ``PRIVATE_DOMAIN``."""
    moved = set(ops)
    for node in _all_nodes(model.graph):
        if node.domain in _DEFAULT_DOMAINS and node.op_type in moved:
            node.domain = PRIVATE_DOMAIN
    if not any(o.domain == PRIVATE_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(PRIVATE_DOMAIN, 1))


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)
