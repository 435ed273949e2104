"""Whole attention heads and channel shuffles (issue 10): both torch exporters, the oracle at
three sparsities, heads and MLP widths pruned together, and the forms that still block."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.attention_models import ATTENTION_ZOO
from tests.conftest import check_pruned, run_outputs
from tests.torch_models import ZOO, export_built

EXPORTERS = {"torchscript": dict(dynamo=False, fold_bn=True),
             "dynamo": dict(dynamo=True, fold_bn=False)}
MODELS = {**ATTENTION_ZOO, "vit_like": ZOO["vit_like"], "shufflenet_like": ZOO["shufflenet_like"]}
#: (model, exporter) whose heads still block, with the reason the report must give.
HEADS_BLOCKED: dict[tuple[str, str], str] = {}
CASES = [(n, e) for n in MODELS for e in EXPORTERS]


def _model(name: str, exporter: str) -> onnx.ModelProto:
    return export_built(MODELS[name], **EXPORTERS[exporter])


def _head_groups(result) -> list:
    return [g for g in result.analysis.groups if g.heads]


@pytest.mark.torch_export
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_heads_and_widths_pass_the_oracle(name: str, exporter: str) -> None:
    model = _model(name, exporter)
    original = run_outputs(model)
    for sparsity in (0.25, 0.5, 0.75):
        result = onnx_fpgm.prune(model, sparsity)
        check_pruned(model, result)  # masked original: removed heads' out-projection rows zeroed
        assert result.report.after.params < result.report.before.params
        pruned = run_outputs(result.model)
        assert any(not np.allclose(a, b) for a, b in zip(original, pruned)), \
            "pruning changed nothing: the oracle would be vacuous"
        heads = _head_groups(result)
        if name == "shufflenet_like":  # every shuffled width prunable, no half ever emptied
            assert not heads
            assert all(g.frozen is None or "graph output" in g.frozen
                       for g in result.report.groups)
            continue
        if (name, exporter) in HEADS_BLOCKED:
            assert not any(not g.frozen for g in heads)
            continue
        open_heads = [g for g in heads if not g.frozen]
        assert open_heads, "no attention layer had its heads pruned"
        plans = {p.group_id: p for p in result.plan.groups}
        for group in open_heads:
            n = group.n_channels
            assert plans[group.id].n_keep == max(1, n - round(sparsity * n))


@pytest.mark.torch_export
def test_head_sparsity_sets_heads_apart_from_widths() -> None:
    model = _model("deit_like", "torchscript")
    result = onnx_fpgm.prune(model, 0.5, head_sparsity=0.25)
    check_pruned(model, result)
    plans = {p.group_id: p for p in result.plan.groups}
    heads = [g for g in result.analysis.groups if g.heads and not g.frozen]
    widths = [g for g in result.analysis.groups if not g.heads and not g.frozen]  # + head dims
    assert heads and widths
    assert all(plans[g.id].n_keep == 3 for g in heads)  # 4 heads, one goes
    assert all(plans[g.id].n_keep == g.n_channels // 2 for g in widths)
    # every head group is the qkv producer's 4 heads, each head one class of 3 * head_dim atoms
    produced = np.concatenate([np.arange(s.start, s.start + s.n)
                               for s in result.analysis.sources])
    for group in heads:  # (the score tensors' head atoms, virtual, join their heads too)
        atoms = [np.count_nonzero(result.analysis.class_of_atom[produced] == c)
                 for c in group.classes]
        assert atoms == [3 * 12] * 4
        # the output projection's input rows score the heads too (a member creating nothing)
        assert [p.rsplit("/", 2)[-2] for p in group.producers] == ["qkv", "proj"]


@pytest.mark.torch_export
def test_all_heads_but_one_may_go() -> None:
    result = onnx_fpgm.prune(_model("vit_like", "dynamo"), 0.0, head_sparsity=1.0)
    plans = {p.group_id: p for p in result.plan.groups}
    heads = [g for g in result.analysis.groups if g.heads]
    assert heads and all(plans[g.id].n_keep == 1 for g in heads)
    assert result.report.verification["passed"]


@pytest.mark.torch_export
def test_shuffle_keeps_branches_balanced() -> None:
    """The same offset goes from both halves of every shuffle: each shuffle Reshape stays
    (B, 2, C'/2, H, W) with C' even, and the oracle holds."""
    model = _model("shufflenet_like", "torchscript")
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    after, before = _split_targets(result.model), _split_targets(model)
    assert len(after) == len(before) == 5
    assert all(t[1] == 2 and t[2] > 0 for t in after)
    assert [t[2] for t in after] != [t[2] for t in before]  # the shuffled widths were pruned


def _split_targets(model: onnx.ModelProto) -> list[np.ndarray]:
    """Constant 5-entry Reshape targets (the shuffles' (B, g, C/g, H, W))."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return [values[n.input[1]] for n in model.graph.node
            if n.op_type == "Reshape" and n.input[1] in values and values[n.input[1]].size == 5]


def _fused_attention_model(op: str = "Attention", cache: bool = False) -> onnx.ModelProto:
    """com.microsoft Attention (packed qkv weight) or MultiHeadAttention (three projections),
    with a per-head attention bias (1, h, S, S), between an embedding and an output projection."""
    rng = np.random.default_rng(0)
    dim, heads, seq = 16, 4, 6

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("w_in", dim, dim), init("b_qkv", 3 * dim), init("w_out", dim, dim),
             init("pos_bias", 1, heads, seq, seq)]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="embed")]
    domain, attrs, opset = "com.microsoft", {"num_heads": heads}, 17
    if op == "Attention":
        inits.append(init("w_qkv", dim, 3 * dim))
        inputs = ["h", "w_qkv", "b_qkv", "", "past" if cache else "", "pos_bias"]
    elif op.startswith("onnx"):  # ONNX Attention (opset 23), 3-D or 4-D q/k/v
        domain, opset = "", 23
        inits += [init(f"w_{p}", dim, dim) for p in "qkv"]
        nodes += [helper.make_node("MatMul", ["h", f"w_{p}"], [f"{p}3"], name=f"proj_{p}")
                  for p in "qkv"]
        if op == "onnx3d":
            attrs = {"q_num_heads": heads, "kv_num_heads": heads}
            inputs = ["q3", "k3", "v3", "pos_bias"]
        else:
            attrs = {}
            inits.append(numpy_helper.from_array(
                np.array([1, seq, heads, dim // heads], np.int64), "heads_shape"))
            for p in "qkv":
                nodes += [helper.make_node("Reshape", [f"{p}3", "heads_shape"], [f"{p}r"],
                                           name=f"split_{p}"),
                          helper.make_node("Transpose", [f"{p}r"], [p], name=f"heads_{p}",
                                           perm=[0, 2, 1, 3])]
            inits.append(numpy_helper.from_array(np.array([1, seq, dim], np.int64), "merged"))
            inputs = ["q", "k", "v", "pos_bias"]
    else:
        inits += [init(f"w_{p}", dim, dim) for p in "qkv"]
        nodes += [helper.make_node("MatMul", ["h", f"w_{p}"], [p], name=f"proj_{p}")
                  for p in "qkv"]
        inputs = ["q", "k", "v", "b_qkv", "", "pos_bias"]
    attention_op = "Attention" if op.startswith("onnx") else op
    out = "a"
    if op == "onnx4d":
        out = "a4"
        nodes += [helper.make_node("Transpose", ["a4"], ["a4t"], name="merge_t", perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["a4t", "merged"], ["a"], name="merge")]
    nodes = [*nodes[:len(nodes) - (2 if op == "onnx4d" else 0)],
             helper.make_node(attention_op, inputs, [out], name="attention", domain=domain,
                              **attrs),
             *nodes[len(nodes) - (2 if op == "onnx4d" else 0):],
             helper.make_node("MatMul", ["a", "w_out"], ["y"], name="out_proj")]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])]
    if cache:
        graph_inputs.append(helper.make_tensor_value_info(
            "past", TensorProto.FLOAT, [2, 1, heads, 0, dim // heads]))
    graph = helper.make_graph(
        nodes, "fused_attention", graph_inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=10 if opset >= 23 else 8)


def _num_heads(model: onnx.ModelProto) -> int:
    node = next(n for n in model.graph.node if n.name == "attention")
    return next((a.i for a in node.attribute if a.name in ("num_heads", "q_num_heads")),
                0)


@pytest.mark.parametrize("op", ["Attention", "MultiHeadAttention", "onnx3d", "onnx4d"])
def test_fused_attention_loses_whole_heads(op: str) -> None:
    """num_heads rewritten, packed Q/K/V columns and the per-head bias sliced; the oracle zeroes
    the removed heads' rows of the output projection."""
    model = _fused_attention_model(op)
    for sparsity, heads in ((0.25, 3), (0.5, 2), (0.75, 1)):
        result = onnx_fpgm.prune(model, sparsity)
        check_pruned(model, result)
        if op != "onnx4d":  # 4-D q/k/v carry the head count in their shapes
            assert _num_heads(result.model) == heads
        assert [g.channels_after for g in result.report.groups if g.heads] == [heads]
        bias = {t.name: t for t in result.model.graph.initializer}
        assert any(list(t.dims) == [1, heads, 6, 6] for t in bias.values())


def test_fused_attention_with_a_cache_blocks_with_a_reason() -> None:
    model = _fused_attention_model("Attention", cache=True)
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert not any(g.heads and not g.frozen for g in result.report.groups)
    assert any(g.frozen and "key/value cache" in g.frozen for g in result.report.groups)
    assert _num_heads(result.model) == 4


def test_cli_head_sparsity(tmp_path) -> None:
    """--head-sparsity reaches the plan through the CLI; a bad value is a usage error (exit 2)."""
    from onnx_fpgm.cli import main as cli

    source, target = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(_fused_attention_model("onnx3d"), source)
    assert cli.main([str(source), str(target), "--sparsity", "0.5", "--head-sparsity", "0.25",
                     "--quiet"]) == 0
    assert _num_heads(onnx.load(target)) == 3
    assert cli.main([str(source), str(target), "--head-sparsity", "1.5"]) == 2
