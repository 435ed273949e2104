"""int4 weights (issue 21): com.microsoft MatMulNBits from onnxruntime's own quantizer.

Output rows slice with their scales, zero points and bias; input columns go in whole blocks
(one scale per block), the kept blocks' codes, scales and zero points bit for bit; the oracle's
masked original puts the removed columns' codes at the zero point; MACs and params follow.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.deps.handlers.nbits import NBitsLayout, pack, unpack
from onnx_fpgm.measure.bench import count_macs, count_params
from onnx_fpgm.model.runtime import make_session, random_inputs
from onnx_fpgm.oracle.masking import masked_original
from tests import nbits_models
from tests.conftest import check_pruned

#: (block size, symmetric, hidden width): hidden 72 leaves down's last block of 16 half full.
CASES = [(16, False, 64), (16, True, 64), (32, False, 64), (32, True, 96), (16, False, 72),
         (128, True, 256)]


def _nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}


def _stored(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layout(node: onnx.NodeProto) -> NBitsLayout:
    attrs = _attrs(node)
    return NBitsLayout(attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return make_session(model).run(None, feeds)[0]


def _check_kept_blocks(original: onnx.ModelProto, result: onnx_fpgm.PruneResult) -> None:
    """Every MatMulNBits keeps its kept rows and blocks bit for bit, K and N rewritten."""
    before, after = _stored(original), _stored(result.model)
    kept_rows = {lay.name: lay.kept for lay in result.report.layers}
    for name, node in _nodes(result.model).items():
        old, new = _layout(_nodes(original)[name]), _layout(node)
        rows = kept_rows.get(name, list(range(old.n)))
        assert new.n == len(rows)
        b_old, b_new = before[node.input[1]], after[node.input[1]]
        # the kept blocks: those whose codes appear in the new B, in order
        blocks = [b for b in range(old.k_blocks) if any(
            np.array_equal(b_old[rows, b], b_new[:, j]) for j in range(new.k_blocks))]
        assert len(blocks) == new.k_blocks, name
        assert np.array_equal(b_new, b_old[np.ix_(rows, blocks)]), name
        s_old = before[node.input[2]].reshape(old.n, -1)
        assert np.array_equal(after[node.input[2]].reshape(new.n, -1),
                              s_old[np.ix_(rows, blocks)]), name
        if len(node.input) > 3 and node.input[3]:
            z_old = unpack(before[node.input[3]].reshape(old.n, -1), 4, old.k_blocks)
            z_new = unpack(after[node.input[3]].reshape(new.n, -1), 4, new.k_blocks)
            assert np.array_equal(z_new, z_old[np.ix_(rows, blocks)]), name
        full = [min(old.block_size, old.k - b * old.block_size) for b in blocks]
        assert new.k == sum(full), name


@pytest.mark.parametrize("block_size,symmetric,hidden", CASES,
                         ids=[f"b{b}-{'sym' if s else 'asym'}-h{h}" for b, s, h in CASES])
def test_int4_mlp_prunes_rows_and_whole_blocks(block_size: int, symmetric: bool,
                                               hidden: int) -> None:
    dim = max(nbits_models.DIM, block_size)
    model = nbits_models.quantize(
        nbits_models.mlp("Gelu" if symmetric else "Relu", hidden, dim), block_size, symmetric)
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed and result.report.verification["passed"]
    check_pruned(model, result)
    _check_kept_blocks(model, result)
    up, down = (_nodes(result.model)[n] for n in ("up_Q4", "down_Q4"))
    assert _attrs(up)["N"] == _attrs(down)["K"] < hidden
    assert count_macs(result.model) < count_macs(model)
    assert count_params(result.model) < count_params(model)
    feeds = random_inputs(model, 3)
    assert not np.allclose(_run(model, feeds), _run(result.model, feeds))  # a real change


def test_int4_swiglu_prunes_one_width_and_counts_macs() -> None:
    model = nbits_models.quantize(nbits_models.swiglu(hidden=128), 32, False)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    _check_kept_blocks(model, result)
    nodes = _nodes(result.model)
    assert _attrs(nodes["gate_Q4"])["N"] == _attrs(nodes["up_Q4"])["N"] == \
        _attrs(nodes["down_Q4"])["K"] == 64
    tokens, dim = 16, nbits_models.DIM
    assert count_macs(model) == 3 * tokens * dim * 128
    assert count_macs(result.model) == 3 * tokens * dim * 64
    # params count the codes of a packed weight (N x K), then the scales and zero points:
    # gate/up (128 rows, 1 block: 1 zero-point byte a row), down (32 rows, 4 blocks: 2 bytes)
    assert count_params(model) == 3 * dim * 128 + 2 * (128 + 128) + (32 * 4 + 32 * 2)
    assert count_params(result.model) == count_params(model) // 2
    # 2 of 4 blocks of 32 kept: 64 channels, a multiple of 8 (the note counts channels)
    assert not any("multiple of 8" in note for note in result.report.notes)


def test_masked_original_zeroes_the_removed_columns() -> None:
    """The oracle's masking of a MatMulNBits (codes at the zero point) equals its input with
    those columns zeroed, for asymmetric and symmetric weights."""
    for symmetric in (False, True):
        model = nbits_models.quantize(nbits_models.mlp(hidden=64), 16, symmetric)
        result = onnx_fpgm.prune(model, 0.5, verify=False)
        masked = masked_original(model, result.analysis, result.plan.removed_classes, 20)
        kept = result.report.layers[[lay.name for lay in result.report.layers]
                                    .index("up_Q4")].kept
        gate = np.zeros(64, np.float32)
        gate[kept] = 1.0
        by_hand = onnx.ModelProto()
        by_hand.CopyFrom(model)
        down = _nodes(by_hand)["down_Q4"]
        by_hand.graph.initializer.append(numpy_helper.from_array(gate, "gate"))
        by_hand.graph.node.insert(list(by_hand.graph.node).index(down), helper.make_node(
            "Mul", [down.input[0], "gate"], ["gated"], name="gate_mul"))
        down.input[0] = "gated"
        feeds = random_inputs(model, 5)
        np.testing.assert_allclose(_run(masked, feeds), _run(by_hand, feeds), rtol=1e-5,
                                   atol=1e-6)
        assert not np.allclose(_run(masked, feeds), _run(model, feeds))


@pytest.mark.parametrize("bits,symmetric", [(2, False), (4, False), (4, True), (8, False)])
def test_scored_rows_are_what_onnxruntime_multiplies(bits: int, symmetric: bool) -> None:
    """The rows FPGM scores, dequantized by the handler, equal onnxruntime's weight (A = I)."""
    import onnx_graphsurgeon as gs

    from onnx_fpgm.deps.handlers.nbits import dequantized_rows

    model = nbits_models.quantize(nbits_models.mlp(hidden=72), 16, symmetric, bits=bits)
    node = next(n for n in gs.import_onnx(model).nodes if n.name == f"down_Q{bits}")
    layout = NBitsLayout.of(node)

    stored = SimpleNamespace(const=lambda tensor: getattr(tensor, "values", None))  # as ctx
    rows = dequantized_rows(stored, node, layout)
    graph = helper.make_graph(
        [helper.make_node("MatMulNBits", ["a", *_node_inputs(model, node.name)[1:]], ["w"],
                          domain="com.microsoft", **dict(node.attrs))], "eye",
        [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [layout.k, layout.k])],
        [helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, None)],
        list(model.graph.initializer))
    eye = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=9)
    weight = _run(eye, {"a": np.eye(layout.k, dtype=np.float32)})
    np.testing.assert_array_equal(rows, weight.T)


