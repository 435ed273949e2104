"""BERT after onnxruntime's transformer optimizer (issue 21): com.microsoft
EmbedLayerNormalization, Attention (packed QKV weight and bias), SkipLayerNormalization and
BiasGelu or FastGelu. Whole heads and the FFN width prune; the residual width stays whole; the fused ops'
MACs are counted; a MatMul the analysis cannot place is still counted and named."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.deps.analysis import build_analysis
from onnx_fpgm.measure.bench import macs_by_node
from onnx_fpgm.model import io
from tests.conftest import check_pruned

VOCAB, DIM, HEADS, FFN, SEQ = 20, 32, 4, 64, 6


def _fused_block(qkv_sizes: bool = False) -> onnx.ModelProto:
    """EmbedLayerNormalization -> Attention -> MatMul -> SkipLayerNormalization -> MatMul ->
    BiasGelu -> MatMul -> SkipLayerNormalization, as the optimizer writes one BERT layer."""
    rng = np.random.default_rng(0)

    def init(name, *shape, scale=None):
        scale = shape[0] ** -0.5 if scale is None else scale
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [init("word", VOCAB, DIM, scale=1.0), init("pos", 16, DIM, scale=1.0),
             init("seg", 2, DIM, scale=1.0), init("g0", DIM, scale=0.1), init("b0", DIM),
             init("w_qkv", DIM, 3 * DIM), init("b_qkv", 3 * DIM), init("w_o", DIM, DIM),
             init("bias_o", DIM), init("g1", DIM), init("b1", DIM), init("w_up", DIM, FFN),
             init("b_up", FFN), init("w_down", FFN, DIM), init("bias_d", DIM),
             init("g2", DIM), init("b2", DIM)]
    ms = "com.microsoft"
    attrs = {"qkv_hidden_sizes": [DIM] * 3} if qkv_sizes else {}
    nodes = [
        helper.make_node("EmbedLayerNormalization",
                         ["input_ids", "segment_ids", "word", "pos", "seg", "g0", "b0", "mask"],
                         ["emb", "mask_index"], name="embed", domain=ms, epsilon=1e-5),
        helper.make_node("Attention", ["emb", "w_qkv", "b_qkv", "mask_index"], ["a"],
                         name="attention", domain=ms, num_heads=HEADS, **attrs),
        helper.make_node("MatMul", ["a", "w_o"], ["o"], name="out_proj"),
        helper.make_node("SkipLayerNormalization", ["o", "emb", "g1", "b1", "bias_o"], ["h1"],
                         name="skip1", domain=ms, epsilon=1e-5),
        helper.make_node("MatMul", ["h1", "w_up"], ["u"], name="up"),
        helper.make_node("BiasGelu", ["u", "b_up"], ["g"], name="gelu", domain=ms),
        helper.make_node("MatMul", ["g", "w_down"], ["d"], name="down"),
        helper.make_node("SkipLayerNormalization", ["d", "h1", "g2", "b2", "bias_d"], ["y"],
                         name="skip2", domain=ms, epsilon=1e-5)]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32, [1, SEQ])
              for n in ("input_ids", "segment_ids", "mask")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])]
    graph = helper.make_graph(nodes, "bert_block", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid(ms, 1)], ir_version=8)


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


@pytest.mark.parametrize("qkv_sizes", [False, True], ids=["plain", "qkv_hidden_sizes"])
def test_fused_bert_layer_loses_whole_heads_and_ffn_width(qkv_sizes: bool) -> None:
    model = _fused_block(qkv_sizes)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    shapes = _shapes(result.model)
    assert shapes["w_qkv"] == [DIM, 3 * DIM // 2] and shapes["b_qkv"] == [3 * DIM // 2]
    assert shapes["w_o"] == [DIM // 2, DIM]
    assert shapes["w_up"] == [DIM, FFN // 2] and shapes["b_up"] == [FFN // 2]
    assert shapes["w_down"] == [FFN // 2, DIM]
    for table in ("word", "pos", "seg", "g0", "b0"):  # the embedding and residual stay whole
        assert shapes[table] == _shapes(model)[table]
    attrs = {a.name: helper.get_attribute_value(a) for a in _node(result.model,
                                                                  "attention").attribute}
    assert attrs["num_heads"] == HEADS // 2
    if qkv_sizes:
        assert attrs["qkv_hidden_sizes"] == [DIM // 2] * 3
    heads = [g for g in result.report.groups if g.heads]
    assert len(heads) == 1 and heads[0].channels_after == HEADS // 2


def test_fused_attention_macs_are_counted_and_follow_the_heads() -> None:
    model = _fused_block()
    per_node = macs_by_node(model)
    # packed QKV projection, then QK^T and AV over all heads
    assert per_node["a"] == SEQ * DIM * 3 * DIM + 2 * SEQ * SEQ * DIM
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert macs_by_node(result.model)["a"] == per_node["a"] // 2
    _check_cost_models(model, result)


def _cost_models(model: onnx.ModelProto, removed_classes):
    """The targets' cost models of ``model`` and the atoms a plan removes."""
    from onnx_fpgm.deps.constants import fold_constant_shapes
    from onnx_fpgm.planning.costmodel import build_cost_model

    graph = io.import_graph(model, io.infer_shapes(io.light_copy(model)))
    fold_constant_shapes(graph)
    analysis = build_analysis(graph, io.default_opset(model))
    return ({m: build_cost_model(analysis, graph, model, m) for m in ("macs", "params")},
            analysis.removed_atoms(removed_classes))


