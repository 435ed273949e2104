"""com.microsoft GroupQueryAttention with a KV cache, laid out as onnxruntime-genai's model
builder writes it (issue 21): packed q|k|v, its own rotary, ``seqlens_k`` and
``total_sequence_length`` computed from the attention mask, past/present caches of a symbolic
past length and a symbolic head size (``kv_cache_dim``). The sizes come from the op (past 0 and
> 0, the head size fixed); the KV heads stay (the cache is the interface) and the same query
slots go from every KV group (``num_heads`` rewritten, ``kv_num_heads`` kept)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import check_pruned

DIM, HEADS, KV, HD = 32, 4, 2, 16  # onnxruntime's rotary needs head_dim 16


def _genai_like_gqa() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * shape[0] ** -0.5).astype(np.float32), name)

    angles = np.arange(64)[:, None] * 0.1 * np.arange(1, HD // 2 + 1)
    inits = [init("w_qkv", DIM, (HEADS + 2 * KV) * HD), init("w_o", HEADS * HD, DIM),
             numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(1, np.int64), "index_1")]
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"], name="qkv_proj"),
        helper.make_node("ReduceSum", ["attention_mask", "axis_1"], ["mask_sum"],
                         name="mask_sum", keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["seqlens_i64"], name="seqlens_sub"),
        helper.make_node("Cast", ["seqlens_i64"], ["seqlens_k"], name="seqlens_cast",
                         to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="mask_shape"),
        helper.make_node("Gather", ["mask_shape", "index_1"], ["total_i64"], name="total_gather",
                         axis=0),
        helper.make_node("Cast", ["total_i64"], ["total_len"], name="total_cast",
                         to=TensorProto.INT32),
        helper.make_node("GroupQueryAttention",
                         ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_len",
                          "cos_cache", "sin_cache"],
                         ["attn", "present_key", "present_value"], name="attention",
                         domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV, do_rotary=1),
        helper.make_node("MatMul", ["attn", "w_o"], ["y"], name="o_proj")]
    cache = ["batch", KV, "past_sequence_length", "kv_cache_dim"]
    present = ["batch", KV, "total_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", DIM]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", "total_sequence_length"]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", DIM]),
               helper.make_tensor_value_info("present_key", TensorProto.FLOAT, present),
               helper.make_tensor_value_info("present_value", TensorProto.FLOAT, present)]
    graph = helper.make_graph(nodes, "gqa_cache", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def test_cache_sizes_come_from_the_op() -> None:
    """The past length is 0 and then > 0 (the cache is read by the fused op, not joined by a
    Concat); ``kv_cache_dim`` is the op's head size, not a size to search for."""
    from onnx_fpgm.oracle.cache_inputs import cache_head_sizes, past_axes

    model = _genai_like_gqa()
    assert past_axes(model) == {("past_key", 2), ("past_value", 2)}
    assert cache_head_sizes(model) == {("past_key", 3): HD, ("past_value", 3): HD}


def test_query_slots_prune_kv_heads_stay() -> None:
    model = _genai_like_gqa()
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    sizes = result.report.input_sizes
    pasts = [sizes[key]["past_key"] for key in ("primary", "secondary")]
    assert pasts[0][2:] == [0, HD] and pasts[1][2] > 0 and pasts[1][3] == HD
    heads = [g for g in result.report.groups if g.heads]
    # 2 query slots per KV group, each slot one atom across both groups: 2 -> 1
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(2, 1, None)]
    kv = [g for g in result.report.groups if g.frozen and "keeps its KV heads" in g.frozen]
    assert len(kv) == 1
    gqa = next(n for n in result.model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: a.i for a in gqa.attribute if a.name.endswith("heads")}
    assert attrs == {"num_heads": 2, "kv_num_heads": KV}
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_qkv"] == [DIM, (2 + 2 * KV) * HD] and shapes["w_o"] == [2 * HD, DIM]
    kept = next(layer for layer in result.report.layers if layer.name == "qkv_proj").kept
    slot = [h * HD + np.arange(HD) for h in range(HEADS)]  # query head g * 2 + s
    kept_q = sorted(k for k in kept if k < HEADS * HD)
    # the same slot from both groups: heads (0, s) and (1, s) = s and 2 + s
    assert kept_q in (sorted([*slot[0], *slot[2]]), sorted([*slot[1], *slot[3]]))
    assert [k for k in kept if k >= HEADS * HD] == list(range(HEADS * HD, (HEADS + 2 * KV) * HD))
