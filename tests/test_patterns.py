"""Every hand-built exporter form (tests/onnx_patterns.py) pruned at several sparsities."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_fpgm
from tests.conftest import check_pruned, pruned_layers, run_outputs
from tests.onnx_patterns import PATTERNS

NAMES = sorted(PATTERNS)


@pytest.mark.parametrize("sparsity", [0.3, 0.6], ids=["s0.3", "s0.6"])
@pytest.mark.parametrize("name", NAMES)
def test_pattern_prunes_exactly(name: str, sparsity: float) -> None:
    case = PATTERNS[name]
    model = case.build()
    result = onnx_fpgm.prune(model, sparsity)
    check_pruned(model, result)
    pruned = pruned_layers(result)
    assert case.prunable <= pruned, f"expected prunable: {sorted(case.prunable - pruned)}"
    assert not case.frozen & pruned, f"must stay whole: {sorted(case.frozen & pruned)}"
    for layer in result.report.layers:
        if layer.name in case.frozen:
            group = result.report.groups[layer.group]
            assert group.frozen, f"{layer.name} frozen without a reason"


@pytest.mark.parametrize("name", NAMES)
def test_sparsity_zero_is_exact_noop(name: str) -> None:
    model = PATTERNS[name].build()
    result = onnx_fpgm.prune(model, 0.0)
    assert not result.plan.n_removed
    before = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert value.dtype == after[key].dtype and np.array_equal(value, after[key])
    for want, have in zip(run_outputs(model), run_outputs(result.model)):
        assert np.array_equal(want, have)


def _model_with_unhandled_op(rng: np.random.Generator) -> onnx.ModelProto:
    """conv1 -> Shrink (an op with no handler) -> conv2 -> output."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Shrink", ["a"], ["b"], name="shrink", lambd=0.1),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                          [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                            [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_unhandled_op_leaves_layer_unpruned_with_reason(rng) -> None:
    model = _model_with_unhandled_op(rng)
    result = onnx_fpgm.prune(model, 0.5)
    group = next(g for g in result.report.groups if "conv1" in g.producers)
    assert group.frozen and "unsupported op Shrink" in group.frozen
    assert ("a", group.frozen) in result.report.blocked_tensors
    assert not pruned_layers(result)
    check_pruned(model, result)


def test_strict_raises_on_unhandled_op(rng) -> None:
    with pytest.raises(onnx_fpgm.UnsupportedOpError):
        onnx_fpgm.prune(_model_with_unhandled_op(rng), 0.5, strict=True)


def test_exclude_and_layer_sparsity() -> None:
    model = PATTERNS["split_opset13_input"].build()
    result = onnx_fpgm.prune(model, 0.5, exclude=("conv_a",), layer_sparsity=(("conv_b", 0.25),))
    layers = {layer.name: layer for layer in result.report.layers}
    assert layers["conv_a"].channels_after == layers["conv_a"].channels_before
    b = layers["conv_b"]
    assert b.channels_after == b.channels_before - round(0.25 * b.channels_before)
    check_pruned(model, result)


def test_round_to_keeps_multiples() -> None:
    model = PATTERNS["concat_skip"].build()
    result = onnx_fpgm.prune(model, 0.3, round_to=4)
    for group in result.report.groups:
        if not group.frozen:
            assert group.channels_after % 4 == 0 or group.channels_after == group.channels_before
    check_pruned(model, result)


def test_sparsity_one_keeps_min_channels() -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    result = onnx_fpgm.prune(model, 1.0, min_channels=2)
    layer = next(lay for lay in result.report.layers if lay.name == "conv1")
    assert layer.channels_after == 2
    check_pruned(model, result)


def test_report_json_has_kept_indices(tmp_path) -> None:
    import json

    result = onnx_fpgm.prune(PATTERNS["conv_bn_relu_conv"].build(), 0.5)
    data = json.loads(result.report.to_json())
    conv1 = next(layer for layer in data["layers"] if layer["name"] == "conv1")
    assert len(conv1["kept"]) == conv1["channels_after"] < conv1["channels_before"]
    assert conv1["kept"] == sorted(conv1["kept"])
    result.save(tmp_path / "out.onnx")
    saved = onnx.load(str(tmp_path / "out.onnx"))
    props = {p.key: p.value for p in saved.metadata_props}
    assert props["onnx_fpgm.sparsity"] == "0.5"


def test_oracle_catches_a_wrong_model() -> None:
    """Swapping two kept filters of a pruned conv must fail verification."""
    model = PATTERNS["conv_bn_relu_conv"].build()
    result = onnx_fpgm.prune(model, 0.5)
    tampered = onnx.ModelProto()
    tampered.CopyFrom(result.model)
    weight = next(t for t in tampered.graph.initializer if t.name == "conv1.weight")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[[0, 1]] = values[[1, 0]]
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    check = onnx_fpgm.oracle.validate.verify(
        onnx_fpgm.model.io.infer_shapes(model), tampered, analysis=result.analysis,
        removed_classes=result.plan.removed_classes, opset=17)
    assert not check
    # ... and the masked reference really differs from the unmasked original.
    plain = onnx_fpgm.oracle.validate.verify(model, result.model)
    assert not plain


def test_readme_lists_every_blocking_reason() -> None:
    from pathlib import Path

    from onnx_fpgm.deps.reasons import markdown

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = "<!-- reasons:begin -->\n", "<!-- reasons:end -->"
    section = readme[readme.index(start) + len(start):readme.index(end)]
    assert section == markdown(), "regenerate with: python -m onnx_fpgm.deps.reasons"


def test_readme_lists_every_handled_op() -> None:
    import re
    from pathlib import Path

    from onnx_fpgm.deps.registry import ops

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("<!-- ops:begin -->"):readme.index("<!-- ops:end -->")]
    listed = re.findall(r"[A-Za-z0-9]+", section.split("-->", 1)[1])
    assert listed == ops()
