"""Llama-like decoders as the torch exporters write them (issue 21): rotary through the head
split, grouped-query attention (a KV group is one atom), SwiGLU, decomposed RMSNorm; both
exporters, no flag but the sparsity, the oracle re-checked."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from tests.conftest import check_pruned
from tests.llama_models import build_llama_like, export_llama

#: variant -> LlamaLike options: eager attention with constant cos/sin, cos/sin computed from a
#: position_ids input, torch's scaled_dot_product_attention.
VARIANTS = {"eager": {}, "positions": {"with_positions": True}, "sdpa": {"sdpa": True},
            "qk_norm": {"qk_norm": True}}
#: exporter -> (dynamo, symbolic batch and sequence)
EXPORTERS = {"torchscript": (False, False), "dynamo": (True, False),
             "dynamo-dynamic": (True, True), "torchscript-dynamic": (False, True)}
CASES = [(v, e) for v in VARIANTS for e in EXPORTERS]
#: (variant, exporter) whose heads still block, with what the reason says. (onnxscript's SDPA
#: with a symbolic sequence flattens K to (-1, S, d) and back with the head count read by Shape
#: from K itself: that count follows the plan, ``deps/symbolic_sizes``, so its KV groups prune.)
#: TorchScript with a symbolic sequence reads the KV head count back by Shape for repeat_kv's
#: expand (through Where), so its KV heads stay and its query slots are followed; they then
#: meet the causal mask, whose shape (computed by Slice) onnx leaves unknown, at the scores'
#: Add: the slots stay whole there.
HEADS_BLOCKED = {(v, "torchscript-dynamic"): "cannot be pruned at Add" for v in VARIANTS}
HEAD_DIM, N_REP = 8, 2  # dim 32, 4 query heads, 2 KV heads


@functools.cache
def _export(variant: str, exporter: str) -> bytes:
    module = build_llama_like(**VARIANTS[variant])
    dynamo, dynamic = EXPORTERS[exporter]
    return export_llama(module, dynamo, dynamic=dynamic).SerializeToString()


def _model(variant: str, exporter: str) -> onnx.ModelProto:
    return onnx.load_from_string(_export(variant, exporter))


def _class_sizes(analysis, group) -> list[int]:
    """Filter atoms per class of ``group`` (repeat_kv's copies, which have no filters, aside)."""
    produced = np.zeros(analysis.n_atoms, dtype=bool)
    for source in analysis.sources:
        produced[source.start:source.start + source.n] = True
    return [np.count_nonzero((analysis.class_of_atom == c) & produced) for c in group.classes]


def _weight_shapes(model: onnx.ModelProto) -> list[tuple[int, int]]:
    """(K, N) of every MatMul with a stored weight (every Linear here), sorted."""
    stored = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return sorted(stored[n.input[1]] for n in model.graph.node
                  if n.op_type == "MatMul" and n.input[1] in stored)


@pytest.mark.torch_export
@pytest.mark.parametrize("variant,exporter", CASES, ids=[f"{v}-{e}" for v, e in CASES])
def test_kv_groups_and_mlp_widths_prune(variant: str, exporter: str) -> None:
    model = _model(variant, exporter)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    reasons = [g.frozen for g in result.report.groups if g.frozen] + \
        [r for _, r in result.analysis.blocked_tensors]
    assert not any("could not analyse" in r for r in reasons), reasons
    heads = [g for g in result.analysis.groups if g.heads]
    if (variant, exporter) in HEADS_BLOCKED:
        # heads stay whole: with the reason when the split is seen (which depends on whether
        # the second size set varies the sequence), in any case only the MLP widths prune
        assert all(HEADS_BLOCKED[variant, exporter] in g.frozen for g in heads)
        mlp = [g for g in result.analysis.groups if not g.frozen]
        assert len(mlp) == 2 and all(g.n_channels == 64 for g in mlp)  # the MLP widths prune
        return
    assert len(heads) == 2 and not any(g.frozen for g in heads)  # one per layer, all open
    analysis = result.analysis
    for group in heads:  # one class per KV group: its 2 query heads, its K and its V head
        assert group.n_channels == 2
        assert _class_sizes(analysis, group) == [(N_REP + 2) * HEAD_DIM] * 2
    plans = {p.group_id: p for p in result.plan.groups}
    assert all(plans[g.id].n_keep == 1 for g in heads)
    # per layer q, k, v keep one KV group (16, 8, 8 columns), o reads 16 rows, gate/up/down
    # keep half the MLP width; the LM head stays. Each kept head also loses half its head_dim
    # (tests/test_head_dims.py) where every form lets it: q, k, v and o halve again.
    dims = [g for g in analysis.groups if g.dims and not g.frozen]
    creating = [all(analysis.members[m].creates for m in g.members) for g in dims]
    qk, vo = 2 if any(creating) else 1, 2 if not all(creating) else 1  # q/k: two producers
    layer = [(32, 16 // qk), (32, 8 // qk), (32, 8 // vo), (16 // vo, 32), (32, 32), (32, 32),
             (32, 32)]
    assert _weight_shapes(result.model) == sorted([*layer, *layer, (32, 16)])
    before = result.report.before.params
    assert result.report.after.params < 0.6 * before


@pytest.mark.torch_export
@pytest.mark.parametrize("exporter", [e for e in EXPORTERS if ("positions", e) not in
                                      HEADS_BLOCKED])
def test_head_sparsity_counts_kv_groups(exporter: str) -> None:
    """--head-sparsity takes whole KV groups: 0.5 of 2 groups leaves 1 (2 query heads)."""
    model = _model("positions", exporter)
    result = onnx_fpgm.prune(model, 0.0, head_sparsity=0.5)
    check_pruned(model, result)
    plans = {p.group_id: p for p in result.plan.groups}
    heads = [g for g in result.analysis.groups if g.heads]
    assert heads and all(plans[g.id].n_keep == 1 and g.n_channels == 2 for g in heads)
    assert all(plans[g.id].n_keep == g.n_channels
               for g in result.analysis.groups if not g.heads)


@pytest.mark.torch_export
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_four_query_heads_per_kv_group(exporter: str) -> None:
    """8 query heads on 2 KV heads (repeat_kv by 4), a longer sequence: TorchScript leaves the
    shapes after its Where-computed expand shapes unknown, the Expand handler finds them."""
    module = build_llama_like(vocab=16, dim=64, heads=8, kv_heads=2, hidden=96, seq=16)
    model = export_llama(module, exporter == "dynamo", seq=16)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    heads = [g for g in result.analysis.groups if g.heads]
    assert len(heads) == 2 and not any(g.frozen for g in heads)
    for group in heads:
        assert _class_sizes(result.analysis, group) == [(4 + 2) * 8] * 2


# --- RMSNorm as fused ops and as torch decomposes it, around an MLP -----------------------------

NORMS = ["decomposed", "RMSNormalization", "SkipSimplifiedLayerNormalization",
         "SkipLayerNormalization"]


def _norm_block(norm: str) -> onnx.ModelProto:
    """``h = x @ W0`` (our residual), ``y = norm(h [+ r])``, SwiGLU MLP on y, ``out = h + mlp``.

    The residual's channels are ours (a MatMul makes them), so only the norm keeps them whole."""
    rng = np.random.default_rng(0)
    dim, hidden, seq = 16, 32, 4

    def init(name, *shape, scale=None):
        scale = shape[0] ** -0.5 if scale is None else scale
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [init("w0", dim, dim), init("gamma", dim, scale=1.0), init("beta", dim, scale=0.1),
             init("w_gate", dim, hidden), init("w_up", dim, hidden), init("w_down", hidden, dim)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="embed")]
    residual, opset, domain = "h", 17, []
    if norm == "decomposed":
        inits += [numpy_helper.from_array(np.array(v, np.float32), n)
                  for n, v in (("two", 2.0), ("eps", 1e-6), ("one", 1.0))]
        nodes += [helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
                  helper.make_node("ReduceMean", ["sq"], ["ms"], name="mean", axes=[-1]),
                  helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
                  helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt"),
                  helper.make_node("Div", ["one", "rms"], ["inv"], name="inv"),
                  helper.make_node("Mul", ["h", "inv"], ["hn"], name="scale"),
                  helper.make_node("Mul", ["hn", "gamma"], ["y"], name="weight")]
    elif norm == "RMSNormalization":
        opset = 23
        nodes.append(helper.make_node(norm, ["h", "gamma"], ["y"], name="norm", epsilon=1e-6))
    else:  # onnxruntime's fused residual + norm: output 3 is the residual sum
        domain = [helper.make_opsetid("com.microsoft", 1)]
        extra = ["beta"] if norm == "SkipLayerNormalization" else []
        nodes += [helper.make_node("Relu", ["x"], ["r"], name="skip_branch"),
                  helper.make_node(norm, ["h", "r", "gamma", *extra], ["y", "", "", "hs"],
                                   name="norm", domain="com.microsoft", epsilon=1e-6)]
        residual = "hs"
    nodes += [helper.make_node("MatMul", ["y", "w_gate"], ["g"], name="gate"),
              helper.make_node("Sigmoid", ["g"], ["gs"], name="sig"),
              helper.make_node("Mul", ["g", "gs"], ["silu"], name="silu"),
              helper.make_node("MatMul", ["y", "w_up"], ["u"], name="up"),
              helper.make_node("Mul", ["silu", "u"], ["gu"], name="glu"),
              helper.make_node("MatMul", ["gu", "w_down"], ["d"], name="down"),
              helper.make_node("Add", [residual, "d"], ["out"], name="residual")]
    graph = helper.make_graph(
        nodes, "rms_block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, seq, dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *domain],
                             ir_version=10 if opset >= 23 else 8)


@pytest.mark.parametrize("norm", NORMS)
def test_rms_norm_keeps_the_residual_whole_and_the_mlp_prunes(norm: str) -> None:
    model = _norm_block(norm)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    groups = {tuple(g.producers): g for g in result.report.groups}
    mlp = groups[("gate", "up")]
    assert (mlp.frozen, mlp.channels_before, mlp.channels_after) == (None, 32, 16)
    residual = next(g for g in result.report.groups if "embed" in g.producers)
    assert residual.frozen and ("normalises over the channel axis" in residual.frozen or
                                "reduces over the channel axis" in residual.frozen)
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert shapes["w_gate"] == shapes["w_up"] == [16, 16] and shapes["w_down"] == [16, 16]
    assert shapes["w0"] == [16, 16]


def test_default_domain_simplified_layer_norm_is_analysed_like_rms_norm() -> None:
    """onnxruntime's own tools write SimplifiedLayerNormalization in the default domain (which
    onnx.checker does not know): the analysis treats it as RMSNorm over the last axis."""
    import onnx_graphsurgeon as gs

    from onnx_fpgm.deps.analysis import build_analysis

    model = _norm_block("RMSNormalization")
    for node in model.graph.node:
        if node.op_type == "RMSNormalization":
            node.op_type = "SimplifiedLayerNormalization"
    model.opset_import[0].version = 17
    model.graph.value_info.append(helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                [1, 4, 16]))  # as ORT infers
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model))
    analysis = build_analysis(graph.toposort(), 17)
    frozen = {tuple(g.producers): g.frozen for g in analysis.groups}
    assert frozen[("gate", "up")] is None
    assert "SimplifiedLayerNormalization norm normalises over the channel axis" in \
        frozen[next(p for p in frozen if "embed" in p)]


