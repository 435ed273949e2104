"""Load what onnxruntime runs (issue 21): contrib ops written in the default domain.

onnxruntime's tools (the onnxruntime-genai model builder) write ``SimplifiedLayerNormalization``
in the default domain; ``onnx.checker`` refuses the file, onnxruntime runs it. Such a model is
loaded with a note and pruned; its opsets and domains are kept; the export is checked as the
input was. An op neither knows is still refused (exit 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.model.runtime_ops import runtime_only_ops
from onnx_fpgm.oracle.validate import verify


def _mlp_then(norm_op: str, opset: int = 17) -> onnx.ModelProto:
    """x -> MatMul(16->32) -> Relu -> MatMul(32->16) -> ``norm_op``(scale) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (16, 32)), ("w2", (32, 16)), ("gamma", (16,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["d"], name="down"),
             helper.make_node(norm_op, ["d", "gamma"], ["y"], name="norm", axis=-1,
                              epsilon=1e-5)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 4, 16])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [17, 21])
def test_default_domain_contrib_op_loads_and_prunes(tmp_path: Path, opset: int) -> None:
    model = _mlp_then("SimplifiedLayerNormalization", opset)
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered"):
        onnx.checker.check_model(model)
    want = make_session(model).run(None, random_inputs(model, 1))[0]  # onnxruntime runs it
    assert runtime_only_ops(model) == ["SimplifiedLayerNormalization"]
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed
    assert result.report.verification["passed"]
    assert any("SimplifiedLayerNormalization" in note for note in result.report.notes)
    pruned = result.model
    assert list(pruned.opset_import) == list(model.opset_import)
    assert [(n.op_type, n.domain) for n in pruned.graph.node] == \
        [(n.op_type, n.domain) for n in model.graph.node]
    up = next(t for t in pruned.graph.initializer if t.name == "w1")
    assert list(up.dims) == [16, 16]
    # the oracle, rerun: hidden units removed, output equal to the masked original
    check = verify(
        model, pruned, analysis=result.analysis, removed_classes=result.plan.removed_classes,
        opset=opset, seed=7)
    assert check, check.summary()
    have = make_session(pruned).run(None, random_inputs(model, 1))[0]
    assert have.shape == want.shape
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, str(source))
    assert cli.main([str(source), str(out), "--sparsity", "0.5"]) == 0
    written = onnx.load(str(out))
    assert list(written.opset_import) == list(model.opset_import)


def test_op_nobody_registers_is_still_refused(tmp_path: Path, capsys) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(_mlp_then("NoSuchNormalization"), str(source))
    assert cli.main([str(source), str(tmp_path / "o.onnx")]) == 2
    assert "fails onnx.checker" in capsys.readouterr().err
