"""onnxruntime's fused transformer ops as its model builder writes them (issue 21):
com.microsoft GroupQueryAttention (KV groups, ``num_heads``/``kv_num_heads`` rewritten), with
its own rotary or after com.microsoft RotaryEmbedding, on separate or packed q|k|v; with a
key/value cache the KV heads stay and query slots prune (``test_gqa_cache`` for genai's form)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import check_pruned, run_outputs

DIM, HEADS, KV, SEQ = 32, 4, 2, 6


def _gqa_model(rotary: str = "none", cache: bool = False) -> onnx.ModelProto:
    """q/k/v projections -> [RotaryEmbedding] -> GroupQueryAttention -> output projection.

    ``rotary``: "none", "fused" (``do_rotary=1``: GQA rotates q and k itself) or "op"
    (com.microsoft RotaryEmbedding on q and k first). onnxruntime's rotary needs head_dim 16.
    """
    rng = np.random.default_rng(0)
    hd = 8 if rotary == "none" else 16

    def init(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * shape[0] ** -0.5).astype(np.float32), name)

    angles = np.arange(16)[:, None] * 0.1 * np.arange(1, hd // 2 + 1)
    inits = [init("w_q", DIM, HEADS * hd), init("w_k", DIM, KV * hd), init("w_v", DIM, KV * hd),
             init("w_o", HEADS * hd, DIM),
             numpy_helper.from_array(np.array([SEQ - 1], np.int32), "seqlens_k"),
             numpy_helper.from_array(np.array(SEQ, np.int32), "total_len"),
             numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
             numpy_helper.from_array(np.arange(SEQ)[None].astype(np.int64), "positions")]
    nodes = [helper.make_node("MatMul", ["x", f"w_{p}"], [p], name=f"proj_{p}") for p in "qkv"]
    q, k, extra, attrs = "q", "k", [], {}
    if rotary == "op":
        nodes += [helper.make_node("RotaryEmbedding", [p, "positions", "cos", "sin"], [f"{p}r"],
                                   name=f"rotary_{p}", domain="com.microsoft", num_heads=n)
                  for p, n in (("q", HEADS), ("k", KV))]
        q, k = "qr", "kr"
    elif rotary == "fused":
        extra, attrs = ["cos", "sin"], {"do_rotary": 1}
    past = ["past_k", "past_v"] if cache else ["", ""]
    nodes += [helper.make_node("GroupQueryAttention",
                               [q, k, "v", *past, "seqlens_k", "total_len", *extra],
                               ["a", "present_k", "present_v"], name="attention",
                               domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV, **attrs),
              helper.make_node("MatMul", ["a", "w_o"], ["y"], name="out_proj")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, DIM])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])]
    if cache:
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV, 0, hd])
                   for n in past]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV, SEQ, hd])
                    for n in ("present_k", "present_v")]
    graph = helper.make_graph(nodes, "gqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _pruned_to_one_kv_group(model: onnx.ModelProto) -> onnx_fpgm.PruneResult:
    """Pruned at 0.5 and oracle-checked: one head group of the KV heads, open."""
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    heads = [g for g in result.analysis.groups if g.heads]
    assert len(heads) == 1 and heads[0].n_channels == KV and not heads[0].frozen
    return result


def _attrs(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    return {n.name: {a.name: a.i for a in n.attribute if a.name.endswith("heads")}
            for n in model.graph.node if n.domain == "com.microsoft"}


@pytest.mark.parametrize("rotary", ["none", "fused", "op"])
def test_group_query_attention_loses_whole_kv_groups(rotary: str) -> None:
    model = _gqa_model(rotary)
    result = _pruned_to_one_kv_group(model)
    assert not np.allclose(run_outputs(model)[0], run_outputs(result.model)[0])
    attrs = _attrs(result.model)
    assert attrs["attention"] == {"num_heads": 2, "kv_num_heads": 1}
    if rotary == "op":
        assert attrs["rotary_q"] == {"num_heads": 2} and attrs["rotary_k"] == {"num_heads": 1}
    hd = 8 if rotary == "none" else 16
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_q"] == [DIM, 2 * hd] and shapes["w_k"] == shapes["w_v"] == [DIM, hd]
    assert shapes["w_o"] == [2 * hd, DIM]


def _packed_gqa_model(rotary: bool) -> onnx.ModelProto:
    """One projection writes q|k|v packed, (B, S, (h + 2 h_kv) * d), into GroupQueryAttention's
    ``query`` with key and value empty, as onnxruntime's model builder packs them."""
    model = _gqa_model("fused" if rotary else "none")
    graph = model.graph
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    packed = np.concatenate([stored["w_q"], stored["w_k"], stored["w_v"]], axis=1)
    keep = [t for t in graph.initializer if t.name not in ("w_q", "w_k", "w_v")]
    del graph.initializer[:]
    graph.initializer.extend([*keep, numpy_helper.from_array(packed, "w_qkv")])
    nodes = [n for n in graph.node if n.op_type != "MatMul" or n.name == "out_proj"]
    gqa = next(n for n in nodes if n.op_type == "GroupQueryAttention")
    gqa.input[0], gqa.input[1], gqa.input[2] = "qkv", "", ""
    del graph.node[:]
    graph.node.extend([helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"], name="proj_qkv"),
                       *nodes])
    return model


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "do_rotary"])
def test_packed_group_query_attention_loses_whole_kv_groups(rotary: bool) -> None:
    model = _packed_gqa_model(rotary)
    result = _pruned_to_one_kv_group(model)
    assert _attrs(result.model)["attention"] == {"num_heads": 2, "kv_num_heads": 1}
    hd = 16 if rotary else 8
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_qkv"] == [DIM, (2 + 2) * hd] and shapes["w_o"] == [2 * hd, DIM]
    kept = next(layer for layer in result.report.layers if layer.name == "proj_qkv").kept
    group = (HEADS // KV + 2) * hd  # the kept group's query heads, K head and V head
    assert len(kept) == group and {k < HEADS * hd for k in kept} == {True, False}
    from onnx_fpgm.measure.bench import macs_by_node

    unpacked = macs_by_node(_gqa_model("fused" if rotary else "none"))["a"]
    assert macs_by_node(model)["a"] == unpacked == SEQ * SEQ * 2 * HEADS * hd
    assert macs_by_node(result.model)["a"] == unpacked // 2


def test_group_query_attention_with_a_cache_keeps_its_kv_heads() -> None:
    """q, k, v separate, a cache: k and v stay whole (the cache's heads), the same query slot
    of both KV groups goes (num_heads 4 -> 2, kv_num_heads 2)."""
    model = _gqa_model(cache=True)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(2, 1, None)]
    assert any(g.frozen and "keeps its KV heads" in g.frozen for g in result.report.groups)
    assert _attrs(result.model)["attention"] == {"num_heads": 2, "kv_num_heads": KV}
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_q"] == [DIM, 2 * 8] and shapes["w_k"] == shapes["w_v"] == [DIM, KV * 8]