def _node_inputs(model: onnx.ModelProto, name: str) -> list[str]:
    return list(next(n for n in model.graph.node if n.name == name).input)


def test_pack_inverts_unpack() -> None:
    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        packed = rng.integers(0, 256, (3, 5, 4)).astype(np.uint8)
        codes = unpack(packed, bits, 4 * 8 // bits)
        assert codes.max() < 1 << bits
        assert np.array_equal(pack(codes, bits, 4), packed)


@pytest.mark.torch_export
def test_int4_llama_prunes_mlp_widths_in_blocks() -> None:
    float_model = nbits_models.llama()
    model = nbits_models.quantize(float_model, 16, False)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) >= 14
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    _check_kept_blocks(model, result)
    downs = [n for name, n in _nodes(result.model).items() if "down_proj" in name]
    assert downs and all(_attrs(n)["K"] == 32 for n in downs)
    assert count_macs(result.model) < count_macs(model)


def _float_zero_points(model: onnx.ModelProto, offset: float) -> onnx.ModelProto:
    """``model`` with each packed zero point stored unpacked as a float (HQQ's form), plus
    ``offset`` (a fractional zero point is no code: the oracle masks whole blocks by scale)."""
    stored = {t.name: t for t in model.graph.initializer}
    for node in _nodes(model).values():
        blocks = _layout(node).k_blocks
        codes = unpack(numpy_helper.to_array(stored[node.input[3]]), 4, blocks)
        stored[node.input[3]].CopyFrom(numpy_helper.from_array(
            codes.astype(np.float32) + offset, node.input[3]))
    return model


