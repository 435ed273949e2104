"""LSTM/GRU/RNN reading pruned channels as input features (CRNN recognisers, audio encoders)
and losing hidden units.

The channels of the last Conv reach the recurrent layer's input features; the Conv is pruned and
``W`` loses the matching input columns; the oracle (``W[:, :, i]`` of removed features zeroed)
is rerun here. Channels that reach the layer on another axis or on an initial state block.
Hidden units whose outputs reach a layer that follows are pruned too (``W``/``R``/``B`` rows,
``R`` columns, peepholes, constant initial states); the oracle zeroes ``R[:, :, h]`` and what
reads the outputs.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnx_fpgm
from onnx_fpgm.measure.bench import macs_by_node
from onnx_fpgm.model import io
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.oracle.masking import masked_original
from onnx_fpgm.deps.reasons import classify
from tests.conftest import check_pruned, pruned_layers
from tests.onnx_patterns import _Net
from tests.test_targets import _cost_models
from tests.torch_models import export_onnx

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent(n: _Net, op: str, x: str, features: int, hidden: int, *, directions: int = 1,
               initial_h: str = "") -> str:
    gates = GATES[op]
    w = n.randn(f"{op}.W", [directions, gates * hidden, features], features ** -0.5)
    r = n.randn(f"{op}.R", [directions, gates * hidden, hidden], hidden ** -0.5)
    b = n.randn(f"{op}.B", [directions, 2 * gates * hidden], 0.1)
    attrs = {"hidden_size": hidden}
    if directions == 2:
        attrs["direction"] = "bidirectional"
    inputs = [x, w, r, b] + (["", initial_h] if initial_h else [])
    return n.op(op, op.lower(), inputs, out="output", **attrs)


def _crnn(op: str, directions: int, hidden: int = 6) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> ReduceMean(H) -> Transpose -> ``op`` (features last)."""
    n = _Net(31)
    x = n.relu("relu2", n.conv("conv2", n.relu("relu1", n.conv("conv1", "input", 3, 8)), 8, 16))
    seq = n.op("ReduceMean", "pool_h", [x, n.ints("axes", [2])], keepdims=0)  # N, C, W
    seq = n.op("Transpose", "to_seq", [seq], perm=[2, 0, 1])  # W, N, C
    _recurrent(n, op, seq, 16, hidden, directions=directions)
    return n.model({"output": [8, directions, 1, hidden]}, {"input": [1, 3, 4, 8]}, opset=18)


def _weight(model: onnx.ModelProto, name: str) -> np.ndarray:
    found = [t for t in model.graph.initializer if t.name.split("__")[0] == name]
    return onnx.numpy_helper.to_array(found[0])


@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("directions", [1, 2], ids=["forward", "bidirectional"])
def test_conv_feeding_a_recurrent_layer_is_pruned(op: str, directions: int) -> None:
    """Layout 0 only: onnxruntime refuses ``layout=1``, so exporters write a Transpose."""
    model = _crnn(op, directions)
    result = onnx_fpgm.prune(model, 0.5)
    assert "conv2" in pruned_layers(result), result.report.groups
    assert _weight(result.model, f"{op}.W").shape == (directions, GATES[op] * 6, 8)
    assert _weight(result.model, f"{op}.R").shape == (directions, GATES[op] * 6, 6)
    check_pruned(model, result)


@pytest.mark.parametrize("op", list(GATES))
def test_cost_model_counts_the_recurrent_weights_as_rewritten(op: str) -> None:
    """Hidden size = input features: only W shrinks, R (same trailing size) stays whole."""
    model = _crnn(op, 2, hidden=16)
    params = _cost_models(model)["params"]
    result = onnx_fpgm.prune(model, 0.5)
    assert params.exact(result.analysis.removed_atoms(result.plan.removed_classes)) == \
        result.report.after.params


def _blocked(producer: str, result: onnx_fpgm.PruneResult) -> str:
    reasons = [g.frozen for g in result.report.groups if producer in g.producers and g.frozen]
    assert reasons, f"{producer} is not frozen"
    assert classify(reasons[0]), reasons[0]
    return reasons[0]


def test_channels_on_the_time_axis_block() -> None:
    """A Conv output (N, C, W) fed as X without a Transpose: its channels are X's batch axis."""
    n = _Net(32)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    seq = n.op("ReduceMean", "pool_h", [x, n.ints("axes", [2])], keepdims=0)
    _recurrent(n, "LSTM", seq, 8, 6)
    model = n.model({"output": [1, 1, 8, 6]}, {"input": [1, 3, 4, 8]}, opset=18)
    result = onnx_fpgm.prune(model, 0.5)
    assert "recurrent layer LSTM lstm on axis 1" in _blocked("conv1", result)
    check_pruned(model, result)


