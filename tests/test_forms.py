"""Model forms seen in the wild: each is pruned exactly, or refused/left whole with a reason.

Forms: external data (and the > 2 GiB path, simulated by lowering ``io.PROTOBUF_LIMIT``);
float16/bfloat16/float64 weights (whole model, or stored weights Cast to float); weights behind
Identity/Cast/Constant shared by two convs (copy-on-write); symbolic batch and spatial dims;
opsets 11 to the newest onnx knows; tf2onnx channels-last BatchNorm as Mul+Add; quantized
QDQ/QLinearConv models; If/Loop reading a conv output from the outer scope; a model without any
prunable layer; and determinism of the written model and report.

Every successful prune runs ``tests.conftest.check_pruned`` or, where the dtype or symbolic
inputs need it, ``_check`` (the same checks with dtype-appropriate tolerance and input shapes).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
import onnx_fpgm.model.io
import onnx_fpgm.model.runtime
import onnx_fpgm.oracle.masking
import onnx_fpgm.oracle.validate
from onnx_fpgm.cli import main as cli
from tests.conftest import (_stored, check_pruned, protobuf_guard, pruned_layers, run_outputs,
                            runtime_nodes)
from tests.onnx_patterns import _Net

REPO = Path(__file__).resolve().parents[1]
IMAGE = (1, 3, 8, 8)


# --- builders ---------------------------------------------------------------------------------


def _ladder(opset: int = 17, width: int = 8) -> onnx.ModelProto:
    """conv1-bn1-relu1-conv2 + residual Add -> Split(2) -> conv3, conv4 -> Concat -> head.

    Split is written in the form of ``opset`` (attribute below 13, sizes input from 13); the
    IR version is the lowest that declares ``opset``.
    """
    n, half = _Net(1234), width // 2
    a = n.relu("relu1", n.bn("bn1", n.conv("conv1", "input", 3, width), width))
    r = n.relu("relu2", n.op("Add", "add_res", [n.conv("conv2", a, width, width), a]))
    if opset < 13:
        n.op("Split", "split", [r], n_out=2, axis=1, split=[half, half])
    else:
        n.op("Split", "split", [r, n.ints("split_sizes", [half, half])], n_out=2, axis=1)
    c3 = n.conv("conv3", "split_out0", half, half)
    c4 = n.conv("conv4", "split_out1", half, half)
    n.head(n.relu("relu3", n.op("Concat", "concat", [c3, c4, r], axis=1)), 2 * width)
    model = n.model({"output": [1, 4, 8, 8]}, opset=opset)
    model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def _to_dtype(model: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """The whole model in ``dtype``: float initializers, graph inputs and outputs."""
    model, np_dtype = _copy(model), helper.tensor_dtype_to_np_dtype(dtype)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            array = numpy_helper.to_array(tensor).astype(np_dtype)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = dtype
    return model


def _weights_behind_cast(model: onnx.ModelProto, dtype: int) -> onnx.ModelProto:
    """Conv weights stored in ``dtype``, each read through its own Cast(to=FLOAT)."""
    model, np_dtype = _copy(model), helper.tensor_dtype_to_np_dtype(dtype)
    graph, casts, renamed = model.graph, [], {}
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 4:
            array = numpy_helper.to_array(tensor).astype(np_dtype)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            renamed[tensor.name] = f"{tensor.name}_f32"
            casts.append(helper.make_node("Cast", [tensor.name], [renamed[tensor.name]],
                                          name=f"{tensor.name}_cast", to=TensorProto.FLOAT))
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _symbolic(flatten: bool) -> onnx.ModelProto:
    """Input ["N", 3, "H", "W"]: conv1-bn-relu-conv2 + residual, then a head Conv or Flatten."""
    n = _Net(77)
    a = n.relu("relu1", n.bn("bn1", n.conv("conv1", "input", 3, 8), 8))
    r = n.relu("relu2", n.op("Add", "add_res", [n.conv("conv2", a, 8, 8), a]))
    if flatten:
        x = n.op("Flatten", "flatten", [r], axis=1)
        w, b = n.randn("fc.weight", [10, 8 * 16 * 16], 0.01), n.randn("fc.bias", [10], 0.1)
        n.op("Gemm", "fc", [x, w, b], out="output", transB=1)
        return n.model({"output": ["N", 10]}, {"input": ["N", 3, "H", "W"]})
    n.head(r, 8)
    return n.model({"output": ["N", 4, "H", "W"]}, {"input": ["N", 3, "H", "W"]})


def _shared_weight(form: str) -> onnx.ModelProto:
    """conv_a (pruned) and conv_b (in and out frozen) read one stored weight through ``form``.

    conv_b reads stem2's output, which is also a graph output, and writes a graph output, so its
    weight must come out bit-identical while conv_a gets a sliced copy.
    """
    n = _Net(11, constants=form == "constant")
    x = n.relu("relu0", n.conv("stem", "input", 3, 8))
    w = n.randn("shared.weight", [8, 8, 3, 3], 72**-0.5)
    wa = wb = w
    if form == "cast":  # fp16 storage, one Cast read by both convs
        n.inits[-1] = numpy_helper.from_array(
            numpy_helper.to_array(n.inits[-1]).astype(np.float16), w)
        wa = wb = n.op("Cast", "shared_cast", [w], to=TensorProto.FLOAT)
    elif form == "identity":
        wa = n.op("Identity", "shared_identity", [w])
    n.head(n.relu("relu_a", n.conv("conv_a", x, 8, 8, weight=wa, bias=False)), 8)
    y = n.conv("stem2", "input", 3, 8, out="stem2_out")
    n.conv("conv_b", y, 8, 8, weight=wb, bias=False, out="side")
    return n.model({"output": [1, 4, 8, 8], "stem2_out": [1, 8, 8, 8], "side": [1, 8, 8, 8]})


def _tf_bn_mul_add() -> onnx.ModelProto:
    """tf2onnx: NHWC input -> Transpose -> Conv -> Transpose -> Mul([C]) -> Add([C]) -> Relu."""
    n = _Net(12)
    x = n.op("Transpose", "to_nchw", ["input"], perm=[0, 3, 1, 2])
    x = n.op("Transpose", "to_nhwc", [n.conv("conv1", x, 3, 8, bias=False)], perm=[0, 2, 3, 1])
    scale = n.const("bn.scale", n.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = n.op("Add", "bn_add", [n.op("Mul", "bn_mul", [x, scale]), n.randn("bn.offset", [8], 0.1)])
    x = n.op("Transpose", "to_nchw2", [n.relu("relu1", x)], perm=[0, 3, 1, 2])
    n.head(x, 8)
    return n.model({"output": [1, 4, 8, 8]}, {"input": [1, 8, 8, 3]})


def _quantized(form: str) -> onnx.ModelProto:
    """QDQ (weights through DequantizeLinear, activations through Q/DQ) or QLinearConv."""
    n = _Net(5)

    def act_qdq(name: str, x: str) -> str:
        s, z = n.const(f"{name}.scale", np.float32(0.05)), n.const(f"{name}.zp", np.uint8(128))
        return n.op("DequantizeLinear", f"{name}_dq", [n.op("QuantizeLinear", f"{name}_q",
                                                            [x, s, z]), s, z])

    def weight_dq(name: str, cout: int, cin: int) -> str:
        q = n.const(f"{name}.weight_q", n.rng.integers(-100, 100, [cout, cin, 3, 3], np.int8))
        if form == "qdq_per_tensor":
            s = n.const(f"{name}.w_scale", np.float32(0.005))
            z = n.const(f"{name}.w_zp", np.int8(0))
            return n.op("DequantizeLinear", f"{name}_wdq", [q, s, z])
        s = n.const(f"{name}.w_scale", n.rng.uniform(0.001, 0.01, cout).astype(np.float32))
        z = n.const(f"{name}.w_zp", np.zeros(cout, np.int8))
        return n.op("DequantizeLinear", f"{name}_wdq", [q, s, z], axis=0)

    if form == "qlinearconv":
        sx, zx = n.const("x.scale", np.float32(0.05)), n.const("x.zp", np.uint8(128))
        sw, zw = n.const("w.scale", np.float32(0.005)), n.const("w.zp", np.int8(0))
        sy, zy = n.const("y.scale", np.float32(0.1)), n.const("y.zp", np.uint8(128))
        x = n.op("QuantizeLinear", "in_q", ["input", sx, zx])
        for name, cin, cout in (("conv1", 3, 8), ("conv2", 8, 4)):
            w = n.const(f"{name}.weight_q", n.rng.integers(-100, 100, [cout, cin, 3, 3], np.int8))
            x = n.op("QLinearConv", name, [x, sx if name == "conv1" else sy,
                                           zx if name == "conv1" else zy, w, sw, zw, sy, zy],
                     pads=[1, 1, 1, 1])
        n.op("DequantizeLinear", "out_dq", [x, sy, zy], out="output")
    elif form == "fp32_stem_then_qdq":  # a float conv whose output is quantized next
        x = n.relu("relu0", n.conv("stem", "input", 3, 8))
        w = weight_dq("conv1", 8, 8)
        x = n.relu("relu1", n.conv("conv1", act_qdq("mid", x), 8, 8, weight=w))
        n.head(x, 8)
    else:
        x = act_qdq("in", "input")
        x = n.relu("relu1", n.conv("conv1", x, 3, 8, weight=weight_dq("conv1", 8, 3)))
        n.conv("head", act_qdq("mid", x), 8, 4, weight=weight_dq("head", 4, 8), out="output")
    return n.model({"output": [1, 4, 8, 8]})


def _control_flow(op: str) -> onnx.ModelProto:
    """conv1 -> relu1 -> conv2 -> head; an ``op`` (If/Loop) body reads relu1_out from outside."""
    n = _Net(8)
    a = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    n.head(n.relu("relu2", n.conv("conv2", a, 8, 8)), 8)
    total = helper.make_node("ReduceSum", ["relu1_out"], ["body_y"], name="body_sum", keepdims=0)
    scalar = helper.make_tensor_value_info
    if op == "If":
        neg = helper.make_node("Neg", ["relu1_out"], ["else_x"], name="else_neg")
        else_sum = helper.make_node("ReduceSum", ["else_x"], ["else_y"], name="else_sum",
                                    keepdims=0)
        n.op("If", "if", [n.const("cond", np.array(True))], out="side",
             then_branch=helper.make_graph([total], "then", [],
                                           [scalar("body_y", TensorProto.FLOAT, [])]),
             else_branch=helper.make_graph([neg, else_sum], "else", [],
                                           [scalar("else_y", TensorProto.FLOAT, [])]))
    else:
        body = helper.make_graph(
            [total, helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
             helper.make_node("Add", ["acc_in", "body_y"], ["acc_out"], name="body_acc")],
            "body",
            [scalar("i", TensorProto.INT64, []), scalar("cond_in", TensorProto.BOOL, []),
             scalar("acc_in", TensorProto.FLOAT, [])],
            [scalar("cond_out", TensorProto.BOOL, []), scalar("acc_out", TensorProto.FLOAT, [])])
        trip, cond = n.const("trip", np.array(2, np.int64)), n.const("cond", np.array(True))
        n.op("Loop", "loop", [trip, cond, n.const("acc0", np.float32(0))], out="side", body=body)
    return n.model({"output": [1, 4, 8, 8], "side": []})


def _no_producer() -> onnx.ModelProto:
    n = _Net(9)
    x = n.op("MaxPool", "pool", [n.relu("relu1", "input")], kernel_shape=[2, 2], strides=[2, 2])
    n.op("Add", "add", [x, n.randn("bias", [1, 3, 1, 1])], out="output")
    return n.model({"output": [1, 3, 4, 4]})


# --- checks -----------------------------------------------------------------------------------


def _check(original: onnx.ModelProto, result: onnx_fpgm.PruneResult, *,
           input_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """``check_pruned`` with input shapes and the dtype-appropriate oracle tolerance."""
    if input_shapes is None and all(o.type.tensor_type.elem_type == TensorProto.FLOAT
                                    for o in original.graph.output):
        check_pruned(original, result)
        return
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    _assert_documented(result)
    assert [i.name for i in pruned.graph.input] == [i.name for i in original.graph.input]
    assert [(o.name, o.type) for o in pruned.graph.output] == \
        [(o.name, o.type) for o in original.graph.output]
    assert (pruned.ir_version, list(pruned.opset_import)) == \
        (original.ir_version, list(original.opset_import))
    assert runtime_nodes(pruned) == runtime_nodes(original)
    check = onnx_fpgm.oracle.validate.verify(
        onnx_fpgm.model.io.infer_shapes(original), pruned, analysis=result.analysis,
        removed_classes=result.plan.removed_classes, opset=onnx_fpgm.model.io.default_opset(original),
        seed=123, input_shapes=input_shapes)
    assert check, check.summary()
    for output in check.outputs:
        assert output.max_rel_error <= output.tolerance
    _assert_exact_slices(original, result)


def _assert_documented(result: onnx_fpgm.PruneResult) -> None:
    from onnx_fpgm.deps.reasons import classify

    for group in result.report.groups:
        if group.frozen:
            assert classify(group.frozen), f"undocumented blocking reason: {group.frozen}"


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}")


def _assert_exact_slices(original: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    """Every stored conv weight is the original's [kept out, kept in] block, bit for bit."""
    before, after = _stored(original), _stored(result.model)
    producers = {o: node for node in result.model.graph.node for o in node.output}
    removed = result.analysis.removed_atoms(result.plan.removed_classes)
    kept_out = {layer.name: layer.kept for layer in result.report.layers}
    checked = 0
    for node in result.model.graph.node:
        if node.op_type != "Conv" or node.name not in kept_out:
            continue
        name = node.input[1]
        if name in producers and producers[name].op_type == "Cast":
            name = producers[name].input[0]
        if name not in before or name not in after:
            continue
        cmap = result.analysis.maps.get(node.input[0])
        weight = before[name]
        kept_in = (np.flatnonzero(~removed[cmap.labels]) if cmap is not None
                   else np.arange(weight.shape[1]))
        want = weight[np.ix_(kept_out[node.name], kept_in)]
        assert after[name].dtype == weight.dtype, name
        assert np.array_equal(_bits(after[name]), _bits(want)), f"{name} is not an exact slice"
        checked += 1
    assert checked


