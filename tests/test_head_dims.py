"""Head dims (issue 21, Torch-Pruning's ``prune_head_dims``): within each kept head, the same
``--sparsity`` of ``head_dim`` goes from every head of a layer (q and k the same dims, v with the
output projection's rows), on top of whole heads; the oracle re-checked on each form, and the
forms that keep them whole say why."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnx_fpgm
from tests.attention_models import build_deit_like, build_separate_qkv_like
from tests.conftest import check_pruned
from tests.llama_models import build_llama_like, export_llama, repeat_kv
from tests.torch_models import export_onnx


class _GQABlock(nn.Module):
    """Grouped-query attention without rotary: 4 query heads on 2 KV heads (repeat_kv), head_dim
    8, a constant softmax scale, then an MLP (the block of a llama with ALiBi/NoPE)."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.d, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(heads * self.d, dim, bias=False)
        self.embed = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.h, self.d).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv, self.d).transpose(1, 2)
        k, v = repeat_kv(k, self.h // self.kv), repeat_kv(v, self.h // self.kv)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.d ** -0.5
        out = torch.matmul(scores.softmax(-1), v).transpose(1, 2).reshape(b, s, -1)
        return self.head(x + self.o_proj(out))


def _build_gqa(seed: int = 0):
    torch.manual_seed(seed)
    return _GQABlock().eval(), (1, 6, 32)


#: name -> (builder, head_dim, whether q/k dims prune too)
MODELS = {"bert_like": (build_separate_qkv_like, 8, True),  # separate q/k/v, additive mask
          "vit_like": (build_deit_like, 12, True),  # packed qkv (DeiT): q, k, v share dims
          "gqa": (_build_gqa, 8, True)}
CASES = [(m, d) for m in MODELS for d in (False, True)]


@functools.cache
def _export(name: str, dynamo: bool) -> bytes:
    module, shape = MODELS[name][0]()
    return export_onnx(module, shape, dynamo=dynamo, fold_bn=not dynamo).SerializeToString()


def _dim_groups(result):
    return [g for g in result.analysis.groups if g.dims]


def _head_dims_after(model: onnx.ModelProto) -> list[int]:
    """The last dim of every 4-D or 5-D Reshape output (``(b, s, [3,] heads, head_dim)``)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    return sorted({shapes[n.output[0]][-1] for n in model.graph.node
                   if n.op_type == "Reshape" and len(shapes.get(n.output[0], [])) in (4, 5)})


@pytest.mark.torch_export
@pytest.mark.parametrize("name,dynamo", CASES, ids=[f"{m}-{'dynamo' if d else 'ts'}"
                                                    for m, d in CASES])
def test_head_dims_go_within_kept_heads(name: str, dynamo: bool) -> None:
    model = onnx.load_from_string(_export(name, dynamo))
    _, head_dim, _ = MODELS[name]
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)  # masked original: q @ k^T reads masked q/k, o_proj rows zeroed
    open_dims = [g for g in _dim_groups(result) if not g.frozen]
    assert open_dims, [g.frozen for g in _dim_groups(result)]
    plans = {p.group_id: p for p in result.plan.groups}
    for group in open_dims:
        assert plans[group.id].n_keep == group.n_channels // 2 == head_dim // 2
    assert head_dim // 2 in _head_dims_after(result.model)
    heads = [g for g in result.analysis.groups if g.heads and not g.frozen]
    assert heads and all(plans[g.id].n_keep < g.n_channels for g in heads)
    kept = onnx_fpgm.prune(model, 0.5, keep_head_dims=True)
    assert all(g.frozen == "head dims kept (keep_head_dims)" for g in kept.report.groups
               if kept.analysis.groups[g.id].dims)
    assert result.report.after.params < kept.report.after.params
    assert head_dim in _head_dims_after(kept.model)


@pytest.mark.torch_export
def test_gqa_query_heads_keep_the_dims_of_their_kv_head() -> None:
    """One Q/K group spans the query heads and the KV heads (through repeat_kv's copies), one
    V group the v heads and their copies; the kept dims are the same in q and k."""
    model = onnx.load_from_string(_export("gqa", False))
    result = onnx_fpgm.prune(model, 0.5, head_sparsity=0.0)
    check_pruned(model, result)
    groups = _dim_groups(result)
    producers = sorted(tuple(sorted(p.rsplit("/", 2)[-2] for p in g.producers)) for g in groups)
    assert producers == [("k_proj", "q_proj"), ("o_proj", "v_proj")]
    kept = {layer.name.rsplit("/", 2)[-2]: np.array(layer.kept)
            for layer in result.report.layers if "proj" in layer.name}
    assert len(kept["q_proj"]) == 4 * 4 and len(kept["k_proj"]) == 2 * 4
    q_dims = {tuple(kept["q_proj"][i * 4:(i + 1) * 4] % 8) for i in range(4)}
    k_dims = {tuple(kept["k_proj"][i * 4:(i + 1) * 4] % 8) for i in range(2)}
    assert len(q_dims) == 1 and q_dims == k_dims


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo,positions", [(False, False), (True, False), (False, True)],
                         ids=["ts", "dynamo", "ts-positions"])
def test_rotary_llama_prunes_qk_dims_in_pairs(dynamo: bool, positions: bool) -> None:
    """Rotary ties dim j of q/k with j + d/2 (``q * cos + rotate_half(q) * sin``): q/k dims go
    in pairs, cos/sin are read on the kept dims (a Gather where they are computed, from
    position ids or not), rotate_half's Slice bounds move; v's dims go with o_proj's rows."""
    model = export_llama(build_llama_like(with_positions=positions), dynamo)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    groups = _dim_groups(result)
    qk = [g for g in groups if all(result.analysis.members[m].creates for m in g.members)]
    v = [g for g in groups if g not in qk]
    assert len(qk) == len(v) == 2 and not any(g.frozen for g in groups)
    plans = {p.group_id: p for p in result.plan.groups}
    assert all(g.n_channels == 4 and plans[g.id].n_keep == 2 for g in qk)  # 4 pairs of 8
    assert all(g.n_channels == 8 and plans[g.id].n_keep == 4 for g in v)
    assert _head_dims_after(result.model) == [4]


# nn.MultiheadAttention's scale computed from a Shape of q: tests/test_computed_scale.py


def scores_to_output() -> list[onnx.NodeProto]:
    """``q @ k`` scaled by ``scale``, softmax, ``@ v``, heads merged by the ``merge`` target,
    the output projection ``w_o`` to ``y``: the attention after its q/k/v heads."""
    return [helper.make_node("MatMul", ["q", "k"], ["s0"], name="scores"),
            helper.make_node("Mul", ["s0", "scale"], ["s1"], name="scaled"),
            helper.make_node("Softmax", ["s1"], ["p"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["c0"], name="context"),
            helper.make_node("Transpose", ["c0"], ["c1"], name="merge_t", perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["c1", "merge"], ["c2"], name="merge_r"),
            helper.make_node("MatMul", ["c2", "w_o"], ["y"], name="proj_o")]


def _helper_attention(heads: int, head_dim: int, seq: int = 5) -> onnx.ModelProto:
    """One attention layer as onnx.helper writes it: separate q/k/v MatMuls with biases,
    Reshape (1, s, h, d), k transposed by a Transpose, a constant scale Mul."""
    rng = np.random.default_rng(heads * 10 + head_dim)
    dim = heads * head_dim

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [init("w_in", 6, dim), *(init(f"w_{p}", dim, dim) for p in "qkvo"),
             *(init(f"b_{p}", dim) for p in "qkv"),
             numpy_helper.from_array(np.array([1, seq, heads, head_dim], np.int64), "split"),
             numpy_helper.from_array(np.array([1, seq, dim], np.int64), "merge"),
             numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="embed")]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["h", f"w_{p}"], [f"{p}0"], name=f"proj_{p}"),
                  helper.make_node("Add", [f"{p}0", f"b_{p}"], [f"{p}1"], name=f"bias_{p}"),
                  helper.make_node("Reshape", [f"{p}1", "split"], [f"{p}2"], name=f"split_{p}"),
                  helper.make_node("Transpose", [f"{p}2"], [p], name=f"heads_{p}", perm=perm)]
    nodes += scores_to_output()
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("heads,head_dim,sparsity", [(2, 8, 0.5), (4, 6, 0.5), (3, 4, 0.25),
                                                     (2, 8, 0.75)])
