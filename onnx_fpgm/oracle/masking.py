"""The masked original: the input model in which every layer that consumes a removed channel
ignores it, built independently of the rewrite (the oracle's reference).

Two constructions give the same products. ``mask_consumer_inputs`` puts a 0/1 ``Mul`` on each
consumer's input and shares every weight with the original (big models: no second copy of the
weights). ``masked_original`` zeroes the consumer weight slices in a copy, and sets a quantized
weight to its zero point (QDQ weights through ``DequantizeLinear``, QOperator integer weights);
it serves every consumer the first cannot mask (non-fp32/64 inputs, unknown ranks, quantized
graphs). A com.microsoft ``MatMulNBits`` gets the zero point as the code of every removed input
column (``mask_nbits``): those columns dequantize to exactly 0.
Both construct the consumers inside If/Loop/Scan bodies too.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..deps.channels import Analysis
from ..deps.constants import ConstantFolder
from ..deps.handlers import nbits
from ..deps.handlers.recurrent import R as RECURRENCE
from ..deps.handlers.recurrent import hidden_output_map
from ..deps.op_families import FEATURE_AXIS, RECURRENT_OPS
from ..model import export
from ..model.outer_scope import proto_with_bodies, with_bodies
from . import qdq


def masked_original(model: onnx.ModelProto, analysis: Analysis,
                    removed_classes: np.ndarray, opset: int) -> onnx.ModelProto:
    """The original with consumer weight slices of removed channels zeroed."""
    removed = analysis.removed_atoms(removed_classes)
    graph = gs.import_onnx(model)
    consts = ConstantFolder(opset)
    counter, added = 0, False
    nodes = [n for g in with_bodies(graph) for n in g.nodes]
    for node, w_index_of, cmap, weight_axis in _weight_targets(nodes, analysis):
        gone = removed[cmap.labels]
        if not gone.any():
            continue
        counter += 1
        if node.op == "MatMulNBits":
            mask_nbits(node, gone, consts, counter)
            continue
        conv_group = int(node.attrs.get("group", 1)) if node.op in ("Conv", "QLinearConv") else 1
        w_index, zero = _integer_weight(node, consts)
        if w_index_of is not None:  # a recurrent layer's own hidden units, on R
            w_index, zero = w_index_of, None

        def mask(stored: np.ndarray, fill: np.ndarray, gone=gone, axis=weight_axis,
                 conv_group=conv_group) -> np.ndarray:
            masked = np.array(stored, copy=True)
            fill = np.broadcast_to(fill, masked.shape)
            if conv_group > 1:  # grouped conv: output o of group j reads inputs of group j only
                per_group, rows = masked.shape[1], masked.shape[0] // conv_group
                for j in range(conv_group):
                    block = (slice(j * rows, (j + 1) * rows),
                             np.flatnonzero(gone[j * per_group:(j + 1) * per_group]))
                    masked[block] = fill[block]
            else:
                index = [slice(None)] * masked.ndim
                index[axis] = np.flatnonzero(gone)
                masked[tuple(index)] = fill[tuple(index)]
            return masked

        if qdq.mask_input(graph, node, w_index, mask, consts,
                          f"{node.inputs[w_index].name}__masked{counter}", zero):
            added = added or bool(node.inputs[1].inputs)  # a masked copy of a quantizer chain
    for g in with_bodies(graph):
        for node, index, keep in list(_activation_masks(g.nodes, analysis, removed)):
            tensor = node.inputs[index]
            dtype = np.float64 if tensor.dtype == np.float64 else np.float32
            counter += 1
            name = f"{tensor.name}__oracle_mask{counter}"
            out = gs.Variable(name, dtype=tensor.dtype, shape=tensor.shape)
            g.nodes.append(gs.Node("Mul", name, inputs=[
                tensor, gs.Constant(name + "_value", keep.astype(dtype))], outputs=[out]))
            node.inputs[index] = out
            added = True
    graph.cleanup(remove_unused_graph_inputs=False)
    if added:
        graph.toposort()
    out = export.export_onnx(graph)
    export.restore_interface_types(out, model)
    out.ir_version = model.ir_version
    del out.opset_import[:]
    out.opset_import.extend(model.opset_import)
    return out


def mask_nbits(node: gs.Node, gone: np.ndarray, consts: ConstantFolder, counter: int) -> None:
    """A MatMulNBits whose input columns ``gone`` read the zero point (exactly 0 once
    dequantized): their codes in ``B`` are set to it. A float zero point that is not a whole
    code cannot be a code: a block whose columns are all gone gets scale 0 instead."""
    layout = nbits.NBitsLayout.of(node)
    stored = consts.value(node.inputs[nbits.B])
    codes = nbits.unpack(stored, layout.bits, layout.block_size).reshape(layout.n, -1).copy()
    zero = nbits.zero_points(consts.value, node, layout)
    fill = np.clip(np.rint(zero.astype(np.float64)), 0, (1 << layout.bits) - 1)
    columns = np.flatnonzero(gone)
    codes[:, columns] = fill[:, columns // layout.block_size].astype(np.uint8)
    packed = nbits.pack(codes.reshape(layout.n, layout.k_blocks, -1), layout.bits,
                        layout.blob_size)
    name = f"{node.inputs[nbits.B].name}__masked{counter}"
    node.inputs[nbits.B] = gs.Constant(name, packed)
    if np.array_equal(fill, zero):
        return
    whole = np.flatnonzero(np.bincount(columns // layout.block_size, minlength=layout.k_blocks)
                           == np.minimum(layout.block_size,
                                         layout.k - np.arange(layout.k_blocks) * layout.block_size))
    scales = np.array(consts.value(node.inputs[nbits.SCALES]), copy=True)
    scales.reshape(layout.n, -1)[:, whole] = 0
    node.inputs[nbits.SCALES] = gs.Constant(f"{name}_scales", scales)


def _activation_masks(nodes, analysis: Analysis, removed: np.ndarray):
    """(node, input index, 0/1 keep mask broadcastable to that input) of every MatMul of two
    activations reading removed channels of a split (attention: the head dims of q and k meet
    in ``q @ k^T``, where no weight slice can be zeroed)."""
    for node in nodes:
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        for index, tensor in enumerate(node.inputs):
            smap = analysis.split_maps.get(tensor.name) if tensor is not None else None
            rank = analysis.ranks.get(tensor.name) if smap is not None else None
            if rank is None or not removed[smap.labels].any():
                continue
            order = np.argsort(smap.axes)
            shape = [1] * rank
            for position in order.tolist():
                shape[smap.axes[position]] = smap.labels.shape[position]
            yield node, index, np.transpose(~removed[smap.labels], order).reshape(shape)


def _weight_targets(nodes, analysis: Analysis):
    """(node, weight input or None for the layer's usual one, channel map, weight axis) of
    every weight that reads mapped channels: consumers of their input channels, and recurrent
    layers reading their own hidden units through ``R[:, :, h]``."""
    for node in nodes:
        target = consumer_axis(node, analysis)
        if target is not None:
            yield node, None, *target
        if node.op in RECURRENT_OPS:
            hidden = hidden_output_map(node.outputs, analysis.maps)
            if hidden is not None:
                yield node, RECURRENCE, hidden, 2


#: QOperator layers: the float op they stand for (same weight layout).
QOPERATOR_AS = {"QLinearConv": "Conv", "QGemm": "Gemm"}


def _integer_weight(node: gs.Node, consts: ConstantFolder) -> tuple[int, np.ndarray | None]:
    """(weight input index, zero point broadcastable to the weight) of a consumer; the zero
    point only for QOperator layers, whose integer weights are stored as they are."""
    if node.op not in QOPERATOR_AS:
        return 1, None
    weight = consts.value(node.inputs[3])
    zero = consts.value(node.inputs[5]) if len(node.inputs) > 5 and node.inputs[5].name else None
    if zero is None or weight is None:
        return 3, None
    zero = np.asarray(zero, weight.dtype)
    if zero.size == 1:
        return 3, zero.reshape(())
    axis = 0 if node.op == "QLinearConv" or int(node.attrs.get("transB", 0)) else 1
    shape = [1] * weight.ndim
    shape[axis] = zero.size
    return 3, zero.reshape(shape)


def mask_consumer_inputs(light: onnx.ModelProto, analysis: Analysis,
                         removed_classes: np.ndarray) -> bool:
    """Turn ``light`` (the original's graph) into the masked original without touching weights.

    Each layer that contracts over removed channels reads its input through ``Mul`` by a 0/1
    mask over the channel axis. ``Conv(x * m, W)`` forms exactly the products of
    ``Conv(x, W * m)`` (each is ``x_c * w_c`` or an exact zero), so this is the masked original
    of the module docstring, while every weight stays shared with the original. Returns False
    (``light`` untouched) when some consumer cannot be masked so (non-fp32/64 input, unknown
    rank); the caller then zeroes weight slices with ``masked_original``.
    """
    removed = analysis.removed_atoms(removed_classes)
    if any(node.op_type == "MatMulNBits" and (cmap := analysis.maps.get(node.input[0]))
           is not None and removed[cmap.labels].any() for node in light.graph.node):
        return False  # its packed codes are masked in a copy (mask_nbits)
    graphs = list(proto_with_bodies(light.graph))  # bodies are masked in place
    float_inputs = {v.name: v.type.tensor_type.elem_type for v in light.graph.input}
    for graph in graphs:
        float_inputs.update({t.name: t.data_type for t in graph.initializer})
        float_inputs.update({n.output[0]: n.attribute[0].t.data_type for n in graph.node
                             if n.op_type == "Constant" and n.output and n.attribute and
                             n.attribute[0].name == "value"})
    plans = []
    for graph in graphs:
        plan = _mask_plan(graph, analysis, removed, float_inputs)
        if plan is None:
            return False
        plans.append((graph, plan))
    # branches first: rebuilding a graph's node list copies its If nodes, and with them the
    # branches (held here by reference) as they are by then
    for graph, plan in reversed(plans):
        if plan:
            _insert_masks(graph, plan)
    return True


def _mask_plan(graph: onnx.GraphProto, analysis: Analysis, removed: np.ndarray,
               float_inputs: dict[str, int]) -> list | None:
    """(position, node, input index, 0/1 keep mask broadcastable to the input, dtype) of every
    input of ``graph``'s nodes to mask; None when one cannot be masked so."""
    plan = []
    for position, node in enumerate(graph.node):
        if len(node.input) < 2 or not node.input[0] or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.name in ("group", "transA", "transB")}
        target = _contracted_axis(node.op_type, node.input[0],
                                  node.output[0] if node.output else None, attrs, analysis)
        if target is None:
            continue
        cmap = target[0]
        gone = removed[cmap.labels]
        if not gone.any():
            continue
        rank = analysis.ranks.get(node.input[0])
        dtype = float_inputs.get(node.input[1])
        if rank is None or dtype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            return None
        plan.append((position, node, 0, _along(~gone, cmap.axis, rank), dtype))
    kinds = set(float_inputs.values())  # an activation's type: the weights' float type
    default_float = onnx.TensorProto.DOUBLE if onnx.TensorProto.DOUBLE in kinds and \
        onnx.TensorProto.FLOAT not in kinds else onnx.TensorProto.FLOAT
    stand_ins = [gs.Node(n.op_type, str(position), inputs=[gs.Variable(i) for i in n.input])
                 for position, n in enumerate(graph.node)
                 if n.op_type == "MatMul" and len(n.input) == 2]  # named by their position
    for stand_in, index, keep in _activation_masks(stand_ins, analysis, removed):
        position = int(stand_in.name)
        node = graph.node[position]
        dtype = float_inputs.get(node.input[index], default_float)
        if dtype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            return None
        plan.append((position, node, index, keep, dtype))
    for position, node in enumerate(graph.node):
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        hidden = hidden_output_map(node.output, analysis.maps)
        if hidden is None or not removed[hidden.labels].any():
            continue
        dtype = float_inputs.get(node.input[RECURRENCE])
        if dtype not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            return None
        # R (directions, gates * hidden, hidden) read through a mask over its last axis
        plan.append((position, node, RECURRENCE, _along(~removed[hidden.labels], 2, 3), dtype))
    plan.sort(key=lambda entry: entry[0])
    return plan


def _along(keep: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A 0/1 mask over ``axis`` of a rank-``rank`` input, broadcastable to it."""
    return keep.reshape((len(keep),) + (1,) * (rank - 1 - axis))


def _insert_masks(graph: onnx.GraphProto, plan: list) -> None:
    """A ``Mul`` by each planned 0/1 mask just before its consumer (mask values stored in the
    graph that holds the consumer: a branch reads its own)."""
    nodes = list(graph.node)
    for k, (position, node, index, keep, dtype) in enumerate(reversed(plan)):
        mask = keep.astype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        name = f"{node.input[index]}__oracle_mask{len(plan) - k}"
        graph.initializer.append(onnx.numpy_helper.from_array(mask, name + "_value"))
        nodes.insert(position, onnx.helper.make_node("Mul", [node.input[index], name + "_value"],
                                                     [name], name=name))
        node.input[index] = name
    del graph.node[:]
    graph.node.extend(nodes)


def consumer_axis(node: gs.Node, analysis: Analysis):
    """(input channel map, weight axis) when ``node`` contracts over mapped channels
    (QOperator layers read as the float op they stand for)."""
    if len(node.inputs) < 2 or node.inputs[0] is None:
        return None
    return _contracted_axis(QOPERATOR_AS.get(node.op, node.op), node.inputs[0].name,
                            node.outputs[0].name if node.outputs else None, node.attrs, analysis)


def _contracted_axis(op: str, input_name: str, output_name: str | None, attrs: dict,
                     analysis: Analysis):
    cmap = analysis.maps.get(input_name)
    if cmap is None:
        return None
    if op in ("Conv", "ConvTranspose") and int(attrs.get("group", 1)) == 1:
        return cmap, 1 if op == "Conv" else 0
    out_map = analysis.maps.get(output_name) if output_name else None
    passes_through = out_map is not None and out_map.labels is cmap.labels  # depthwise
    if op == "Conv" and not passes_through:  # grouped: consumes its input channels
        return cmap, 1
    if op == "Gemm" and not int(attrs.get("transA", 0)):
        return cmap, 1 if int(attrs.get("transB", 0)) else 0
    if op in ("MatMul", "MatMulNBits"):  # MatMulNBits: masked by mask_nbits, not on an axis
        rank = analysis.ranks.get(input_name)
        if rank is not None and cmap.axis == rank - 1:
            return cmap, 0
    if op in RECURRENT_OPS and analysis.ranks.get(input_name) == 3 and cmap.axis == FEATURE_AXIS:
        return cmap, FEATURE_AXIS  # W (directions, gates * hidden, input)
    return None