def _check_cost_models(model: onnx.ModelProto, result: onnx_fpgm.PruneResult,
                       metrics: tuple[str, ...] = ("macs", "params")) -> None:
    """The cost model the targets plan with counts the fused ops as the rewritten model has
    them (MACs and parameters)."""
    costs, removed = _cost_models(model, result.plan.removed_classes)
    for metric in metrics:
        cost = costs[metric]
        assert cost.total == getattr(result.report.before, metric)
        assert cost.exact(removed) == getattr(result.report.after, metric), metric


@pytest.mark.parametrize("op", ["Attention", "MultiHeadAttention", "onnx3d", "onnx4d"])
def test_attention_ops_count_their_products(op: str) -> None:
    """QK^T and AV over 4 heads, seq 6, width 16 (com.microsoft Attention: its packed QKV
    projection too); half the heads, half the MACs."""
    from tests.test_attention import _fused_attention_model

    model = _fused_attention_model(op)
    used = {name for n in model.graph.node for name in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]  # ONNX forms leave b_qkv
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    products = 6 * 6 * (16 + 16) + (6 * 16 * 48 if op == "Attention" else 0)
    assert macs_by_node(model)["a4" if op == "onnx4d" else "a"] == products
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert macs_by_node(result.model)["a4" if op == "onnx4d" else "a"] == products // 2
    # 4-D: the rewrite gives each head Reshape its own copy of their shared int64 target,
    # elements the parameter cost model does not foresee
    _check_cost_models(model, result, ("macs",) if op == "onnx4d" else ("macs", "params"))


def test_shapes_after_fused_ops_come_from_their_handlers() -> None:
    """With no shape inference at all (onnx does not infer com.microsoft ops), the handlers'
    own shapes let the output projection and the FFN be placed: heads and FFN width group."""
    model = _fused_block()
    graph = io.import_graph(model)
    assert graph.tensors()["a"].shape is None
    analysis = build_analysis(graph, 17)
    assert {s.node for s in analysis.sources} >= {"attention", "out_proj", "up", "down"}
    open_groups = [g for g in analysis.groups if not g.frozen]
    assert len(open_groups) == 2 and sum(g.heads for g in open_groups) == 1


def test_a_matmul_of_unknown_input_rank_is_counted_and_named() -> None:
    """A layer after an op nobody infers is still a layer: counted in the coverage, its output
    named with the reason (it used to vanish from the count)."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((DIM, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("Mystery", ["x"], ["h"], name="mystery", domain="custom.ops"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, SEQ, DIM])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("custom.ops", 1)])
    analysis = build_analysis(io.import_graph(model), 17)
    assert [(s.node, s.n) for s in analysis.sources] == [("proj", 8)]
    assert any(name == "y" and "rank of its input h is unknown" in reason
               for name, reason in analysis.blocked_tensors)
    assert all(g.frozen for g in analysis.groups)


@pytest.fixture(scope="module")
def exported_bert(tmp_path_factory) -> str:
    """tests/text_models.TinyBert (2 layers, 4 heads, width 64, FFN 256) exported by
    TorchScript, as a file (onnxruntime's optimizer reads a path)."""
    from tests.text_models import export_bert

    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    onnx.save(export_bert(False, hidden=64, heads=4, ffn=256, layers=2), str(path))
    return str(path)


@pytest.fixture(scope="module", params=["BiasGelu", "FastGelu"])
def optimized_bert(request, exported_bert: str) -> onnx.ModelProto:
    """The export fused by onnxruntime's transformer optimizer (model_type='bert'); FastGelu
    where the optimizer is asked for its gelu approximation."""
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("bert")
    options.enable_gelu_approximation = request.param == "FastGelu"
    return optimizer.optimize_model(exported_bert, model_type="bert", num_heads=4,
                                    hidden_size=64, optimization_options=options).model


@pytest.mark.torch_export
def test_optimized_bert_prunes_heads_and_ffn(optimized_bert: onnx.ModelProto) -> None:
    model = optimized_bert
    ops = {n.op_type for n in model.graph.node if n.domain == "com.microsoft"}
    assert ops - {"BiasGelu", "FastGelu"} == {"EmbedLayerNormalization", "Attention",
                                               "SkipLayerNormalization"}
    assert len(ops) == 4
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    report = result.report
    assert report.after.params / report.before.params <= 0.75
    attention = [n for n in result.model.graph.node if n.op_type == "Attention"]
    assert [helper.get_attribute_value(a) for n in attention for a in n.attribute
            if a.name == "num_heads"] == [2, 2]
    widths = sorted(g.channels_after for g in report.groups if not g.frozen and not g.heads)
    assert widths[-2:] == [128, 128]  # both FFN widths, after BiasGelu/FastGelu
    # every MatMul/Gemm is a counted layer; the fused attention's MACs are in the total
    layers = {layer.name for layer in report.layers}
    assert {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")} <= layers
    sizes = {k: tuple(v) for k, v in report.input_sizes["primary"].items()}
    per_node = macs_by_node(model, sizes)
    fused = [per_node.get(n.output[0], 0) for n in model.graph.node if n.op_type == "Attention"]
    assert len(fused) == 2 and min(fused) > 0 and report.before.macs == sum(per_node.values())
    assert report.after.macs <= 0.55 * report.before.macs