def test_channels_on_the_initial_state_block() -> None:
    """A Gemm's features become ``initial_h``: the hidden units are not pruned, so they block."""
    n = _Net(33)
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    seq = n.op("Transpose", "to_seq", [n.op("ReduceMean", "pool_h", [x, n.ints("axes", [2])],
                                             keepdims=0)], perm=[2, 0, 1])
    state = n.op("Gemm", "init", [n.op("Flatten", "flat", ["context"]),
                                  n.randn("init.weight", [4, 6], 0.5)])
    state = n.op("Unsqueeze", "state", [state, n.ints("state_axes", [0])])
    _recurrent(n, "GRU", seq, 8, 6, initial_h=state)
    model = n.model({"output": [8, 1, 1, 6]}, {"input": [1, 3, 4, 8], "context": [1, 4]},
                    opset=18)
    result = onnx_fpgm.prune(model, 0.5)
    assert "not on its input sequence" in _blocked("init", result)
    assert "conv1" in pruned_layers(result)
    check_pruned(model, result)


class _TorchCRNN(nn.Module):
    """Conv2d x2 -> mean over height -> (W, N, C) -> bidirectional ``cell`` -> Linear."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.rnn = getattr(nn, cell)(16, 12, bidirectional=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        y, _ = self.rnn(x.mean(2).permute(2, 0, 1))
        return self.fc(y)


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_torch_crnn_prunes_the_conv_before_the_recurrent_layer(cell: str, dynamo: bool) -> None:
    """torch.export writes ``nn.RNN`` unrolled: per time step a MatMul with the shared
    ``W_hh^T`` (each step's hidden is its own group, so every step gets its own sliced copy)."""
    model = export_onnx(_TorchCRNN(cell), (1, 1, 8, 16), dynamo=dynamo)
    unrolled = cell == "RNN" and dynamo
    assert any(node.op_type == cell for node in model.graph.node) != unrolled
    result = onnx_fpgm.prune(model, 0.5)
    conv2 = next(n.name for n in model.graph.node if n.op_type == "Conv"
                 and any(t.name == n.input[1] and t.dims[0] == 16 for t in model.graph.initializer))
    assert conv2 in pruned_layers(result), result.report.groups
    check_pruned(model, result)


def _hidden_reaches_matmul(op: str, directions: int, *, states: str = "none") -> onnx.ModelProto:
    """Conv -> ReduceMean(H) -> Transpose -> ``op`` -> Transpose -> Reshape(seq, batch,
    dirs * hidden) -> MatMul: the PyTorch export form of a (bi)directional layer and a Linear.
    ``states``: "none", "constant" (initial states and LSTM peepholes stored), "zeros"
    (PyTorch's computed zero states) or "input" (initial_h given by the caller)."""
    n = _Net(41)
    hidden, gates = 6, GATES[op]
    x = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    seq = n.op("Transpose", "to_seq", [n.op("ReduceMean", "pool_h", [x, n.ints("axes", [2])],
                                             keepdims=0)], perm=[2, 0, 1])  # (8, 1, 8)
    inputs = [seq, n.randn(f"{op}.W", [directions, gates * hidden, 8], 8 ** -0.5),
              n.randn(f"{op}.R", [directions, gates * hidden, hidden], hidden ** -0.5),
              n.randn(f"{op}.B", [directions, 2 * gates * hidden], 0.1)]
    extra = {"input": ["initial_h"]}.get(states, [])
    if states == "zeros":  # PyTorch's h0 = zeros(dirs, x.size(1), hidden), batch from a Shape
        batch = n.op("Unsqueeze", "batch", [n.op("Gather", "batch_dim", [
            n.op("Shape", "seq_shape", [seq]), n.const("one", np.array(1, dtype=np.int64))]),
            n.ints("ax0", [0])])
        for state in ("h0", "c0")[:2 if op == "LSTM" else 1]:  # one Concat each, as exported
            dims = n.op("Concat", f"{state}_dims", [n.ints(f"{state}_dirs", [directions]), batch,
                                                    n.ints(f"{state}_hidden", [hidden])], axis=0)
            extra.append(n.op("ConstantOfShape", f"{state}_zeros", [dims]))
    if states == "constant":
        extra = [n.randn("h0", [directions, 1, hidden], 0.5)]
        if op == "LSTM":
            extra += [n.randn("c0", [directions, 1, hidden], 0.5),
                      n.randn("P", [directions, 3 * hidden], 0.3)]
    attrs = {"hidden_size": hidden}
    if directions == 2:
        attrs["direction"] = "bidirectional"
    y = n.op(op, op.lower(), inputs + ([""] + extra if extra else []), **attrs)
    y = n.op("Transpose", "batch_major", [y], perm=[0, 2, 1, 3])
    y = n.op("Reshape", "merge_dirs", [y, n.ints("merged", [0, 0, -1])])
    n.matmul_add("fc", y, directions * hidden, 5, out="output")
    batch = "N" if states == "zeros" else 1  # a symbolic batch keeps the zeros computed
    given = {"input": [batch, 3, 4, 8]}
    if states == "input":
        given["initial_h"] = [directions, 1, hidden]
    return n.model({"output": [8, batch, 5]}, given, opset=18)


def _attr(model: onnx.ModelProto, node: str, name: str) -> int:
    found = next(n for n in model.graph.node if n.name == node)
    return next(onnx.helper.get_attribute_value(a) for a in found.attribute if a.name == name)


@pytest.mark.parametrize("states", ["none", "constant", "zeros"])
@pytest.mark.parametrize("op", list(GATES))
@pytest.mark.parametrize("directions", [1, 2], ids=["forward", "bidirectional"])
def test_hidden_units_are_pruned_across_gates_and_directions(op: str, directions: int,
                                                             states: str) -> None:
    model = _hidden_reaches_matmul(op, directions, states=states)
    result = onnx_fpgm.prune(model, 0.5)
    assert op.lower() in pruned_layers(result), result.report.groups
    assert _attr(result.model, op.lower(), "hidden_size") == 3
    assert _weight(result.model, f"{op}.W").shape == (directions, GATES[op] * 3, 4)
    assert _weight(result.model, f"{op}.R").shape == (directions, GATES[op] * 3, 3)
    assert _weight(result.model, f"{op}.B").shape == (directions, 2 * GATES[op] * 3)
    if states == "zeros":  # the stored hidden size of the zeros' shape is rewritten
        assert _weight(result.model, "h0_hidden").tolist() == [3]
        assert sum(n.op_type == "ConstantOfShape" for n in result.model.graph.node) == \
            (2 if op == "LSTM" else 1)
    if states == "constant":
        assert _weight(result.model, "h0").shape == (directions, 1, 3)
        if op == "LSTM":
            assert _weight(result.model, "P").shape == (directions, 9)
    check_pruned(model, result)
    # The weight-zeroing form of the oracle (the one big or quantized models fall back to)
    # agrees too: R[:, :, h] and the reader's rows of removed units zeroed in a copy.
    masked = masked_original(model, result.analysis, result.plan.removed_classes,
                             io.default_opset(model))
    feeds = random_inputs(model, seed=5, shapes={"input": (2, 3, 4, 8)} if states == "zeros"
                          else None)
    want = make_session(masked).run(None, feeds)[0]
    have = make_session(result.model).run(None, feeds)[0]
    np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)
    costs, removed = _cost_models(model), result.analysis.removed_atoms(result.plan.removed_classes)
    assert costs["params"].exact(removed) == result.report.after.params
    assert costs["macs"].exact(removed) == result.report.after.macs


