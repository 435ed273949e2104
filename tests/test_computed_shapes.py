"""Partly computed shape parameters (a batch read by ``Shape``, the channel part constant).

Every form is pruned with no option but the sparsity and checked by the oracle at batch 1 (inside
``check_pruned``) and again at batch 3, since a rewritten target must not bake a batch size in.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.measure.bench import count_params
from onnx_fpgm.deps.reasons import classify
from tests import shipped_forms
from tests.conftest import _stored, check_pruned, pruned_layers
from tests.onnx_patterns import _Net

TF = "StatefulPartitionedCall/model/"
TF_PRODUCERS = {f"{TF}conv1/Conv2D", f"{TF}conv2/Conv2D", f"{TF}conv3/Conv2D",
                f"{TF}dense/MatMul"}


def _check_at_batch(original: onnx.ModelProto, result: onnx_fpgm.PruneResult, batch: int) -> None:
    value = original.graph.input[0]
    dims = [d.dim_value or batch for d in value.type.tensor_type.shape.dim]
    check = onnx_fpgm.oracle.validate.verify(
        onnx_fpgm.model.io.infer_shapes(original), result.model, analysis=result.analysis,
        removed_classes=result.plan.removed_classes,
        opset=onnx_fpgm.model.io.default_opset(original), seed=7,
        input_shapes={value.name: tuple(dims)})
    assert check, check.summary()
    assert check.max_rel_error <= 1e-4


def _prune_and_check(model: onnx.ModelProto) -> onnx_fpgm.PruneResult:
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    _check_at_batch(model, result, 3)
    return result


def test_tf2onnx_computed_flatten_prunes_the_last_conv_block() -> None:
    model = shipped_forms.tf2onnx_computed_flatten()
    result = _prune_and_check(model)
    assert pruned_layers(result) == TF_PRODUCERS
    assert result.report.prunable_channels == 72  # all but the 10 output features
    # Only the channel-carrying constant changed; the batch is still read from the input.
    kept = next(l for l in result.report.layers if l.name == f"{TF}conv3/Conv2D").channels_after
    assert _stored(result.model)["const_fold_opt__30"].tolist() == [4 * 4 * kept]
    assert _stored(result.model)["const_fold_opt__30"].dtype == np.int32
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == [n.op_type for n in model.graph.node]


def test_tf2onnx_shared_channel_constant_is_copied() -> None:
    model = shipped_forms.tf2onnx_computed_flatten(shared_constant=True)
    result = _prune_and_check(model)
    assert pruned_layers(result) == TF_PRODUCERS
    assert _stored(result.model)["const_fold_opt__30"].tolist() == [256]  # the side reader's
    assert any("const_fold_opt__30" in note and "copy" in note for note in result.report.notes)


PEER_FORMS = {"tf2onnx_computed_flatten": shipped_forms.tf2onnx_computed_flatten,
              "paddle_reshape_0_-1": shipped_forms.paddle_reshape_zero_minus_one,
              "resize_sizes_from_shapes": shipped_forms.resize_computed_sizes,
              "slice_bounds_partly_computed": shipped_forms.slice_bounds_partly_computed}


@pytest.mark.parametrize("form", list(PEER_FORMS))
def test_prunes_at_least_what_onnxsim_prunes(form: str) -> None:
    pruning = pytest.importorskip("onnxsim.pruning", reason="peer onnxsim not installed")
    model = PEER_FORMS[form]()
    before = count_params(model)
    ours = onnx_fpgm.prune(model, 0.5).report.after.params
    peer = count_params(pruning.apply_structured_pruning(model, 0.5))
    assert before - ours >= before - peer


FORMS = {  # builder, producers that must be pruned (the rest feed the graph output)
    "paddle_reshape_0_-1": (shipped_forms.paddle_reshape_zero_minus_one,
                            {"conv2d_0.tmp_0", "conv2d_1.tmp_0"}),
    "resize_sizes_from_shapes": (shipped_forms.resize_computed_sizes,
                                 {"conv1", "conv2", "conv_lat", "conv_top"}),
    "resize_sizes_other_channels": (shipped_forms.resize_computed_channel_sizes,
                                    {"conv1", "conv2"}),
    "slice_bounds_partly_computed": (shipped_forms.slice_bounds_partly_computed,
                                     {"conv1", "conv2", "conv_skip"}),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_hand_built_forms(form: str) -> None:
    build, expected = FORMS[form]
    result = _prune_and_check(build())
    assert pruned_layers(result) == expected


TORCH = [(form, dynamo) for form in ("view", "reshape", "flatten", "se", "chunk")
         for dynamo in (False, True)]


@pytest.mark.torch_export
@pytest.mark.parametrize("form,dynamo", TORCH,
                         ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in TORCH])
def test_torch_dynamic_batch_view(form: str, dynamo: bool) -> None:
    model = shipped_forms.torch_view_batch(form, dynamo)
    result = _prune_and_check(model)
    assert not [g for g in result.report.groups if g.frozen and
                "reaches graph output" not in g.frozen]
    assert len(pruned_layers(result)) == len(result.report.layers) - 1  # all but the output


def _computed_channel_count() -> onnx.ModelProto:
    """Reshape(x, Concat(Shape(x)[0:1], ReduceProd(Shape(x)[1:4]))): the count is computed."""
    n = _Net(5)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    shape = n.op("Shape", "shape", [x])
    batch = n.op("Slice", "batch", [shape, n.ints("s0", [0]), n.ints("e1", [1]),
                                    n.ints("a0", [0])])
    rest = n.op("Slice", "rest", [shape, n.ints("s1", [1]), n.ints("e4", [4]),
                                  n.ints("a0b", [0])])
    count = n.op("ReduceProd", "count", [rest], keepdims=1)
    x = n.op("Reshape", "flatten", [x, n.op("Concat", "target", [batch, count], axis=0)])
    w = n.randn("fc.weight", [8 * 8 * 8, 4], 0.05)
    n.op("MatMul", "fc", [x, w], out="output")
    return n.model({"output": ["N", 4]}, {"input": ["N", 3, 8, 8]}, opset=17)


def test_computed_channel_count_is_blocked_with_a_documented_reason() -> None:
    model = _computed_channel_count()
    result = onnx_fpgm.prune(model, 0.5)
    group = next(g for g in result.report.groups if "conv1" in g.producers)
    assert group.frozen and "flatten" in group.frozen
    assert classify(group.frozen).title == "computed weights or parameters"
    assert not pruned_layers(result)
    assert [t.dims for t in result.model.graph.initializer] == \
        [t.dims for t in model.graph.initializer]



def test_slice_rewrites_the_channel_bound_and_keeps_the_computed_one() -> None:
    model = shipped_forms.slice_bounds_partly_computed()
    result = _prune_and_check(model)
    kept = next(l for l in result.report.layers if l.name == "conv1").kept
    stored = _stored(result.model)
    assert stored["crop_starts"].tolist() == [sum(k < 2 for k in kept), 0]
    assert stored["c_end"].tolist() == [sum(k < 6 for k in kept)]
    assert "skip_shape" in {n.name for n in result.model.graph.node}


def _shared_computed_target() -> onnx.ModelProto:
    """Two Reshapes read one computed target ``Concat(Shape(a)[0:1], [128])``: conv_a's and
    conv_b's channels would both move the one constant, so neither may be rewritten there."""
    n = _Net(6)
    a = n.relu("relu_a", n.conv("conv_a", "input", 3, 8, stride=2))
    b = n.relu("relu_b", n.conv("conv_b", "input", 3, 8, stride=2))
    batch = n.op("Slice", "batch", [n.op("Shape", "shape", [a]), n.ints("s0", [0]),
                                    n.ints("e1", [1]), n.ints("a0", [0])])
    target = n.op("Concat", "target", [batch, n.ints("features", [8 * 4 * 4])], axis=0)
    flat_a = n.op("Reshape", "flatten_a", [a, target])
    flat_b = n.op("Reshape", "flatten_b", [b, target])
    n.op("MatMul", "fc", [n.op("Add", "sum", [
        n.op("MatMul", "fc_a", [flat_a, n.randn("fc_a.weight", [128, 6], 0.05)]),
        n.op("MatMul", "fc_b", [flat_b, n.randn("fc_b.weight", [128, 6], 0.05)])]),
        n.randn("fc.weight", [6, 4], 0.3)], out="output")
    return n.model({"output": ["N", 4]}, {"input": ["N", 3, 8, 8]}, opset=17)


