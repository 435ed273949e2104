"""Verification inputs the model accepts (issues 20 and 21).

Integer inputs are drawn from what they index (a 2-row token-type table, a position table),
masks as 0/1 rows with ones first; calibration samples are verified too; ``--dry-run`` needs no
run; NaN in the original is matched, not a failure; the second size set avoids length 1.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
import onnx_fpgm.model.io
from onnx_fpgm.cli import main as cli
from onnx_fpgm.model.input_ranges import IntegerRange, integer_ranges
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.oracle.validate import _compare_output, verify

EXPORTS = [pytest.param(False, id="torchscript"), pytest.param(True, id="dynamo")]


def _oracle(model: onnx.ModelProto, result: onnx_fpgm.PruneResult, shapes) -> None:
    """The checker and the oracle, rerun here at ``shapes`` with another seed."""
    onnx.checker.check_model(result.model, full_check=True)
    check = verify(model, result.model, analysis=result.analysis,
                   removed_classes=result.plan.removed_classes,
                   opset=onnx_fpgm.model.io.default_opset(model), seed=123, input_shapes=shapes)
    assert check, check.summary()
    assert check.max_rel_error <= 1e-4


# --- integer inputs from what they index --------------------------------------------------


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", EXPORTS)
def test_bert_prunes_at_defaults(dynamo: bool) -> None:
    from tests.text_models import export_bert

    model = export_bert(dynamo)
    ranges = integer_ranges(model)
    assert (ranges["input_ids"].low, ranges["input_ids"].high) == (0, 30)
    assert (ranges["token_type_ids"].low, ranges["token_type_ids"].high) == (0, 2)
    assert ranges["attention_mask"].mask
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed
    assert result.report.verification["passed"]
    assert len(result.report.verification["checked_at"]) == 2
    assert result.report.after.params < result.report.before.params
    for shapes in result.input_sizes.sets:
        assert all(s[1] > 1 for s in shapes.values()), shapes
        _oracle(model, result, shapes)


@pytest.mark.torch_export
def test_bert_feeds_are_in_range_and_masks_start_with_ones() -> None:
    from tests.text_models import export_bert

    model = export_bert(False)
    for seed in range(20):
        feeds = random_inputs(model, seed, {n: (3, 12) for n in
                                            ("input_ids", "token_type_ids", "attention_mask")})
        assert feeds["token_type_ids"].min() >= 0 and feeds["token_type_ids"].max() <= 1
        assert feeds["input_ids"].max() < 30
        mask = feeds["attention_mask"]
        assert mask.dtype == np.int64 and set(np.unique(mask)) <= {0, 1}
        assert (mask[:, 0] == 1).all()
        assert (np.diff(mask, axis=1) <= 0).all()  # ones first, then zeros
        make_session(model).run(None, feeds)


@pytest.mark.torch_export
def test_bert_cli_at_defaults_and_dry_run(tmp_path: Path, capsys) -> None:
    from tests.text_models import export_bert

    source, out = tmp_path / "bert.onnx", tmp_path / "out.onnx"
    onnx.save(export_bert(True), str(source))
    assert cli.main([str(source), str(out), "--sparsity", "0.5"]) == 0
    assert out.exists()
    assert cli.main([str(source), "--dry-run", "--sparsity", "0.5"]) == 0
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.torch_export
def test_calibration_samples_are_verified_and_silent_inputs_drawn(tmp_path: Path) -> None:
    from tests.text_models import export_bert

    model = export_bert(False)
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, input_ids=rng.integers(0, 30, (6, 10)),
             attention_mask=np.ones((6, 10), np.int64))  # token_type_ids left out
    result = onnx_fpgm.prune(model, 0.5, calibration=str(path))
    checked = result.report.verification["checked_at"]
    assert any("calibration" in c for c in checked), checked
    assert result.report.verification["passed"]
    assert any("token_type_ids" in n and "drawn" in n for n in result.report.notes)


def _gather_graph(index_path: list[onnx.NodeProto], rows: int, name: str = "ids",
                  final: str = "idx") -> onnx.ModelProto:
    """ids -> index_path -> Gather(table of ``rows`` rows, final) -> y."""
    table = numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "t")
    nodes = [*index_path, helper.make_node("Gather", ["t", final], ["y"], name="g")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(name, TensorProto.INT64,
                                                                         [1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [table, numpy_helper.from_array(np.array(3, np.int64), "three"),
                               numpy_helper.from_array(np.array([0], np.int64), "axes")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("path,final,want", [
    ([], "ids", IntegerRange(0, 2)),
    ([helper.make_node("Cast", ["ids"], ["c"], to=TensorProto.INT32),
      helper.make_node("Unsqueeze", ["c", "axes"], ["idx"])], "idx", IntegerRange(0, 2)),
    ([helper.make_node("Add", ["ids", "three"], ["idx"])], "idx", IntegerRange(0, -1)),
    ([helper.make_node("Sub", ["ids", "three"], ["idx"])], "idx", IntegerRange(3, 5)),
], ids=["direct", "cast-unsqueeze", "shifted-past", "shifted-back"])
def test_gather_bounds_follow_the_index_path(path, final, want) -> None:
    model = _gather_graph(path, 2, final=final)
    found = integer_ranges(model)["ids"]
    if want.high < 0:  # ids + 3 indexes 2 rows: no value fits; the draw stays in [0, 1)
        assert found.high <= 1
        return
    assert (found.low, found.high) == (want.low, want.high)
    feeds = random_inputs(model, 0)
    assert want.low <= feeds["ids"].min() and feeds["ids"].max() < want.high
    make_session(model).run(None, feeds)


def test_onehot_depth_range_and_mask_patterns() -> None:
    nodes = [
        helper.make_node("OneHot", ["cls", "depth", "onoff"], ["hot"], axis=-1),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "nf", "one"], ["r"]),
        helper.make_node("Cast", ["keep"], ["kb"], to=TensorProto.BOOL),
        helper.make_node("Where", ["kb", "x", "zerof"], ["w"]),
    ]
    inputs = [helper.make_tensor_value_info("cls", TensorProto.INT64, [1, 4]),
              helper.make_tensor_value_info("n", TensorProto.INT32, []),
              helper.make_tensor_value_info("keep", TensorProto.INT64, [1, 4]),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    inits = [numpy_helper.from_array(np.array([3], np.int64), "depth"),
             numpy_helper.from_array(np.array([0.0, 1.0], np.float32), "onoff"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zerof")]
    outputs = [helper.make_tensor_value_info(n, t, None) for n, t in
               (("hot", TensorProto.FLOAT), ("r", TensorProto.INT64), ("w", TensorProto.FLOAT))]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    ranges = integer_ranges(model)
    assert (ranges["cls"].low, ranges["cls"].high) == (0, 3)
    assert ranges["n"].low >= 1 and not ranges["n"].mask
    assert ranges["keep"].mask
    for seed in range(5):
        feeds = random_inputs(model, seed)
        assert feeds["n"] >= 1 and feeds["cls"].max() < 3 and feeds["keep"][0, 0] == 1
        make_session(model).run(None, feeds)


# --- sizes, dry run --------------------------------------------------------------------------


@pytest.mark.torch_export
def test_second_size_avoids_length_one() -> None:
    """A position table of 8 rows: the model runs at sequence 8 and below only."""
    from tests.text_models import export_bert

    model = export_bert(False, positions=8)
    result = onnx_fpgm.prune(model, 0.5)
    primary, secondary = result.input_sizes.primary, result.input_sizes.secondary
    assert primary["input_ids"] == (1, 8)
    assert secondary is not None and secondary["input_ids"][1] > 1, secondary
    assert result.report.verification["passed"]


def _fixed_length_model() -> onnx.ModelProto:
    """x [1, N] runs only at N = 7 (a Reshape to a constant shape), which no probe tries."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((7, 4))
                                .astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, 7], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, "n"])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_dry_run_needs_no_run(tmp_path: Path, capsys) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(_fixed_length_model(), str(source))
    assert cli.main([str(source), "--dry-run"]) == 0
    assert "sizes not confirmed" in capsys.readouterr().out
    assert cli.main([str(source), str(tmp_path / "o.onnx")]) == 2  # verification needs a run