@pytest.mark.parametrize("op", list(GATES))
def test_macs_count_the_recurrence(op: str) -> None:
    """(seq * batch) * (|W| + |R|): every step runs X_t @ W^T and H_t-1 @ R^T per direction."""
    model = _hidden_reaches_matmul(op, 2)
    steps, gates, hidden, features = 8, GATES[op], 6, 8
    per_node = macs_by_node(model)
    assert per_node[f"{op.lower()}_out"] == steps * 2 * gates * hidden * (features + hidden)
    result = onnx_fpgm.prune(model, 0.5)
    assert macs_by_node(result.model)[f"{op.lower()}_out"] == steps * 2 * gates * 3 * (4 + 3)


def test_hidden_units_stay_whole_when_the_caller_gives_the_state() -> None:
    """A streaming model's state input is its interface: the units stay, and the report says
    why; the input features are still pruned."""
    model = _hidden_reaches_matmul("GRU", 1, states="input")
    result = onnx_fpgm.prune(model, 0.5)
    assert _weight(result.model, "GRU.R").shape == (1, 18, 6)
    reasons = [reason for _, reason in result.report.blocked_tensors]
    assert any("hidden units of recurrent layer GRU gru stay whole: initial_h" in r
               for r in reasons), reasons
    assert all(classify(r) for r in reasons)
    assert "conv1" in pruned_layers(result)
    check_pruned(model, result)