@pytest.mark.parametrize("width_element", ["same", "one"])
def test_expand_of_plain_channels_over_a_new_axis(width_element: str) -> None:
    """``Expand`` of channels (last axis) over a new axis: the shape's channel element (the
    width, rewritten to the surviving count, or 1, which follows by itself) and the rest."""
    rng = np.random.default_rng(3)
    width = 16 if width_element == "same" else 1
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 8)))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("axis1", [1]), ("target", [1, 3, 4, width]))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="up"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Unsqueeze", ["r", "axis1"], ["u"], name="unsqueeze"),
             helper.make_node("Expand", ["u", "target"], ["e"], name="expand"),
             helper.make_node("ReduceSum", ["e", "axis1"], ["s"], name="sum", keepdims=0),
             helper.make_node("MatMul", ["s", "w2"], ["y"], name="down")]
    graph = helper.make_graph(
        nodes, "expand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert list(stored["w1"].shape) == [8, 8] and list(stored["w2"].shape) == [8, 8]
    assert stored["target"].tolist() == [1, 3, 4, 8 if width_element == "same" else 1]



#: form -> (LlamaLike options, head groups' channels, kept): Phi-3's rotary
#: ``cat(rotary(x[..., :d]), x[..., d:])`` with ``d = cos.shape[-1]`` (the pass-through part is
#: empty: it joins nothing, the KV groups prune); multi-query attention (Gemma-2B, Falcon): one
#: KV head, its ``view(b, s, 1, d)`` a split with one head that repeat_kv copies to every query
#: head, whose slots prune.
OPEN_HEADS = {"phi3_rotary_pass": ({"rotary_pass": True}, 2, 1),
              "multi_query": ({"kv_heads": 1}, 4, 2)}
OPEN_CASES = [(f, e) for f in OPEN_HEADS for e in ("torchscript", "dynamo", "dynamo-dynamic")]


@pytest.mark.torch_export
@pytest.mark.parametrize("form,exporter", OPEN_CASES, ids=[f"{f}-{e}" for f, e in OPEN_CASES])
def test_decoder_forms_keep_head_groups_open(form: str, exporter: str) -> None:
    options, channels, kept = OPEN_HEADS[form]
    dynamo, dynamic = EXPORTERS[exporter]
    model = export_llama(build_llama_like(with_positions=True, **options), dynamo,
                         dynamic=dynamic)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    heads = [g for g in result.analysis.groups if g.heads]
    assert len(heads) == 2 and not any(g.frozen for g in heads), [g.frozen for g in heads]
    plans = {p.group_id: p for p in result.plan.groups}
    assert all(g.n_channels == channels and plans[g.id].n_keep == kept for g in heads)
    assert result.report.after.params < 0.7 * result.report.before.params
