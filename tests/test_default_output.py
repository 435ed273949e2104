"""The default CLI output says why a model stays whole or mostly whole (issue 20).

Without ``--dry-run`` it lists the few frozen reasons that block the most channels, with
their channel and group counts; a model that is mostly pruned gets no such list.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from onnx_fpgm.report import top_frozen_reasons


def _convs(widths: list[int], tail: str | None) -> onnx.ModelProto:
    """x -> Conv(widths[0]) -> Relu -> ... -> Conv(widths[-1]) -> [tail op] -> y."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, cin = [], [], "x", 3
    for k, width in enumerate(widths):
        w = numpy_helper.from_array(rng.standard_normal((width, cin, 3, 3)).astype(np.float32),
                                    f"w{k}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [prev, w.name], [f"c{k}"], pads=[1] * 4,
                                      name=f"conv{k}"))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"))
        prev, cin = f"r{k}", width
    if tail:
        nodes.append(helper.make_node(tail, [prev], ["t"], name="tail", axis=1))
        prev = "t"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, widths[-1], 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("widths,tail,reason", [
    ([8, 32], None, "reaches graph output"),
    ([8, 32], "Softmax", "normalises"),
], ids=["output-conv", "softmax-over-channels"])
def test_mostly_whole_model_lists_top_reasons(tmp_path: Path, capsys, widths, tail,
                                              reason) -> None:
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    model = _convs(widths, tail)
    onnx.save(model, str(source))
    result = onnx_fpgm.prune(model, 0.5)
    assert result.report.coverage <= 0.5
    top = top_frozen_reasons(result.report)
    assert top and reason in top[0].reason
    assert top[0].channels == sum(g.channels_before for g in result.report.groups
                                  if g.frozen == top[0].reason)
    assert cli.main([str(source), str(out), "--sparsity", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "blocked:" in printed and reason in printed
    assert f"{top[0].channels} channels, {top[0].groups} group(s)" in printed


def test_mostly_pruned_model_lists_no_reasons(tmp_path: Path, capsys) -> None:
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(_convs([32, 32, 4], None), str(source))
    assert cli.main([str(source), str(out), "--sparsity", "0.5"]) == 0
    assert "blocked:" not in capsys.readouterr().out
