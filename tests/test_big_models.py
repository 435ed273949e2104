"""The big-model path (issue 12) at a small scale: mapped weights, weight-fed sessions, no copies.

A generated conv stack (``models/make_big.py``) with external data is pruned with the limits
lowered (``io.PROTOBUF_LIMIT``: "over 2 GiB"; ``mapped.MAP_EXTERNAL_BYTES``: mapped), so it
takes the road a multi-GB model takes; peak-memory figures are measured by
``benchmarks/end_to_end.py``.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

import onnx_fpgm
import onnx_fpgm.io
import onnx_fpgm.mapped
import onnx_fpgm.masking
import onnx_fpgm.validate
from tests.conftest import protobuf_guard, pruned_layers

ROOT = Path(__file__).resolve().parent.parent


def _make_stack(path: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, str(ROOT / "models" / "make_big.py"), "stack", str(path),
                    "--stages", "2", "--blocks", "2", "--width", "32", "--size", "8", *extra],
                   check=True, capture_output=True)
    return path


def test_big_external_model_is_mapped_pruned_verified_and_saved_with_external_data(
        tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "in").mkdir()
    source = _make_stack(tmp_path / "in" / "stack.onnx")
    data_before = (source.parent / "stack.onnx.data").read_bytes()
    full = onnx.load(str(source))
    too_big = full.ByteSize() // 4  # any message holding a good part of the weights
    violations: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(onnx_fpgm.io, "PROTOBUF_LIMIT", 1)
        patch.setattr(onnx_fpgm.mapped, "MAP_EXTERNAL_BYTES", 1)
        for module, name in ((onnx.shape_inference, "infer_shapes"),
                             (onnx.checker, "check_model"), (ort, "InferenceSession")):
            patch.setattr(module, name,
                          protobuf_guard(name, getattr(module, name), too_big, violations))
        result = onnx_fpgm.prune(source, 0.5)
        out = tmp_path / "out" / "pruned.onnx"
        out.parent.mkdir()
        result.save(out)
    assert violations == []
    assert result.report.verification["passed"], result.report.verification["summary"]
    assert {"s0.b0.conv1", "s1.b1.conv1", "s0.plain"} <= pruned_layers(result)
    # the weights were mapped, not read into the protobuf; the input is untouched
    assert onnx_fpgm.io.has_external_data(result.original)
    assert result.report.before.bytes == onnx_fpgm.io.weight_bytes(full)
    assert (source.parent / "stack.onnx.data").read_bytes() == data_before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    # the saved model passes the oracle built the independent way (zeroed weight slices)
    masked = onnx_fpgm.masking.masked_original(
        full, result.analysis, result.plan.removed_classes, onnx_fpgm.io.default_opset(full))
    feeds = onnx_fpgm.validate.random_inputs(full, seed=7)
    want = onnx_fpgm.validate.make_session(masked).run(None, feeds)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    have = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    assert np.abs(want - have).max() <= onnx_fpgm.validate.RTOL * np.abs(want).max()


@pytest.mark.parametrize("mapped", [False, True], ids=["embedded", "mapped"])
def test_input_masks_equal_zeroed_weight_slices(tmp_path: Path, monkeypatch, mapped) -> None:
    """The weight-sharing oracle (``Mul`` masks on consumer inputs) gives the outputs of the
    masked original with zeroed weight slices, and differs from the unmasked original."""
    source = _make_stack(tmp_path / "stack.onnx", *([] if mapped else ["--no-external"]))
    monkeypatch.setattr(onnx_fpgm.mapped, "MAP_EXTERNAL_BYTES", 1 if mapped else 1 << 62)
    result = onnx_fpgm.prune(source, 0.5)
    full = onnx.load(str(source))
    light, weights = onnx_fpgm.validate.split_weights(full)
    assert weights and not any(t.name in weights for t in light.graph.initializer)
    assert onnx_fpgm.masking.mask_consumer_inputs(light, result.analysis,
                                                   result.plan.removed_classes)
    masked = onnx_fpgm.masking.masked_original(
        full, result.analysis, result.plan.removed_classes, onnx_fpgm.io.default_opset(full))
    feeds = onnx_fpgm.validate.random_inputs(full, seed=3)
    by_masks = onnx_fpgm.validate.WeightFedSession(light, weights).run(feeds)[0]
    by_weights = onnx_fpgm.validate.make_session(masked).run(None, feeds)[0]
    unmasked = onnx_fpgm.validate.make_session(full).run(None, feeds)[0]
    scale = np.abs(by_weights).max()
    assert np.abs(by_masks - by_weights).max() <= 1e-6 * scale
    assert np.abs(unmasked - by_weights).max() > 1e-3 * scale
