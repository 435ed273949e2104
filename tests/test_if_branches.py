"""Layers inside If branches (issue 20: silero VAD holds its 16 Convs and its LSTM in an If on
the sample rate).

Each branch holds a Conv -> Relu -> Conv chain whose weights are stored in the branch (as an
initializer of the branch, or a Constant node in it) or at the top level; the branch is chosen
by an integer scalar input compared with a constant (the sample rate). Pruned with no option but
the sparsity: the channels between the two Convs of each branch go, the channels that reach the
If's outputs stay, and the oracle runs both branches.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.model.input_ranges import integer_ranges
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.oracle.input_sizes import choose_sizes
from onnx_fpgm.oracle.validate import verify
from tests.conftest import pruned_layers

RATE = 16000  # the then branch's value of ``sr``


def _weight(rng: np.random.Generator, name: str, shape: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)


def _branch(tag: str, rng: np.random.Generator, outer: list[onnx.TensorProto], *,
            constant_node: bool, batch, source: str = "x") -> onnx.GraphProto:
    """``{tag}_conv1`` (reads ``source``: 3 -> 8, or 8 -> 8 from the outer ``h``; weight in
    the branch) -> Relu -> ``{tag}_conv2`` (8 -> 4, weight at the top level) -> the output."""
    width = 3 if source == "x" else 8
    w1, b1 = _weight(rng, f"{tag}.w1", [8, width, 3, 3]), _weight(rng, f"{tag}.b1", [8])
    outer.append(_weight(rng, f"{tag}.w2", [4, 8, 1, 1]))
    nodes = [helper.make_node("Conv", [source, w1.name, b1.name], [f"{tag}_c1"],
                              name=f"{tag}_conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [f"{tag}_c1"], [f"{tag}_r1"], name=f"{tag}_relu"),
             helper.make_node("Conv", [f"{tag}_r1", f"{tag}.w2"], [f"{tag}_y"],
                              name=f"{tag}_conv2")]
    initializers = [w1, b1]
    if constant_node:  # silero's branches hold their weights as Constant nodes
        nodes[:0] = [helper.make_node("Constant", [], [t.name], value=t) for t in initializers]
        initializers = []
    return helper.make_graph(nodes, tag, [], [
        helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, [batch, 4, 8, 8])],
        initializers)


def if_model(batch=1, inferred: bool = False, reads_outer: bool = False) -> onnx.ModelProto:
    """y = If(sr == 16000, then: conv chain, else: another conv chain)(x); ``inferred``: with
    the branches' value_info written (as exporters do), so the oracle masks their inputs;
    ``reads_outer``: both branches read ``h = Relu(conv0(x))``, computed outside the If."""
    rng = np.random.default_rng(20)
    outer: list[onnx.TensorProto] = [numpy_helper.from_array(np.array(RATE, np.int64), "rate")]
    source = "h" if reads_outer else "x"
    then_branch = _branch("then", rng, outer, constant_node=False, batch=batch, source=source)
    else_branch = _branch("else", rng, outer, constant_node=True, batch=batch, source=source)
    before = []
    if reads_outer:
        outer.append(_weight(rng, "w0", [8, 3, 1, 1]))
        before = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0"),
                  helper.make_node("Relu", ["c0"], ["h"], name="relu0")]
    graph = helper.make_graph(
        [*before, helper.make_node("Equal", ["sr", "rate"], ["is_rate"], name="is_rate"),
         helper.make_node("If", ["is_rate"], ["y"], name="by_rate", then_branch=then_branch,
                          else_branch=else_branch)],
        "if_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8]),
                    helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if inferred:
        model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


def _branch_graph(model: onnx.ModelProto, attr_name: str) -> onnx.GraphProto:
    node = next(n for n in model.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == attr_name)


def _dims(graph: onnx.GraphProto, name: str) -> list[int]:
    for tensor in graph.initializer:
        if tensor.name.startswith(name):
            return list(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0].startswith(name):
            return list(node.attribute[0].t.dims)
    raise KeyError(name)


def test_the_branch_value_of_an_integer_input_is_drawn() -> None:
    """``sr`` reaches an Equal with 16000: random inputs draw 16000 and a value that is not it
    (one variant each), so that each branch runs."""
    model = if_model()
    spec = integer_ranges(model)["sr"]
    assert spec.choices == (RATE,)
    drawn = {int(random_inputs(model, 0, variant=k)["sr"]) for k in range(2)}
    assert RATE in drawn and len(drawn) == 2


@pytest.mark.parametrize("batch, inferred, reads_outer", [
    (1, False, False), ("batch", False, False), (1, True, False), (1, True, True),
    (1, False, True)])
def test_layers_inside_if_branches_are_pruned_and_both_branches_verified(
        batch, inferred, reads_outer) -> None:
    model = if_model(batch, inferred, reads_outer)
    result = onnx_fpgm.prune(model, 0.5)
    assert {"then_conv1", "else_conv1"} <= pruned_layers(result)
    if reads_outer:  # the outer layer both branches read is pruned, its readers sliced alike
        assert "conv0" in pruned_layers(result)
        for attr, tag in (("then_branch", "then"), ("else_branch", "else")):
            assert _dims(_branch_graph(result.model, attr), f"{tag}.w1")[1] == 4
    assert not {"then_conv2", "else_conv2"} & pruned_layers(result)  # they reach If's outputs
    pruned = result.model
    then_g, else_g = _branch_graph(pruned, "then_branch"), _branch_graph(pruned, "else_branch")
    assert _dims(then_g, "then.w1")[0] == 4 and _dims(else_g, "else.w1")[0] == 4
    assert _dims(pruned.graph, "then.w2")[1] == 4 and _dims(pruned.graph, "else.w2")[1] == 4
    assert [n.name for n in then_g.node] == [n.name for n in _branch_graph(
        model, "then_branch").node]
    checked = result.report.verification["checked_at"]
    assert any(f"sr={RATE}" in c for c in checked) and any(
        "sr=" in c and f"sr={RATE}" not in c for c in checked), checked
    assert result.report.after.params < result.report.before.params
    # the oracle, rerun here on each branch: pruned == masked original
    shapes = result.input_sizes.primary
    for variant in range(2):
        feeds = random_inputs(model, 7, shapes, variant=variant)
        check = verify(model, pruned, analysis=result.analysis,
                       removed_classes=result.plan.removed_classes, opset=17, seed=7,
                       input_shapes=shapes, extra_feeds=[feeds])
        assert check, check.summary()
    # and the branches really differ: the pruned model is not the original
    feeds = random_inputs(model, 3, shapes, variant=0)
    want = make_session(model).run(None, feeds)[0]
    have = make_session(pruned).run(None, feeds)[0]
    assert want.shape == have.shape and not np.allclose(want, have)


def _anonymous_state_model() -> onnx.ModelProto:
    """silero's interface: ``x (?, ?)`` and a recurrent-style ``state (2, ?, 4)`` whose
    anonymous dim must equal x's batch (a Concat joins them), nothing naming them alike."""
    rng = np.random.default_rng(3)
    w = _weight(rng, "w", [16, 4])
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
         helper.make_node("Gather", ["state", "zero"], ["s0"], name="first", axis=0),
         helper.make_node("Concat", ["xw", "s0"], ["y"], name="join", axis=1)],
        "anonymous", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", "?"]),
                      helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "?", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["?", 8])], [w, zero])
    for value in graph.input:  # anonymous: neither dim_value nor dim_param
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "?":
                dim.ClearField("dim_param")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_an_anonymous_state_batch_is_probed_at_the_batch_size() -> None:
    """The probe tried the state's ``?`` as a sequence length (16 where x's batch is 1): the
    model ran at no size (exit 2). It is tried at the batch's value too, and follows it."""
    sizes = choose_sizes(_anonymous_state_model())
    assert sizes.primary == {"x": (1, 16), "state": (2, 1, 4)}
    assert sizes.secondary is not None and sizes.secondary["state"][1] == \
        sizes.secondary["x"][0] == 2