@pytest.mark.parametrize("form", ["bits2", "bits8", "accuracy_level4", "float_zero_point",
                                  "fractional_zero_point"])
def test_other_nbits_forms_prune_exactly(form: str) -> None:
    bits = {"bits2": 2, "bits8": 8}.get(form, 4)
    model = nbits_models.quantize(nbits_models.mlp(hidden=64), 16, False, bits=bits)
    if form == "accuracy_level4":  # A quantized to int8 per block inside the kernel
        for node in _nodes(model).values():
            node.attribute.append(helper.make_attribute("accuracy_level", 4))
    elif form.endswith("zero_point"):
        model = _float_zero_points(model, 0.25 if form.startswith("fractional") else 0.0)
    result = onnx_fpgm.prune(model, 0.5)
    assert result.plan.n_removed
    check_pruned(model, result)
    up, down = (_nodes(result.model)[f"{n}_Q{bits}"] for n in ("up", "down"))
    assert _attrs(up)["N"] == _attrs(down)["K"] == 32
    stored = _stored(result.model)
    assert stored[down.input[1]].shape == (nbits_models.DIM, 2, 16 * bits // 8)


def test_g_idx_leaves_the_layer_whole_with_a_reason() -> None:
    model = nbits_models.quantize(nbits_models.mlp(hidden=64), 16, False)
    down = _nodes(model)["down_Q4"]
    model.graph.initializer.append(numpy_helper.from_array(
        (np.arange(64) // 16).astype(np.int32), "g_idx"))
    down.input.append("g_idx")
    result = onnx_fpgm.prune(model, 0.5)
    assert not result.plan.n_removed
    assert any("g_idx" in (g.frozen or "") for g in result.report.groups)


def test_compensation_leaves_quantized_codes_and_says_so(tmp_path) -> None:
    model = nbits_models.quantize(nbits_models.mlp(hidden=64), 16, False)
    path = tmp_path / "calibration.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((4, 8, nbits_models.DIM))
             .astype(np.float32))
    result = onnx_fpgm.prune(model, 0.5, compensate="lstsq", calibration=str(path))
    assert result.report.verification["passed"]
    assert any("down_Q4: quantized codes" in note for note in result.report.notes)
    _check_kept_blocks(model, result)


def test_accuracy_level4_scales_stay_constant_in_the_oracle() -> None:
    """With ``accuracy_level`` 4 a constant scale runs the int8 kernel, a fed one the float
    path: the oracle's weight-fed sessions keep every MatMulNBits input constant (here the up
    layer's 1,024 scales would have been fed, the pruned model's 512 not: verification failed)."""
    from onnx_fpgm.oracle.weight_feeds import split_weights

    model = nbits_models.quantize(nbits_models.mlp(hidden=512), 16, False)
    for node in _nodes(model).values():
        node.attribute.append(helper.make_attribute("accuracy_level", 4))
    scales = _nodes(model)["up_Q4"].input[2]
    assert _stored(model)[scales].size >= 1024
    light, fed = split_weights(model)
    assert scales not in fed and scales in {t.name for t in light.graph.initializer}
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert _attrs(_nodes(result.model)["up_Q4"])["N"] == 256
