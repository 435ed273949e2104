"""A softmax scale computed from a Shape of q (optimum's BERT, ``nn.MultiheadAttention`` under
TorchScript): a constant of the original when the sizes it reads are static, so the rewrite
feeds its original value and q/k head dims prune; a scale reading a symbolic size keeps them
whole, with the reason. Every prune checked by the oracle (the masked original computes the
scale from its own shape)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.attention_models import build_mha_vit_like
from tests.conftest import check_pruned
from tests.test_head_dims import scores_to_output
from tests.torch_models import export_onnx


def _attention(read: str, heads: int = 2, head_dim: int = 8) -> onnx.ModelProto:
    """One attention layer on a (batch, seq, 6) input, the scale computed from ``Shape(q)``:
    ``read="head_dim"``: ``1/sqrt(q.shape[-1])`` (Gather -> Cast -> Sqrt -> Reciprocal), as
    optimum's BERT export writes it; ``read="seq"``: ``1/sqrt(seq * head_dim)`` (Slice [2:4]
    -> ReduceProd), which depends on the sequence length."""
    rng = np.random.default_rng(heads * 10 + head_dim)
    dim = heads * head_dim

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    inits = [init("w_in", 6, dim), *(init(f"w_{p}", dim, dim) for p in "qkvo"),
             ints("split", [0, 0, heads, head_dim]), ints("merge", [0, 0, dim]),
             ints("last", -1), ints("lo", [2]), ints("hi", [4])]
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h"], name="embed")]
    for p, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("MatMul", ["h", f"w_{p}"], [f"{p}0"], name=f"proj_{p}"),
                  helper.make_node("Reshape", [f"{p}0", "split"], [f"{p}1"], name=f"split_{p}"),
                  helper.make_node("Transpose", [f"{p}1"], [p], name=f"heads_{p}", perm=perm)]
    nodes.append(helper.make_node("Shape", ["q"], ["q_shape"], name="q_shape"))
    if read == "head_dim":
        nodes.append(helper.make_node("Gather", ["q_shape", "last"], ["size"], name="size"))
    else:
        nodes += [helper.make_node("Slice", ["q_shape", "lo", "hi"], ["sizes"], name="sizes"),
                  helper.make_node("ReduceProd", ["sizes"], ["size"], name="size", keepdims=0)]
    nodes += [helper.make_node("Cast", ["size"], ["size_f"], name="size_f", to=TensorProto.FLOAT),
              helper.make_node("Sqrt", ["size_f"], ["root"], name="root"),
              helper.make_node("Reciprocal", ["root"], ["scale"], name="scale"),
              *scores_to_output()]
    graph = helper.make_graph(
        nodes, "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _dim_plans(result):
    plans = {p.group_id: p for p in result.plan.groups}
    return [(plans[g.id].n_keep, g.n_channels, g.frozen)
            for g in result.analysis.groups if g.dims]


def test_static_scale_is_fed_its_original_value_and_qk_dims_prune() -> None:
    model = _attention("head_dim")
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert sorted(_dim_plans(result)) == [(4, 8, None), (4, 8, None)]  # q/k, v
    ops = {n.op_type for n in result.model.graph.node}
    assert "Shape" not in ops and "Sqrt" not in ops  # the chain gave way to its value
    scaled = next(n for n in result.model.graph.node if n.name == "scaled")
    value = next(numpy_helper.to_array(t) for t in result.model.graph.initializer
                 if t.name == scaled.input[1])
    assert value.dtype == np.float32 and float(value) == np.float32(1 / np.sqrt(np.float32(8)))


def test_scale_reading_a_symbolic_size_keeps_qk_dims() -> None:
    model = _attention("seq")
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    plans = _dim_plans(result)
    qk = [p for p in plans if p[2] is not None]
    assert len(qk) == 1 and qk[0][0] == 8 and "reads seq" in qk[0][2], plans
    assert [p[:2] for p in plans if p[2] is None] == [(4, 8)]  # v still prunes
    assert "Shape" in {n.op_type for n in result.model.graph.node}


def test_keep_head_dims_leaves_the_computed_scale() -> None:
    model = _attention("head_dim")
    result = onnx_fpgm.prune(model, 0.5, keep_head_dims=True)
    check_pruned(model, result)
    assert all(p[0] == p[1] for p in _dim_plans(result))
    assert "Shape" in {n.op_type for n in result.model.graph.node}


@pytest.mark.torch_export
@pytest.mark.parametrize("dynamo", [False, True], ids=["ts", "dynamo"])
def test_multihead_attention_head_dims_prune(dynamo: bool) -> None:
    """nn.MultiheadAttention: TorchScript computes the scale from a Shape of q, the dynamo
    exporter stores it; both now lose head dims (q, k and v tied by the packed in-projection)."""
    module, shape = build_mha_vit_like()
    model = export_onnx(module, shape, dynamo=dynamo)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    plans = _dim_plans(result)
    assert plans and all(p == (4, 8, None) for p in plans), plans
    assert bool(result.analysis.computed_scales) is not dynamo


@pytest.mark.torch_export
def test_llama_sdpa_torchscript_qk_dims_prune() -> None:
    """A llama on ``scaled_dot_product_attention`` under TorchScript (static sizes): its scale
    from ``Shape(q)`` is fed the original value, and q/k's rotary pairs prune with v's dims."""
    from tests.llama_models import build_llama_like, export_llama

    model = export_llama(build_llama_like(sdpa=True), False)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert len(result.analysis.computed_scales) == 2  # one per layer
    assert sorted(_dim_plans(result)) == [(2, 4, None)] * 2 + [(4, 8, None)] * 2