def _reference_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, feeds)


def _check_with_reference(original: onnx.ModelProto, result: onnx_fpgm.PruneResult,
                          rtol: float) -> None:
    """The oracle on onnx's reference evaluator, for models onnxruntime (CPU) cannot run."""
    onnx.checker.check_model(result.model, full_check=True)
    masked = onnx_fpgm.oracle.masking.masked_original(
        original, result.analysis, result.plan.removed_classes,
        onnx_fpgm.model.io.default_opset(original))
    feeds = onnx_fpgm.model.runtime.random_inputs(original, seed=123)
    for want, have in zip(_reference_run(masked, feeds), _reference_run(result.model, feeds),
                          strict=True):
        want, have = np.asarray(want, np.float64), np.asarray(have, np.float64)
        assert want.shape == have.shape
        assert np.abs(want - have).max() <= rtol * np.abs(want).max()


def _assert_unchanged(original: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    """Nothing pruned: same stored values, same outputs, every layer whole."""
    _assert_documented(result)
    assert not result.plan.n_removed
    assert not pruned_layers(result)
    before, after = _stored(original), _stored(result.model)
    assert before.keys() == after.keys()
    for name, value in before.items():
        assert after[name].dtype == value.dtype and np.array_equal(after[name], value), name
    for want, have in zip(run_outputs(original), run_outputs(result.model), strict=True):
        assert np.array_equal(want, have)


def _reasons(result: onnx_fpgm.PruneResult) -> str:
    parts = [g.frozen or "" for g in result.report.groups]
    parts += [reason for _, reason in result.report.blocked_tensors] + result.report.notes
    return "\n".join(parts)


def _frozen_reason(result: onnx_fpgm.PruneResult, producer: str) -> str | None:
    group = next(g for g in result.report.groups if producer in g.producers)
    return group.frozen


# --- 1. external data and the > 2 GiB path ------------------------------------------------------


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    # onnx.save_model converts the tensors of the model it is given: save a copy.
    onnx.save_model(_copy(model), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=f"{path.name}.weights",
                    size_threshold=0)


def test_external_data_input_is_saved_with_external_data(tmp_path: Path) -> None:
    model = _ladder(width=32)
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    _save_external(model, source)
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    result = onnx_fpgm.prune(source, 0.5)
    assert result.external_data
    assert {"conv1", "conv3"} <= pruned_layers(result)
    check_pruned(model, result)
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    result.save(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    loaded = onnx.load(str(out))
    assert _stored(loaded).keys() == _stored(result.model).keys()
    for name, value in _stored(result.model).items():
        assert np.array_equal(_stored(loaded)[name], value), name
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    feeds = onnx_fpgm.model.runtime.random_inputs(model, seed=5)
    assert np.array_equal(session.run(None, feeds)[0],
                          onnx_fpgm.model.runtime.make_session(result.model).run(None, feeds)[0])


def test_saving_with_external_data_leaves_the_result_intact(tmp_path: Path, monkeypatch) -> None:
    """Save twice (the second time from OUT's own directory): the in-memory model keeps its data.

    ``onnx.save_model(save_as_external_data=True)`` converts the model it is given in place and
    refuses when the data file name exists in the current directory; ``io.save_model`` must not.
    """
    model = _ladder(width=32)
    result = onnx_fpgm.prune(model, 0.5)
    serialized = result.model.SerializeToString()
    out = tmp_path / "pruned.onnx"
    result.save(out, external_data=True)
    assert result.model.SerializeToString() == serialized
    monkeypatch.chdir(tmp_path)
    result.save("pruned.onnx", external_data=True)
    other = tmp_path / "elsewhere"
    other.mkdir()
    result.save(other / "copy.onnx", external_data=True)
    assert sorted(p.name for p in other.iterdir()) == ["copy.onnx", "copy.onnx.data"]
    check_pruned(model, result)
    for path in (out, other / "copy.onnx"):
        assert _without_data_location(onnx.load(str(path))) == serialized


def _without_data_location(model: onnx.ModelProto) -> bytes:
    """The model's bytes without the ``data_location: DEFAULT`` onnx.load sets on loaded data."""
    for tensor in model.graph.initializer:
        tensor.ClearField("data_location")
    return model.SerializeToString()


def test_model_proto_with_unloaded_external_data_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    _save_external(_ladder(width=32), source)
    header = onnx.load(str(source), load_external_data=False)
    with pytest.raises(onnx_fpgm.ModelLoadError, match="external data that is not loaded"):
        onnx_fpgm.prune(header, 0.5)


@pytest.mark.parametrize("source", ["external_path", "model_proto"])
def test_over_protobuf_limit_goes_through_light_copies_and_paths(tmp_path: Path, monkeypatch,
                                                                 source: str) -> None:
    """A model "over 2 GiB" (``PROTOBUF_LIMIT`` lowered): nothing serialises it whole.

    Shape inference, the checker and onnxruntime sessions are wrapped to fail, as protobuf does
    past 2 GiB, on any message holding the weights; the run must still prune, verify (through a
    file with external data) and save with external data.
    """
    model = _ladder(width=32)
    given: str | onnx.ModelProto = model
    if source == "external_path":
        given = str(tmp_path / "in.onnx")
        _save_external(model, Path(given))
    too_big = model.ByteSize() // 2  # any message holding the weights
    violations: list[str] = []

    def guard(what: str, function: Callable) -> Callable:
        return protobuf_guard(what, function, too_big, violations)

    with monkeypatch.context() as patch:
        patch.setattr(onnx_fpgm.model.io, "PROTOBUF_LIMIT", 1)
        patch.setattr(onnx.shape_inference, "infer_shapes",
                      guard("infer_shapes", onnx.shape_inference.infer_shapes))
        patch.setattr(onnx.checker, "check_model", guard("check_model", onnx.checker.check_model))
        patch.setattr(ort, "InferenceSession", guard("InferenceSession", ort.InferenceSession))
        result = onnx_fpgm.prune(given, 0.5)
        out = tmp_path / "out" / "pruned.onnx"
        out.parent.mkdir()
        result.save(out)
    assert violations == []
    assert result.report.verification["passed"]
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    check_pruned(model, result)
    onnx.checker.check_model(str(out), full_check=True)
    assert _without_data_location(onnx.load(str(out))) == \
        _without_data_location(_copy(result.model))


# --- 2. float16 / bfloat16 / float64 ----------------------------------------------------------

DTYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16,
          "fp64": TensorProto.DOUBLE}


def test_fp16_model_runs_on_onnxruntime_cpu_and_prunes() -> None:
    """Whole model in float16 (input, weights, output): verified with the float16 tolerance."""
    base = _ladder()
    model = _to_dtype(base, TensorProto.FLOAT16)
    result = onnx_fpgm.prune(model, 0.5)
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    assert result.report.verification["passed"]
    _check(model, result)
    # Scored in float32 on the stored values: the same choice as the float32 model holding them.
    upcast = _to_dtype(model, TensorProto.FLOAT)
    reference = onnx_fpgm.prune(upcast, 0.5, verify=False)
    assert [(la.name, la.kept) for la in result.report.layers] == \
        [(la.name, la.kept) for la in reference.report.layers]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
def test_weights_stored_in_dtype_behind_cast(dtype: str) -> None:
    """Conv weights stored in fp16/bf16/fp64 and Cast to float: sliced in their own dtype."""
    model = _weights_behind_cast(_ladder(), DTYPES[dtype])
    result = onnx_fpgm.prune(model, 0.5)
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    check_pruned(model, result)
    _assert_exact_slices(model, result)
    stored = {t.name: t.data_type for t in result.model.graph.initializer}
    assert stored["conv2.weight"] == DTYPES[dtype]


@pytest.mark.parametrize("form", ["fp32", "fp16", "fp64_behind_cast", "bf16_behind_cast",
                                  "wide"])
def test_direct_export_of_big_constants_writes_what_graph_surgeon_writes(monkeypatch, form):
    """Big constants are written into the exported model directly (no graph-surgeon copies):
    with every constant taking that path, the pruned model is byte for byte the one
    graph-surgeon's own export gives."""
    model = {"fp32": lambda: _ladder(),
             "fp16": lambda: _to_dtype(_ladder(), TensorProto.FLOAT16),
             "fp64_behind_cast": lambda: _weights_behind_cast(_ladder(), TensorProto.DOUBLE),
             "bf16_behind_cast": lambda: _weights_behind_cast(_ladder(), TensorProto.BFLOAT16),
             "wide": lambda: _ladder(width=16)}[form]()
    monkeypatch.setattr(onnx_fpgm.model.export, "_DIRECT_EXPORT_BYTES", 1 << 62)
    by_graph_surgeon = onnx_fpgm.prune(model, 0.5).model
    monkeypatch.setattr(onnx_fpgm.model.export, "_DIRECT_EXPORT_BYTES", 1)
    direct = onnx_fpgm.prune(model, 0.5)
    assert direct.model.SerializeToString() == by_graph_surgeon.SerializeToString()
    if form != "fp16":
        check_pruned(model, direct)


@pytest.mark.parametrize("dtype", ["bf16", "fp64"])
def test_whole_model_dtype_onnxruntime_cannot_run(dtype: str) -> None:
    """onnxruntime CPU has no bf16/fp64 Conv: verification is refused with the reason.

    Without verification the prune is still exact: dtype and bits of the kept weights, and
    (fp64) outputs equal to the masked original on onnx's reference evaluator.
    """
    opset = 22  # the first opset whose Conv accepts bfloat16
    model = _to_dtype(_ladder(opset), DTYPES[dtype])
    with pytest.raises(onnx_fpgm.ConfigError, match=r"cannot verify: onnxruntime.*--no-verify"):
        onnx_fpgm.prune(model, 0.5)
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    _assert_exact_slices(model, result)
    if dtype == "fp64":
        _check_with_reference(model, result, rtol=1e-9)
    else:
        onnx.checker.check_model(result.model, full_check=True)


def test_compare_tolerance_follows_the_output_dtype() -> None:
    """1e-4 relative for float32; 1e-2 for float16 (a few fp16 ulps of reordered sums)."""
    def model_adding(dtype: int, delta: float) -> onnx.ModelProto:
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        graph = helper.make_graph(
            [helper.make_node("Add", ["x", "d"], ["y"], name="add")], "g",
            [helper.make_tensor_value_info("x", dtype, [4])],
            [helper.make_tensor_value_info("y", dtype, [4])],
            [numpy_helper.from_array(np.full(4, delta, np_dtype), "d")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    compare = onnx_fpgm.oracle.validate.compare
    for dtype, ok, bad in ((TensorProto.FLOAT, 5e-5, 5e-4), (TensorProto.FLOAT16, 5e-3, 5e-2)):
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        feeds = {"x": np.ones(4, np_dtype)}
        assert compare(model_adding(dtype, 0.0), model_adding(dtype, ok), feeds)
        failed = compare(model_adding(dtype, 0.0), model_adding(dtype, bad), feeds)
        assert not failed
        assert f"limit {onnx_fpgm.oracle.validate.tolerance_for(np_dtype):.0e}" in failed.summary()


# --- 3. weights behind Identity / Cast / Constant, shared (copy-on-write) ----------------------


@pytest.mark.parametrize("form", ["initializer", "identity", "cast", "constant"])
def test_shared_weight_copy_on_write(form: str) -> None:
    model = _shared_weight(form)
    result = onnx_fpgm.prune(model, 0.5)
    assert {"stem", "conv_a"} <= pruned_layers(result)
    assert not {"stem2", "conv_b"} & pruned_layers(result)
    check_pruned(model, result)
    assert any("conv_a" in note and "copy" in note for note in result.report.notes)
    # conv_b still computes with the original weight, bit for bit.
    stored = _stored(result.model)
    producers = {o: node for node in result.model.graph.node for o in node.output}
    conv_b = next(node for node in result.model.graph.node if node.name == "conv_b")
    name = conv_b.input[1]
    while name not in stored:
        name = producers[name].input[0]
    original = _stored(model)["shared.weight"]
    assert stored[name].dtype == original.dtype
    assert np.array_equal(_bits(stored[name]), _bits(original))


# --- 4. symbolic batch and spatial dims -------------------------------------------------------

SHAPES = (("input", (1, 3, 16, 16)),)


def test_symbolic_spatial_dims_get_sizes_chosen_and_reported(tmp_path: Path, capsys) -> None:
    model = _symbolic(flatten=False)
    source, out, report = tmp_path / "sym.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, str(source))
    assert cli.main([str(source), str(out), "--report", str(report)]) == 0
    assert "input sizes: input=1,3,64,64 (chosen" in capsys.readouterr().out.replace("\n", " ")
    sizes = json.loads(report.read_text())["input_sizes"]
    assert sizes["primary"] == {"input": [1, 3, 64, 64]} and not sizes["given"]
    second = sizes["secondary"]["input"]
    assert second[0] == 2 and second[2:] != [64, 64]
    pruned = onnx.load(str(out))
    dims = pruned.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    result = onnx_fpgm.prune(model, 0.5)
    assert {"conv1", "conv2"} <= pruned_layers(result)
    for shapes in result.input_sizes.sets:
        _check(model, result, input_shapes=shapes)


def _flatten_at(size: int) -> onnx.ModelProto:
    """Input ["N", 3, "H", "W"] -> conv -> Flatten -> Gemm: runs at H = W = ``size`` only."""
    n = _Net(78)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 4))
    w = n.randn("fc.weight", [5, 4 * size * size], 0.01)
    n.op("Gemm", "fc", [n.op("Flatten", "flatten", [x], axis=1), w], out="output", transB=1)
    return n.model({"output": ["N", 5]}, {"input": ["N", 3, "H", "W"]})


def test_no_size_that_runs_is_an_error_naming_dims_and_flag(tmp_path: Path, capsys) -> None:
    model = _flatten_at(13)  # 13 x 13 is no candidate size
    with pytest.raises(onnx_fpgm.ConfigError, match=r"input input \[N, 3, H, W\].*--input-shape"):
        onnx_fpgm.prune(model, 0.5)
    source, out = tmp_path / "sym.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    assert cli.main([str(source), str(out)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "input=1,3,N,N" in stderr and "--input-shape" in stderr
    assert not out.exists()
    assert cli.main([str(source), str(out), "--input-shape", "input=1,3,13,13", "--quiet"]) == 0
    assert out.exists()


def test_flatten_model_runs_at_one_size_which_is_found() -> None:
    model = _flatten_at(16)
    result = onnx_fpgm.prune(model, 0.5)
    assert result.input_sizes.primary == {"input": (1, 3, 16, 16)}
    assert result.input_sizes.secondary == {"input": (2, 3, 16, 16)}  # batch 2 only
    assert result.report.verification["passed"]


def test_symbolic_spatial_dims_with_input_shape() -> None:
    model = _symbolic(flatten=False)
    result = onnx_fpgm.prune(model, 0.5, input_shapes=SHAPES)
    assert {"conv1", "conv2"} <= pruned_layers(result)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    _check(model, result, input_shapes=dict(SHAPES))


def test_flatten_after_symbolic_spatial_dims_is_blocked_with_reason() -> None:
    model = _symbolic(flatten=True)
    result = onnx_fpgm.prune(model, 0.5, input_shapes=SHAPES)
    assert not pruned_layers(result)
    reason = _frozen_reason(result, "conv1")
    assert reason and "Flatten" in reason
    _assert_documented(result)
    _assert_unchanged_with_shapes(model, result)


def _assert_unchanged_with_shapes(model: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    feeds = onnx_fpgm.model.runtime.random_inputs(model, seed=1, shapes=dict(SHAPES))
    make = onnx_fpgm.model.runtime.make_session
    for want, have in zip(make(model).run(None, feeds), make(result.model).run(None, feeds),
                          strict=True):
        assert np.array_equal(want, have)


# --- 5. opsets 11 .. newest -------------------------------------------------------------------


def _runs_on_onnxruntime(opset: int) -> bool:
    try:
        onnx_fpgm.model.runtime.make_session(_ladder(opset))
    except Exception:  # noqa: BLE001 (onnxruntime raises its own assorted types)
        return False
    return True


OPSETS = list(range(11, onnx.defs.onnx_opset_version() + 1))
ORT_MAX_OPSET = max(o for o in OPSETS if _runs_on_onnxruntime(o))


@pytest.mark.parametrize("opset", OPSETS, ids=[f"opset{o}" for o in OPSETS])
def test_opsets(opset: int) -> None:
    if opset > ORT_MAX_OPSET:
        pytest.skip(f"onnxruntime {ort.__version__} runs opsets up to {ORT_MAX_OPSET} "
                    f"(onnx {onnx.__version__} defines {OPSETS[-1]}); see "
                    "test_opset_newer_than_onnxruntime")
    model = _ladder(opset)
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    check_pruned(model, result)


@pytest.mark.skipif(ORT_MAX_OPSET >= OPSETS[-1], reason="onnxruntime runs every onnx opset")
def test_opset_newer_than_onnxruntime() -> None:
    """Verification is refused with the reason; unverified, the prune is still exact."""
    model = _ladder(OPSETS[-1])
    with pytest.raises(onnx_fpgm.ConfigError, match=r"cannot verify: onnxruntime.*--no-verify"):
        onnx_fpgm.prune(model, 0.5)
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert {"conv1", "conv2", "conv3", "conv4"} <= pruned_layers(result)
    _check_with_reference(model, result, rtol=1e-5)


# --- 6. exporter forms not in tests/onnx_patterns.py ------------------------------------------


def test_tf2onnx_channels_last_batchnorm_as_mul_add() -> None:
    model = _tf_bn_mul_add()
    result = onnx_fpgm.prune(model, 0.5)
    assert "conv1" in pruned_layers(result)
    check_pruned(model, result)
    stored = _stored(result.model)
    assert stored["bn.scale"].shape == stored["bn.offset"].shape == (4,)


# --- 7. quantized models ----------------------------------------------------------------------

QDQ_FORMS = {"qdq_per_channel": {"conv1"}, "qdq_per_tensor": {"conv1"},
             "fp32_stem_then_qdq": {"stem", "conv1"}}


@pytest.mark.parametrize("form", list(QDQ_FORMS))
def test_qdq_models_are_pruned(form: str) -> None:
    """Weights through DequantizeLinear and activation Q/DQ pairs: pruned like float layers."""
    model = _quantized(form)
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert pruned_layers(result) == QDQ_FORMS[form]
    check_pruned(model, result)
    assert "bypassed" in result.report.verification["summary"]
    assert not any("quantized layer" in note for note in result.report.notes)


def test_qlinearconv_model_is_pruned_bit_exactly() -> None:
    """QLinearConv: int8 weights, per-tensor scales; the masked original agrees bit for bit."""
    model = _quantized("qlinearconv")
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert pruned_layers(result) == {"conv1"}
    check_pruned(model, result)
    assert "bit for bit" in result.report.verification["summary"]


# --- 8. control flow --------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_control_flow_reading_outer_scope_blocks_its_channels(op: str) -> None:
    model = _control_flow(op)
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    reason = _frozen_reason(result, "conv1")
    # If/Loop bodies are analysed in place: the reader inside them (a ReduceSum) blocks
    assert reason and "ReduceSum body_sum reduces over all axes" in reason
    assert "conv1" not in pruned_layers(result)
    assert "conv2" in pruned_layers(result)
    check_pruned(model, result)
    subgraphs = [a.g for n in result.model.graph.node for a in n.attribute if a.type == a.GRAPH]
    originals = [a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH]
    assert [g.SerializeToString() for g in subgraphs] == [g.SerializeToString() for g in originals]


# --- 9. no prunable layer ---------------------------------------------------------------------


def test_no_prunable_layer_cli_exit_0_unchanged(tmp_path: Path, capsys) -> None:
    model = _no_producer()
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(model, str(source))
    assert cli.main([str(source), str(out), "--report", str(report)]) == 0
    stdout = capsys.readouterr().out
    assert "note: no prunable layer" in stdout
    assert "no prunable layer" in report.read_text()
    written = onnx.load(str(out))
    assert _stored(written).keys() == _stored(model).keys()
    for want, have in zip(run_outputs(model), run_outputs(written), strict=True):
        assert np.array_equal(want, have)


def test_no_prunable_layer_note_says_so() -> None:
    result = onnx_fpgm.prune(_no_producer(), 0.5)
    assert any("no prunable layer" in note for note in result.report.notes)


# --- 10. determinism --------------------------------------------------------------------------

_PRUNE_SCRIPT = """
import sys
from pathlib import Path
import onnx_fpgm
result = onnx_fpgm.prune(sys.argv[1], 0.5, round_to=2)
result.save(sys.argv[2])
Path(sys.argv[3]).write_text(result.report.to_json(timings=False))
"""


def test_determinism_in_process_and_subprocess(tmp_path: Path) -> None:
    source = tmp_path / "in.onnx"
    onnx.save(_ladder(width=16), str(source))
    outputs = []
    for run in range(2):
        result = onnx_fpgm.prune(str(source), 0.5, round_to=2)
        path = tmp_path / f"run{run}.onnx"
        result.save(path)
        outputs.append((path.read_bytes(), result.report.to_json(timings=False)))
    out, report = tmp_path / "sub.onnx", tmp_path / "sub.json"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", _PRUNE_SCRIPT, str(source), str(out), str(report)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    outputs.append((out.read_bytes(), report.read_text()))
    assert outputs[0][0] == outputs[1][0] == outputs[2][0]
    assert outputs[0][1] == outputs[1][1] == outputs[2][1]
    assert '"timings_s"' not in outputs[0][1]