def test_helper_attention_head_dims(heads: int, head_dim: int, sparsity: float) -> None:
    model = _helper_attention(heads, head_dim)
    result = onnx_fpgm.prune(model, sparsity)
    check_pruned(model, result)
    plans = {p.group_id: p for p in result.plan.groups}
    dims = [g for g in _dim_groups(result) if not g.frozen]
    assert len(dims) == 2  # q/k, v
    keep = max(1, head_dim - round(sparsity * head_dim))
    assert all(plans[g.id].n_keep == keep for g in dims)
    heads_kept = max(1, heads - round(sparsity * heads))
    split = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                 if t.name == "split")
    assert split.tolist() == [1, 5, heads_kept, keep]


def test_saved_plan_reapplies_head_dims(tmp_path) -> None:
    """A report's kept channels hold head dims too: re-applied as a plan (``--plan``), they
    give the same model (whole heads and head dims told apart from the channels kept)."""
    model = _helper_attention(4, 6)
    first = onnx_fpgm.prune(model, 0.5)
    path = tmp_path / "plan.json"
    path.write_text(first.report.to_json())
    again = onnx_fpgm.prune(model, plan=str(path))
    check_pruned(model, again)
    assert np.array_equal(again.plan.removed_classes, first.plan.removed_classes)
    weights = [{t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
               for r in (first, again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_cli_keep_head_dims(tmp_path, capsys) -> None:
    from onnx_fpgm.cli import main as cli

    path = tmp_path / "in.onnx"
    onnx.save(_helper_attention(2, 8), path)
    sizes = {}
    for flags in ([], ["--keep-head-dims"]):
        out = tmp_path / f"out{len(flags)}.onnx"
        assert cli.main([str(path), str(out), "-q", *flags]) == 0
        split = next(numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer
                     if t.name == "split")
        sizes[bool(flags)] = int(split[-1])
    capsys.readouterr()
    assert sizes == {False: 4, True: 8}
