"""Models as shipped, pruned with no option but the sparsity (issue 9).

Dynamic input dims (items 1-3): the tool chooses sizes the original runs at, keeps the symbolic
interface, and the oracle is rerun here at both chosen size sets; a model that works at one size
only (a Shape-derived value baked in) fails verification.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from onnx_fpgm.oracle.validate import verify
from onnx_fpgm.model.runtime import make_session, random_inputs
from tests import shipped_forms
from tests.conftest import pruned_layers
from tests.onnx_patterns import _Net
from tests.test_forms import _check

# --- dynamic input dims -----------------------------------------------------------------------

DYNAMIC_FORMS = shipped_forms.DYNAMIC_DIM_FORMS


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("form", [
    pytest.param(name, marks=pytest.mark.torch_export) if name.startswith("torch") else name
    for name in DYNAMIC_FORMS])
def test_dynamic_form_prunes_with_no_flag_and_verifies_at_two_sizes(form: str) -> None:
    model = DYNAMIC_FORMS[form]()
    result = onnx_fpgm.prune(model, 0.5)
    assert pruned_layers(result), "nothing pruned"
    sizes = result.input_sizes
    assert not sizes.given and sizes.secondary is not None
    (name, first), = sizes.primary.items()
    second = sizes.secondary[name]
    assert first[0] == 1 and second[0] == 2, (first, second)  # batch 1, then 2
    spatial = [k for k, d in enumerate(model.graph.input[0].type.tensor_type.shape.dim)
               if k and not d.dim_value > 0]
    assert all(first[k] != second[k] for k in spatial), (first, second)
    assert result.report.verification["passed"]
    assert len(result.report.verification["checked_at"]) == 2
    assert [_dims(v) for v in result.model.graph.input] == [_dims(v) for v in model.graph.input]
    for shapes in sizes.sets:  # the oracle, rerun here at each size
        _oracle(model, result, shapes)


def _oracle(model: onnx.ModelProto, result: onnx_fpgm.PruneResult, shapes) -> None:
    """``test_forms._check`` (which includes exact conv slices); the oracle alone without convs."""
    if any(node.op_type == "Conv" for node in model.graph.node):
        _check(model, result, input_shapes=shapes)
        return
    onnx.checker.check_model(result.model, full_check=True)
    check = verify(model, result.model, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes,
                   opset=onnx_fpgm.model.io.default_opset(model), seed=123, input_shapes=shapes)
    assert check, check.summary()


def test_nhwc_channels_stay_last() -> None:
    sizes = onnx_fpgm.prune(shipped_forms.nhwc_all_symbolic(), 0.5).input_sizes
    assert sizes.primary["input_1"][3] == 3 and sizes.secondary["input_1"][3] == 3


def test_cli_prints_and_records_the_sizes(tmp_path: Path, capsys) -> None:
    source, out, report = tmp_path / "det.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(shipped_forms.paddle_detector("minus_one"), str(source))
    assert cli.main([str(source), str(out), "--report", str(report)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "input sizes: x=1,3,64,64 (chosen by running the original; also verified at " \
           "x=2,3,96,96)" in printed
    data = json.loads(report.read_text())
    assert data["input_sizes"]["primary"] == {"x": [1, 3, 64, 64]}
    assert data["input_sizes"]["secondary"] == {"x": [2, 3, 96, 96]}
    assert data["verification"]["checked_at"] == ["x=1,3,64,64", "x=2,3,96,96"]


def test_token_input_gets_a_sequence_length() -> None:
    sizes = onnx_fpgm.prune(shipped_forms.token_classifier(), 0.5).input_sizes
    assert sizes.primary == {"input_ids": (1, 16)}
    assert sizes.secondary == {"input_ids": (2, 32)}


def test_given_input_shape_overrides_the_choice() -> None:
    result = onnx_fpgm.prune(shipped_forms.paddle_detector(), 0.5,
                             input_shapes=(("x", (1, 3, 128, 160)),))
    assert result.input_sizes.given
    assert result.input_sizes.primary == {"x": (1, 3, 128, 160)}
    assert result.input_sizes.secondary["x"][0] == 2
    assert result.report.before.macs > onnx_fpgm.prune(
        shipped_forms.paddle_detector(), 0.5).report.before.macs  # measured at the given size


# --- a size baked into the pruned model is caught ---------------------------------------------


def test_size_baked_model_fails_verification() -> None:
    model = shipped_forms.computed_shapes()
    sets = [{"input": (1, 3, 16, 16)}, {"input": (2, 3, 24, 24)}]
    baked = shipped_forms.size_baked(model, sets[0])
    feeds = random_inputs(model, 0, sets[0])
    assert np.array_equal(make_session(model).run(None, feeds)[0],
                          make_session(baked).run(None, feeds)[0])  # same at the first size
    assert verify(model, baked, input_shapes=sets[0])
    caught = verify(model, baked, size_sets=sets)
    assert not caught and "input=2,3,24,24" in caught.summary()
    assert verify(model, model, size_sets=sets)


def test_prune_catches_a_rewrite_that_bakes_a_size(monkeypatch) -> None:
    model = shipped_forms.computed_shapes()
    export = onnx_fpgm.model.export.export_graph
    primary = onnx_fpgm.prune(model, 0.5).input_sizes.primary

    def baking_export(graph, like, metadata=None, resized=None):
        return shipped_forms.size_baked(export(graph, like, metadata, resized), primary)

    monkeypatch.setattr(onnx_fpgm.model.export, "export_graph", baking_export)
    with pytest.raises(onnx_fpgm.VerificationError, match=r"at input sizes input=2,"):
        onnx_fpgm.prune(model, 0.5)


# --- how sizes are chosen ---------------------------------------------------------------------


def _two_inputs(image_dims: list, side_dims: list) -> onnx.ModelProto:
    """image -> conv -> GlobalAveragePool -> Flatten, added to a second input ``side``."""
    n = _Net(96)
    x = n.relu("conv1.relu", n.conv("conv1", "image", 3, 8, stride=2))
    x = n.op("Flatten", "flatten", [n.op("GlobalAveragePool", "gap", [x])], axis=1)
    n.op("Add", "add", [n.matmul_add("fc", x, 8, 8), "side"], out="output")
    return n.model({"output": [side_dims[0], 8]}, {"image": image_dims, "side": side_dims})


def test_one_value_per_symbol_and_anonymous_dims_apart() -> None:
    from onnx_fpgm.oracle.input_sizes import choose_sizes

    shared = choose_sizes(_two_inputs(["batch", 3, "S", "S"], ["batch", 8]))
    assert shared.primary == {"image": (1, 3, 64, 64), "side": (1, 8)}
    assert shared.secondary == {"image": (2, 3, 96, 96), "side": (2, 8)}
    anonymous = choose_sizes(_two_inputs([-1, 3, "?", "?"], [-1, 8]))
    assert {d.symbol for d in anonymous.dims} == {"image:0", "image:2", "image:3", "side:0"}
    assert anonymous.primary == {"image": (1, 3, 64, 64), "side": (1, 8)}


def test_nodes_sharing_a_name_prune_quietly(tmp_path: Path, capfd) -> None:
    """OpenVINO-inlined exports name many Constant nodes alike (``F0::anon``): the names are
    kept, and graph-surgeon's warning per pair (both nodes' tensors in full) is not printed."""
    n = _Net(96, constants=True)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    n.head(n.relu("relu2", n.conv("conv2", x, 8, 8)), 8)
    model = n.model({"output": [1, 4, 8, 8]})
    for node in model.graph.node:
        if node.op_type == "Constant":
            node.name = "anon"
    source, out = tmp_path / "dup.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(source))
    assert cli.main([str(source), str(out), "-q"]) == 0
    printed = capfd.readouterr()
    assert "share the same name" not in printed.out + printed.err
    assert [node.name for node in onnx.load(str(out)).graph.node] == \
        [node.name for node in model.graph.node]


def _body_reading_outer_weight(op: str) -> onnx.ModelProto:
    """conv1 -> conv2 -> head, plus an ``op`` (If: both branches; Loop: the body) whose body
    reads ``side.weight``, a top-level initializer nothing else reads (silero VAD's LSTM)."""
    from onnx import TensorProto, helper

    n = _Net(97)
    n.head(n.relu("relu2", n.conv("conv2", n.relu("relu1", n.conv("conv1", "input", 3, 8)),
                                  8, 8)), 8)
    n.randn("side.weight", [64, 4], 0.5)
    n.op("Flatten", "side_flat", ["side_x"], out="side_in")
    scalar = helper.make_tensor_value_info

    def body(tag: str, nodes: list, inputs: list, outputs: list) -> onnx.GraphProto:
        read = [helper.make_node("MatMul", ["side_in", "side.weight"], [f"{tag}_mm"],
                                 name=f"{tag}_mm"),
                helper.make_node("ReduceSum", [f"{tag}_mm"], [f"{tag}_y"], name=f"{tag}_sum",
                                 keepdims=0)]
        return helper.make_graph(read + nodes, tag, inputs, outputs)

    if op == "If":
        branches = {f"{b}_branch": body(b, [], [], [scalar(f"{b}_y", TensorProto.FLOAT, [])])
                    for b in ("then", "else")}
        n.op("If", "gate", [n.const("cond", np.array(True))], out="side", **branches)
    else:
        loop = body("body", [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
            helper.make_node("Add", ["acc_in", "body_y"], ["acc_out"], name="body_acc")],
            [scalar("i", TensorProto.INT64, []), scalar("cond_in", TensorProto.BOOL, []),
             scalar("acc_in", TensorProto.FLOAT, [])],
            [scalar("cond_out", TensorProto.BOOL, []), scalar("acc_out", TensorProto.FLOAT, [])])
        n.op("Loop", "loop", [n.const("trip", np.array(2, np.int64)),
                              n.const("cond", np.array(True)), n.const("acc0", np.float32(0))],
             out="side", body=loop)
    return n.model({"output": [1, 4, 8, 8], "side": []},
                   {"input": [1, 3, 8, 8], "side_x": [1, 64]})


def _all_params(graph: onnx.GraphProto) -> int:
    total = sum(int(np.prod(t.dims)) for t in graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += _all_params(attr.g)
    return total


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_weights_read_by_control_flow_bodies_stay_outside_once(op: str) -> None:
    """graph-surgeon's export copied such a weight into every body that reads it: the pruned
    file grew and the top-level count reported the weight as removed. The body's layer is
    named in a note (bodies are not pruned)."""
    model = _body_reading_outer_weight(op)
    result = onnx_fpgm.prune(model, 0.5)
    pruned = result.model
    assert [t.name for t in pruned.graph.initializer].count("side.weight") == 1
    assert _all_params(pruned.graph) == result.report.after.params
    assert pruned.ByteSize() < model.ByteSize()
    body_layer = "MatMul then_mm" if op == "If" else "MatMul body_mm"
    assert any("inside If/Loop/Scan bodies left untouched" in note and body_layer in note
               for note in result.report.notes), result.report.notes
    _check(model, result)
