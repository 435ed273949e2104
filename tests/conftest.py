"""Shared fixtures and the independent checks every pruning test applies."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.deps.interface import interface_changes
from onnx_fpgm.oracle.resized_interface import declared_after


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def runtime_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of nodes that depend on a graph input (constant subgraphs may be folded away)."""
    initializers = {t.name for t in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in initializers}
    names = []
    for node in model.graph.node:
        data_inputs = list(node.input)
        if node.op_type in ("Shape", "Size"):
            data_inputs = []  # only the shape is read: a constant for static shapes
        elif node.op_type == "CastLike":
            data_inputs = data_inputs[:1]  # the second input lends only its dtype
        if any(i in live for i in data_inputs):
            live.update(node.output)
            names.append(node.name)
    return names


def check_pruned(original: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    """Checks independent of the tool's own report: interface, names, checker, oracle, bytes."""
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    from onnx_fpgm.deps.reasons import classify

    for group in result.report.groups:
        if group.frozen:
            assert classify(group.frozen), f"undocumented blocking reason: {group.frozen}"
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    # only KV caches shrink, and only under --allow-interface-change
    changes = interface_changes(result.analysis, result.plan.removed_classes, original)
    assert not changes or result.report.settings.get("allow_interface_change") == "true"
    declared = declared_after(original, changes)
    assert [(o.name, o.type) for o in pruned.graph.output] == \
        [(o.name, o.type) for o in declared.graph.output]
    assert pruned.ir_version == original.ir_version
    assert list(pruned.opset_import) == list(original.opset_import)
    # Node names and order of everything that runs on data are preserved; the only nodes the
    # rewrite adds there are Gathers of a computed operand (rotary's cos/sin) on the head dims
    # kept, named after the node they feed.
    assert [n for n in runtime_nodes(pruned) if "__head_dims_" not in n] == \
        runtime_nodes(original)
    # The oracle, rerun here (not only inside prune()), at the sizes prune() chose for
    # symbolic dims (both sets).
    sizes = result.report.input_sizes
    sets = [{k: tuple(v) for k, v in sizes[key].items()} for key in ("primary", "secondary")
            if sizes.get("symbolic_dims") and sizes.get(key)] or None
    # onnx's own inference: the symbolic engine io.infer_shapes falls back to may merge dims it
    # cannot compare (Swin's padded windows: 3 taken for 4), and onnxruntime refuses such a copy
    check = onnx_fpgm.oracle.validate.verify(
        onnx.shape_inference.infer_shapes(original, data_prop=True), pruned,
        analysis=result.analysis,
        removed_classes=result.plan.removed_classes, opset=onnx_fpgm.model.io.default_opset(original),
        seed=123, size_sets=sets, interface_changes=changes)
    assert check, check.summary()
    assert check.max_rel_error <= 1e-4
    # Kept weights are copied, never recomputed: a stored weight (or its copy-on-write copy)
    # holds only values of the original weight of that name, with the same dtype.
    before = _stored(original)
    for name, values in _stored(pruned).items():
        source = before.get(name, before.get(name.split("__")[0]))
        if source is None or values.dtype.kind != "f" or not values.size:
            continue
        assert values.dtype == source.dtype, name
        assert np.isin(values.ravel(), source.ravel()).all(), f"{name} has new values"


def _stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                arrays[node.output[0]] = onnx.numpy_helper.to_array(attr.t)
    return arrays


def pruned_layers(result: onnx_fpgm.PruneResult) -> set[str]:
    return {layer.name for layer in result.report.layers
            if layer.channels_after < layer.channels_before}


def run_outputs(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    from onnx_fpgm.model.runtime import make_session, random_inputs

    return make_session(model).run(None, random_inputs(model, seed))


def protobuf_guard(what: str, function: Callable, too_big: int,
                   violations: list[str]) -> Callable:
    """``function`` failing, as protobuf does past 2 GiB, on any message holding the weights."""
    def wrapped(proto, *args, **kwargs):
        size = len(proto) if isinstance(proto, bytes) else \
            proto.ByteSize() if isinstance(proto, onnx.ModelProto) else 0
        if size > too_big:
            violations.append(what)
            raise ValueError(f"{what}: message exceeds the 2 GiB protobuf limit")
        return function(proto, *args, **kwargs)
    return wrapped