# --- NaN in the original ---------------------------------------------------------------------


def test_nan_matched_by_nan_passes_and_one_sided_nan_fails() -> None:
    want = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    assert _compare_output("y", want, want.copy())
    one_sided = want.copy()
    one_sided[0] = np.nan
    bad = _compare_output("y", want, one_sided)
    assert not bad and not bad.finite
    assert not _compare_output("y", want, np.array([1.0, 2.0, 3.0, np.inf], np.float32))
    assert not _compare_output("y", want, np.array([1.0, np.nan, 3.0, -np.inf], np.float32))
    assert np.isfinite(bad.max_rel_error)


def _log_of_scale_model() -> onnx.ModelProto:
    """Conv -> Relu -> Conv, times log(scale) for a scalar input ``fmin`` (NaN if negative),
    with a second output Log(conv) that is NaN wherever the conv is negative, at any input."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4, name="conv1"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1] * 4, name="conv2"),
             helper.make_node("Log", ["fmin"], ["lf"]),
             helper.make_node("Mul", ["c2", "lf"], ["y"]),
             helper.make_node("Log", ["c2"], ["z"])]
    graph = helper.make_graph(nodes, "g", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
        helper.make_tensor_value_info("fmin", TensorProto.FLOAT, [])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 8, 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_model_with_nan_outputs_prunes_and_verifies() -> None:
    model = _log_of_scale_model()
    seed = next(s for s in range(10) if random_inputs(model, s)["fmin"] < 0)
    result = onnx_fpgm.prune(model, 0.5, seed=seed)  # its first draw makes y all NaN
    assert result.plan.n_removed
    assert result.report.verification["passed"], result.report.verification["summary"]
    assert "finite=True" not in result.report.verification["summary"]
    from tests.test_forms import _check

    _check(model, result)



def test_smoke_check_allows_the_originals_own_nan() -> None:
    from onnx_fpgm.oracle.validate import smoke_check

    model = _log_of_scale_model()  # z = Log(conv) is NaN wherever the conv is negative
    assert smoke_check(model, model) is None
    nan_elsewhere = onnx.ModelProto()
    nan_elsewhere.CopyFrom(model)
    nodes = list(nan_elsewhere.graph.node)
    mul, log = nodes[4], nodes[5]
    mul.input[0] = "z"  # y = Log(conv) * log(fmin): NaN where the original's y is finite
    del nan_elsewhere.graph.node[:]
    nan_elsewhere.graph.node.extend([*nodes[:4], log, mul])
    assert smoke_check(model, nan_elsewhere) == "non-finite outputs"
