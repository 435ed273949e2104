"""Sanity of the hand-built exporter-pattern catalogue (tests/onnx_patterns.py).

These tests check the models, not the pruning engine: every builder is deterministic, passes the
full ONNX checker, runs in onnxruntime CPU with finite outputs of the declared shapes, and names
in `prunable`/`frozen` refer to producer nodes that exist.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from tests.onnx_patterns import PATTERNS, Case

PRODUCERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
SYMBOLIC_BATCH = 2  # fed for every named (symbolic) dim
# Patterns whose form only exists in another opset; everything else is opset 17.
OPSETS = {
    "group_norm": 21,
    "split_opset11_attr": 11,
    "split_opset13_input": 13,
    "split_opset18_num_outputs": 18,
}

cases = pytest.mark.parametrize(("name", "case"), list(PATTERNS.items()), ids=list(PATTERNS))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


def _feeds(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for vi in model.graph.input:
        shape = [SYMBOLIC_BATCH if isinstance(d, str) else d for d in _dims(vi)]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def test_catalogue_is_not_empty() -> None:
    assert len(PATTERNS) >= 40


@cases
def test_model_passes_full_check(name: str, case: Case) -> None:
    model = case.build()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSETS.get(name, 17))]
    assert model.graph.input[0].name == "input"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@cases
def test_model_runs_in_onnxruntime(name: str, case: Case, rng: np.random.Generator) -> None:
    model = case.build()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outputs = session.run(None, _feeds(model, rng))
    assert len(outputs) == len(model.graph.output)
    for vi, out in zip(model.graph.output, outputs, strict=True):
        want = [SYMBOLIC_BATCH if isinstance(d, str) else d for d in _dims(vi)]
        assert list(out.shape) == want, vi.name
        assert np.isfinite(out).all(), vi.name


@cases
def test_node_names_are_unique_and_set(name: str, case: Case) -> None:
    names = [node.name for node in case.build().graph.node]
    assert all(names)
    assert len(names) == len(set(names))


@cases
def test_expected_sets_name_producers(name: str, case: Case) -> None:
    op_types = {node.name: node.op_type for node in case.build().graph.node}
    assert case.prunable or case.frozen
    assert not case.prunable & case.frozen
    for node_name in case.prunable | case.frozen:
        assert op_types.get(node_name) in PRODUCERS, node_name


@cases
def test_builder_is_deterministic(name: str, case: Case) -> None:
    assert case.build().SerializeToString() == case.build().SerializeToString()


def test_paddle_constant_weights_has_no_initializers() -> None:
    graph = PATTERNS["paddle_constant_weights"].build().graph
    assert not graph.initializer
    assert any(node.op_type == "Constant" for node in graph.node)


def test_weight_behind_cast_stores_fp16() -> None:
    graph = PATTERNS["weight_behind_cast"].build().graph
    (weight,) = [t for t in graph.initializer if t.name == "conv1.weight"]
    assert weight.data_type == onnx.TensorProto.FLOAT16


def test_symbolic_batch_keeps_a_named_dim() -> None:
    model = PATTERNS["symbolic_batch"].build()
    assert _dims(model.graph.input[0]) == ["N", 3, 8, 8]
