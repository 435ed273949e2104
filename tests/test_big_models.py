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
import onnx_fpgm.model.io
import onnx_fpgm.model.runtime
import onnx_fpgm.model.mapped
import onnx_fpgm.oracle.masking
import onnx_fpgm.oracle.validate
from tests.conftest import check_pruned, protobuf_guard, pruned_layers

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
        patch.setattr(onnx_fpgm.model.io, "PROTOBUF_LIMIT", 1)
        patch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1)
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
    assert onnx_fpgm.model.io.has_external_data(result.original)
    assert result.report.before.bytes == onnx_fpgm.model.io.weight_bytes(full)
    assert (source.parent / "stack.onnx.data").read_bytes() == data_before
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    header = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in header.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    # the saved model passes the oracle built the independent way (zeroed weight slices)
    masked = onnx_fpgm.oracle.masking.masked_original(
        full, result.analysis, result.plan.removed_classes, onnx_fpgm.model.io.default_opset(full))
    feeds = onnx_fpgm.model.runtime.random_inputs(full, seed=7)
    want = onnx_fpgm.model.runtime.make_session(masked).run(None, feeds)[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    have = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]
    assert np.abs(want - have).max() <= onnx_fpgm.oracle.validate.RTOL * np.abs(want).max()


@pytest.mark.parametrize("mapped", [False, True], ids=["embedded", "mapped"])
def test_input_masks_equal_zeroed_weight_slices(tmp_path: Path, monkeypatch, mapped) -> None:
    """The weight-sharing oracle (``Mul`` masks on consumer inputs) gives the outputs of the
    masked original with zeroed weight slices, and differs from the unmasked original."""
    source = _make_stack(tmp_path / "stack.onnx", *([] if mapped else ["--no-external"]))
    monkeypatch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1 if mapped else 1 << 62)
    result = onnx_fpgm.prune(source, 0.5)
    full = onnx.load(str(source))
    light, weights = onnx_fpgm.oracle.validate.split_weights(full)
    assert weights and not any(t.name in weights for t in light.graph.initializer)
    assert onnx_fpgm.oracle.masking.mask_consumer_inputs(light, result.analysis,
                                                   result.plan.removed_classes)
    masked = onnx_fpgm.oracle.masking.masked_original(
        full, result.analysis, result.plan.removed_classes, onnx_fpgm.model.io.default_opset(full))
    feeds = onnx_fpgm.model.runtime.random_inputs(full, seed=3)
    by_masks = onnx_fpgm.oracle.validate.WeightFedSession(light, weights).run(feeds)[0]
    by_weights = onnx_fpgm.model.runtime.make_session(masked).run(None, feeds)[0]
    unmasked = onnx_fpgm.model.runtime.make_session(full).run(None, feeds)[0]
    scale = np.abs(by_weights).max()
    assert np.abs(by_masks - by_weights).max() <= 1e-6 * scale
    assert np.abs(unmasked - by_weights).max() > 1e-3 * scale


def _calibration_file(tmp_path: Path) -> str:
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    return str(path)


#: The outcome paths (issue 11) that prune many times or measure: on a mapped input none may
#: hold the weights in one message (compensation reads them into the protobuf by design).
OUTCOME_PATHS = {
    "target_global": (dict(target_macs=0.5, allocation="global"), True),
    "target_uniform_params": (dict(target_params=0.5, allocation="uniform"), True),
    "sensitivity": (dict(target_macs=0.5, allocation="sensitivity", calibration=True), True),
    "latency": (dict(target_latency=0.7, allocation="uniform"), True),
    "compensated_sensitivity": (dict(target_macs=0.5, allocation="sensitivity",
                                     calibration=True, compensate="lstsq"), False),
    "compensate": (dict(sparsity=0.5, calibration=True, compensate="auto"), False),
}


@pytest.mark.parametrize("path", list(OUTCOME_PATHS), ids=list(OUTCOME_PATHS))
def test_outcome_paths_on_a_mapped_model(tmp_path: Path, monkeypatch, path: str) -> None:
    """Targets, sensitivity, latency search and compensation work on mapped weights, and the
    multi-prune paths keep them mapped (no message holding the weights)."""
    source = _make_stack(tmp_path / "stack.onnx")
    options, guarded = OUTCOME_PATHS[path]
    if options.get("calibration"):
        options = {**options, "calibration": _calibration_file(tmp_path)}
    too_big = onnx.load(str(source)).ByteSize() // 4
    violations: list[str] = []
    with monkeypatch.context() as patch:
        patch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1)
        if guarded:
            patch.setattr(onnx_fpgm.model.io, "PROTOBUF_LIMIT", 1)
            for module, name in ((onnx.checker, "check_model"), (ort, "InferenceSession")):
                patch.setattr(module, name,
                              protobuf_guard(name, getattr(module, name), too_big, violations))
        result = onnx_fpgm.prune(source, **options)
    assert violations == []
    assert result.report.verification["passed"], result.report.verification["summary"]
    if guarded:
        assert onnx_fpgm.model.io.has_external_data(result.original)  # mapped, not read in
    if "target_macs" in options:
        assert result.report.after.macs <= 0.5 * result.report.before.macs * 1.02
    if options.get("compensate", "none") == "none":  # compensated weights differ on purpose
        check_pruned(onnx.load(str(source)), result)
    else:
        assert result.report.compensation in ("none", "bias", "lstsq")
        assert result.report.fidelity


def test_sweep_on_a_mapped_model_loads_it_once(tmp_path: Path, monkeypatch) -> None:
    from onnx_fpgm.outcome.sweep import run_sweep

    source = _make_stack(tmp_path / "stack.onnx")
    too_big = onnx.load(str(source)).ByteSize() // 4
    violations: list[str] = []
    loads: list[str] = []
    real_load = onnx_fpgm.model.mapped.load_mapped
    with monkeypatch.context() as patch:
        patch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1)
        patch.setattr(onnx_fpgm.model.io, "PROTOBUF_LIMIT", 1)
        patch.setattr(onnx_fpgm.model.mapped, "load_mapped",
                      lambda model: loads.append(str(model)) or real_load(model))
        for module, name in ((onnx.checker, "check_model"), (ort, "InferenceSession")):
            patch.setattr(module, name,
                          protobuf_guard(name, getattr(module, name), too_big, violations))
        sweep = run_sweep(str(source), (0.5, 0.3), ("uniform", "global"), latency_runs=3)
    assert violations == []
    assert loads == [str(source)]
    assert [p.error for p in sweep.points] == [None] * 4
    assert all(p.macs <= p.target * 1.02 and p.latency_ms for p in sweep.points)