def _scripted_branches() -> onnx.ModelProto:
    """A torch module with data-dependent control flow (``if sr == 16000``), scripted and
    exported (dynamo=False): an If whose branches hold their Conv1d weights."""
    import io

    import torch
    from torch import nn

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2 = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 4, 1)
            self.b1, self.b2 = nn.Conv1d(2, 8, 3, padding=1), nn.Conv1d(8, 4, 1)

        def forward(self, x: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
            if bool(sr == 16000):  # RATE (a global: script cannot read it)
                return self.a2(torch.relu(self.a1(x)))
            return self.b2(torch.relu(self.b1(x)))

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(torch.jit.script(Branchy().eval()),
                      (torch.randn(1, 2, 16), torch.tensor(RATE)), buffer, dynamo=False,
                      input_names=["x", "sr"], output_names=["y"], opset_version=17)
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.torch_export
def test_a_scripted_torch_if_is_pruned_in_both_branches() -> None:
    model = _scripted_branches()
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    result = onnx_fpgm.prune(model, 0.5)
    pruned = pruned_layers(result)
    assert sum(1 for name in pruned if "Conv" in name) == 2, pruned  # a1 and b1
    checked = result.report.verification["checked_at"]
    assert len(checked) == 2 and any(f"sr={RATE}" in c for c in checked), checked
    assert result.report.after.params < result.report.before.params


def test_a_params_target_counts_the_layers_in_branches() -> None:
    """The cost model counted the top graph's constants only: the branches' layers were no
    saving, and 0.7 of the params was out of reach (best 0.98)."""
    model = if_model(1, True, True)
    result = onnx_fpgm.prune(model, target_params=0.7)
    target = result.report.target
    assert target.achieved <= 0.7
    assert target.estimated == pytest.approx(target.achieved)
    assert result.report.after.params / result.report.before.params == \
        pytest.approx(target.achieved)


def loop_model(inferred: bool = False) -> onnx.ModelProto:
    """y = Loop(2 times: acc + conv2(Relu(conv1(x))))(zeros): the body holds conv1's weights,
    conv2's are at the top level; the accumulator is carried from one iteration to the next."""
    rng = np.random.default_rng(21)
    outer: list[onnx.TensorProto] = []
    chain = _branch("body", rng, outer, constant_node=False, batch=1)
    body = helper.make_graph(
        [*chain.node,
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond"),
         helper.make_node("Add", ["acc_in", "body_y"], ["acc_out"], name="body_acc")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 4, 8, 8])],
        list(chain.initializer))
    outer += [numpy_helper.from_array(np.array(2, np.int64), "trips"),
              numpy_helper.from_array(np.array(True), "go"),
              numpy_helper.from_array(np.zeros((1, 4, 8, 8), np.float32), "acc0")]
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "acc0"], ["y"], name="repeat", body=body)],
        "loop_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], outer)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if inferred:  # the body's value_info written: the oracle masks the inputs inside it
        model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("inferred", [False, True])