def _onnx_attention_gqa(layout: str) -> onnx.ModelProto:
    """ONNX Attention (opset 23) with 4 query heads on 2 KV heads: 3-D q/k/v with
    ``q_num_heads``/``kv_num_heads``, or 4-D (B, h, S, d) q and (B, h_kv, S, d) k, v."""
    rng = np.random.default_rng(1)
    hd = 8

    def init(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * shape[0] ** -0.5).astype(np.float32), name)

    inits = [init("w_q", DIM, HEADS * hd), init("w_k", DIM, KV * hd), init("w_v", DIM, KV * hd),
             init("w_o", HEADS * hd, DIM)]
    nodes = [helper.make_node("MatMul", ["x", f"w_{p}"], [f"{p}3"], name=f"proj_{p}")
             for p in "qkv"]
    attrs, out = {"q_num_heads": HEADS, "kv_num_heads": KV}, "a"
    inputs = ["q3", "k3", "v3"]
    if layout == "4d":
        attrs, out, inputs = {}, "a4", ["q", "k", "v"]
        for p, n in (("q", HEADS), ("k", KV), ("v", KV)):
            inits.append(numpy_helper.from_array(np.array([1, SEQ, n, hd], np.int64), f"{p}_shape"))
            nodes += [helper.make_node("Reshape", [f"{p}3", f"{p}_shape"], [f"{p}r"],
                                       name=f"split_{p}"),
                      helper.make_node("Transpose", [f"{p}r"], [p], name=f"heads_{p}",
                                       perm=[0, 2, 1, 3])]
    nodes.append(helper.make_node("Attention", inputs, [out], name="attention", **attrs))
    if layout == "4d":
        inits.append(numpy_helper.from_array(np.array([1, SEQ, -1], np.int64), "merged"))
        nodes += [helper.make_node("Transpose", ["a4"], ["a4t"], name="merge_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["a4t", "merged"], ["a"], name="merge")]
    nodes.append(helper.make_node("MatMul", ["a", "w_o"], ["y"], name="out_proj"))
    graph = helper.make_graph(
        nodes, "onnx_gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


@pytest.mark.parametrize("layout", ["3d", "4d"])
def test_onnx_attention_with_grouped_query_heads(layout: str) -> None:
    model = _onnx_attention_gqa(layout)
    result = _pruned_to_one_kv_group(model)
    node = next(n for n in result.model.graph.node if n.name == "attention")
    if layout == "3d":
        assert {a.name: a.i for a in node.attribute} == {"q_num_heads": 2, "kv_num_heads": 1}
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_q"] == [DIM, 16] and shapes["w_k"] == shapes["w_v"] == [DIM, 8]


@pytest.mark.parametrize("op", ["BiasGelu", "FastGelu"])
def test_fused_gelu_with_bias_prunes_the_ffn_width(op: str) -> None:
    """``MatMul -> BiasGelu(x, b) -> MatMul`` (onnxruntime's optimizer fuses BERT's FFN so):
    the hidden width prunes with the bias sliced."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w_in", (DIM, DIM)), ("w_up", (DIM, 64)), ("b_up", (64,)),
                          ("w_down", (64, DIM)))]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "w_up"], ["u"], name="up"),
             helper.make_node(op, ["u", "b_up"], ["g"], name="gelu", domain="com.microsoft"),
             helper.make_node("MatMul", ["g", "w_down"], ["d"], name="down"),
             helper.make_node("Add", ["h", "d"], ["y"], name="residual")]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_up"] == [DIM, 32] and shapes["b_up"] == [32] and shapes["w_down"] == [32, DIM]