def test_a_computed_target_shared_by_two_reshapes_is_rewritten_per_reader() -> None:
    """One computed target read by two Reshapes (YOLOv8's Detect head form): each reader gets
    a private copy of the path to the stored element it needs rewritten (copy on write)."""
    model = _shared_computed_target()
    result = onnx_fpgm.prune(model, 0.5)
    assert {"conv_a", "conv_b", "fc_a", "fc_b"} <= pruned_layers(result)
    targets = {n.name: n.input[1] for n in result.model.graph.node if n.op_type == "Reshape"}
    assert targets["flatten_a"] != targets["flatten_b"]
    check_pruned(model, result)
    _check_at_batch(model, result, 3)


def test_reshape_merging_channels_with_symbolic_dims_is_blocked() -> None:
    """``x.view(x.size(0), -1)`` after symbolic spatial dims: the feature count depends on H, W,
    so the channel mapping is unknown: blocked with a documented reason, never guessed."""
    n = _Net(8)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    batch = n.op("Slice", "batch", [n.op("Shape", "shape", [x]), n.ints("s0", [0]),
                                    n.ints("e1", [1]), n.ints("a0", [0])])
    x = n.op("Reshape", "flatten", [x, n.op("Concat", "target", [batch, n.ints("m1", [-1])],
                                            axis=0)])
    n.op("ReduceSum", "sum", [x, n.ints("axes", [1])], out="output", keepdims=1)
    model = n.model({"output": ["N", 1]}, {"input": ["N", 3, "H", "W"]}, opset=17)
    result = onnx_fpgm.prune(model, 0.5, input_shapes=(("input", (1, 3, 8, 8)),))
    reason = next(g.frozen for g in result.report.groups if "conv1" in g.producers)
    assert reason and "merges channels with unknown dims" in reason
    assert classify(reason).title == "unknown shapes"