def test_layers_inside_a_loop_body_are_pruned(inferred: bool) -> None:
    model = loop_model(inferred)
    result = onnx_fpgm.prune(model, 0.5)
    assert "body_conv1" in pruned_layers(result)
    assert "body_conv2" not in pruned_layers(result)  # its channels are carried out
    body = next(a.g for a in result.model.graph.node[0].attribute if a.name == "body")
    assert _dims(body, "body.w1")[0] == 4 and _dims(result.model.graph, "body.w2")[1] == 4
    assert result.report.verification["passed"]
    check = verify(model, result.model, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes, opset=17, seed=11)
    assert check, check.summary()


def test_an_integer_compared_inside_a_branch_has_choices() -> None:
    """``sr`` is compared only inside an If branch (a nested choice): the walk over its
    readers enters the branches, so 8000 is drawn as well."""
    scalar = helper.make_tensor_value_info
    then_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["rate8k"], value=numpy_helper.from_array(
            np.array(8000, np.int64), "rate8k")),
         helper.make_node("Equal", ["sr", "rate8k"], ["is8k"]),
         helper.make_node("Cast", ["is8k"], ["then_y"], to=TensorProto.FLOAT)],
        "then", [], [scalar("then_y", TensorProto.FLOAT, [])])
    else_branch = helper.make_graph(
        [helper.make_node("Constant", [], ["else_y"], value=numpy_helper.from_array(
            np.array(0.5, np.float32), "half"))],
        "else", [], [scalar("else_y", TensorProto.FLOAT, [])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then_branch,
                          else_branch=else_branch)],
        "nested", [scalar("flag", TensorProto.BOOL, []), scalar("sr", TensorProto.INT64, [])],
        [scalar("y", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    assert integer_ranges(model)["sr"].choices == (8000,)
