"""Nothing to prune is not an error: dynamically quantized graphs and what the export must keep.

onnxruntime's ``quantize_dynamic`` output (IR 6 or 7, ConvInteger, MatMulInteger,
DynamicQuantizeLinear, ``com.microsoft`` ops, shape-less ``value_info``) is written unchanged
with exit 0 and a note naming the quantized layers; ``--dry-run`` works on it. When a float layer
is pruned next to such forms, the export keeps the IR version, every opset import and the
declared interface; a checker failure of our own export is exit 3 (internal error), never 2.
"""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import onnx_fpgm
import onnx_fpgm.model.io
from onnx_fpgm.cli import main as cli
from tests import shipped_forms
from tests.conftest import check_pruned, pruned_layers

QUANTIZED = ["ConvInteger /conv/Conv_quant", "DynamicQuantizeMatMul /fc/Gemm_MatMul_quant"]


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("ir_version", [6, 7])
def test_only_quantized_layers_written_unchanged_with_a_note(ir_version: int,
                                                             tmp_path: Path, capsys) -> None:
    model = shipped_forms.quantized_dynamic_by_hand(ir_version=ir_version)
    onnx.checker.check_model(model, full_check=True)
    source, out = _save(model, tmp_path / "q.onnx"), tmp_path / "out.onnx"
    assert cli.main([str(source), str(out)]) == 0
    stdout = capsys.readouterr().out
    assert out.read_bytes() == source.read_bytes()
    note = " ".join(stdout.split())
    assert all(layer in note for layer in QUANTIZED)
    assert "prune the float model before quantizing" in note
    assert "no prunable layer" in note


def test_dry_run_on_a_quantized_model(tmp_path: Path, capsys) -> None:
    source = _save(shipped_forms.quantized_dynamic_by_hand(), tmp_path / "q.onnx")
    assert cli.main([str(source), "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "quantized layers are not pruned" in " ".join(captured.out.split())
    assert not captured.err


def test_float_layers_pruned_next_to_quantized_ones_keep_the_ir6_model_whole() -> None:
    model = shipped_forms.quantized_dynamic_by_hand(float_stem=True)
    onnx.checker.check_model(model, full_check=True)
    result = onnx_fpgm.prune(model, 0.5)
    assert pruned_layers(result) == {"stem1"}
    check_pruned(model, result)  # IR version, opset imports, interface, checker, oracle
    assert result.model.ir_version == 6
    assert [(o.domain, o.version) for o in result.model.opset_import] == \
        [("", 11), ("com.microsoft", 1), ("ai.onnx.ml", 2)]


def test_our_export_failing_the_checker_is_exit_3(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without restoring the declared output types, graph-surgeon writes the output without a
    shape (taken from the shape-less value_info): our bug, so exit 3, not 2."""
    source = _save(shipped_forms.quantized_dynamic_by_hand(float_stem=True), tmp_path / "q.onnx")
    monkeypatch.setattr(onnx_fpgm.model.export, "restore_interface_types",
                        lambda model, like, resized=None: None)
    out = tmp_path / "out.onnx"
    assert cli.main([str(source), str(out)]) == 3
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1
    assert "internal error" in stderr and "Field 'shape'" in stderr
    assert not out.exists()


@pytest.mark.torch_export
def test_onnxruntime_quantize_dynamic_output(tmp_path: Path, capsys) -> None:
    pytest.importorskip("onnxruntime.quantization")
    model = shipped_forms.quantized_dynamic_torch(tmp_path)
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
            "DynamicQuantizeLSTM"} <= ops
    source, out = tmp_path / "quantized.onnx", tmp_path / "out.onnx"
    assert cli.main([str(source), str(out)]) == 0
    assert out.read_bytes() == source.read_bytes()
    note = " ".join(capsys.readouterr().out.split())
    assert "DynamicQuantizeLSTM" in note and "ConvInteger" in note
    assert cli.main([str(source), "--dry-run", "--quiet"]) == 0