def _conv1d_mlp(dynamo: bool) -> onnx.ModelProto:
    """Hugging Face's GPT-2 ``Conv1D`` (``addmm`` on ``x.view(-1, d)``, then ``view(b, s, n)``)
    twice around a GELU, dynamic batch and sequence: onnx names the Gemm's rows ``unk__N``."""
    import io

    import torch
    from torch import nn

    class Conv1D(nn.Module):
        def __init__(self, nx: int, nf: int) -> None:
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            size_out = x.size()[:-1] + (self.nf,)
            x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
            return x.view(size_out)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(16, 32), Conv1D(32, 16)

        def forward(self, x):
            return self.c_proj(nn.functional.gelu(self.c_fc(x), approximate="tanh"))

    torch.manual_seed(0)
    module, example = Mlp().eval(), torch.randn(2, 5, 16)
    if dynamo:
        dims = {0: torch.export.Dim("batch", max=64), 1: torch.export.Dim("seq", max=64)}
        return torch.onnx.export(module, (example,), dynamo=True, input_names=["x"],
                                 dynamic_shapes={"x": dims}, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["x"],
                      output_names=["y"], opset_version=17,
                      dynamic_axes={"x": {0: "batch", 1: "seq"}, "y": {0: "batch", 1: "seq"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_gpt2_conv1d_view_back_from_gemm_rows(dynamo: bool) -> None:
    model = _conv1d_mlp(dynamo)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    widths = [(g.channels_before, g.channels_after) for g in result.report.groups
              if not g.frozen]
    assert widths == [(32, 16)], [g.frozen for g in result.report.groups]
