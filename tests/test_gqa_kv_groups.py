"""KV groups of com.microsoft GroupQueryAttention with a cache under ``--allow-interface-change``
(issue 21): the onnxruntime-genai builder's form (past_key_values.* read by the fused op,
present.* written by it). With the flag a KV group (its K and V head, its query heads, its
slice of every cache) is one atom: ``num_heads`` and ``kv_num_heads`` shrink, the caches'
head axis with them, the oracle checks at past 0 and > 0 with the original's past restricted to
the kept heads; genai_config.json follows (head counts off the rewritten op, OUT's file name).
Without the flag the interface stays. fp32 (q|k|v packed or separate) and MatMulNBits int4."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from onnx_fpgm.errors import ConfigError
from onnx_fpgm.measure.bench import count_macs
from tests.conftest import check_pruned
from tests.nbits_models import quantize

DIM, HEADS, KV, HD, LAYERS = 32, 4, 2, 16, 2  # onnxruntime's rotary needs head_dim 16
GENAI = {"model": {"decoder": {"filename": "model.onnx", "head_size": HD, "hidden_size": DIM,
                               "num_attention_heads": HEADS, "num_key_value_heads": KV,
                               "num_hidden_layers": LAYERS}, "type": "llama"},
         "search": {"max_length": 64}}


def _layer(i: int, rng, packed: bool) -> tuple[list, list]:
    """One decoder layer: q|k|v projection(s) -> GroupQueryAttention (own rotary, caches
    past_key_values.i.* -> present.i.*) -> o_proj -> residual Add."""
    def init(name, *shape):
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * shape[0] ** -0.5).astype(np.float32), name)

    x, p = f"h{i}", f"l{i}_"
    if packed:
        inits = [init(p + "w_qkv", DIM, (HEADS + 2 * KV) * HD)]
        nodes = [helper.make_node("MatMul", [x, p + "w_qkv"], [p + "qkv"], name=p + "qkv_proj")]
        qkv = [p + "qkv", "", ""]
    else:
        inits = [init(p + f"w_{n}", DIM, w * HD) for n, w in (("q", HEADS), ("k", KV), ("v", KV))]
        nodes = [helper.make_node("MatMul", [x, p + f"w_{n}"], [p + n], name=p + f"{n}_proj")
                 for n in "qkv"]
        qkv = [p + "q", p + "k", p + "v"]
    inits.append(init(p + "w_o", HEADS * HD, DIM))
    cache = f"past_key_values.{i}."
    nodes += [helper.make_node("GroupQueryAttention",
                               [*qkv, cache + "key", cache + "value", "seqlens_k", "total_len",
                                "cos_cache", "sin_cache"],
                               [p + "attn", f"present.{i}.key", f"present.{i}.value"],
                               name=p + "attention", domain="com.microsoft", num_heads=HEADS,
                               kv_num_heads=KV, do_rotary=1),
              helper.make_node("MatMul", [p + "attn", p + "w_o"], [p + "o"], name=p + "o_proj"),
              helper.make_node("Add", [x, p + "o"], [f"h{i + 1}"], name=p + "residual")]
    return nodes, inits


def genai_gqa(packed: bool = True, layers: int = LAYERS) -> onnx.ModelProto:
    """``layers`` GQA layers as the genai builder lays them out (its ``seqlens_k`` and
    ``total_sequence_length`` from the attention mask, a symbolic ``kv_cache_dim``)."""
    rng = np.random.default_rng(0)
    angles = np.arange(64)[:, None] * 0.1 * np.arange(1, HD // 2 + 1)
    inits = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos_cache"),
             numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin_cache"),
             numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    nodes = [
        helper.make_node("Identity", ["x"], ["h0"], name="embed"),
        helper.make_node("ReduceSum", ["attention_mask", "axis_1"], ["mask_sum"],
                         name="mask_sum", keepdims=0),
        helper.make_node("Sub", ["mask_sum", "one"], ["seqlens_i64"], name="seqlens_sub"),
        helper.make_node("Cast", ["seqlens_i64"], ["seqlens_k"], name="seqlens_cast",
                         to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["total_i64"], name="total_shape",
                         start=1, end=2),
        helper.make_node("Squeeze", ["total_i64"], ["total_sq"], name="total_squeeze"),
        helper.make_node("Cast", ["total_sq"], ["total_len"], name="total_cast",
                         to=TensorProto.INT32)]
    past = ["batch", KV, "past_sequence_length", "kv_cache_dim"]
    present = ["batch", KV, "total_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", DIM]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch", "total_sequence_length"])]
    outputs = []
    for i in range(layers):
        more_nodes, more_inits = _layer(i, rng, packed)
        nodes += more_nodes
        inits += more_inits
        inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{n}", TensorProto.FLOAT,
                                                 past) for n in ("key", "value")]
        outputs += [helper.make_tensor_value_info(f"present.{i}.{n}", TensorProto.FLOAT,
                                                  present) for n in ("key", "value")]
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["y"], name="head"))
    outputs.insert(0, helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                    ["batch", "sequence", DIM]))
    graph = helper.make_graph(nodes, "genai_gqa", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)],
                             ir_version=8)


def _gqa_attrs(model: onnx.ModelProto) -> list[dict[str, int]]:
    return [{a.name: a.i for a in n.attribute if a.name.endswith("heads")}
            for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def _cache_heads(values) -> set[int]:
    return {v.type.tensor_type.shape.dim[1].dim_value for v in values
            if v.name.startswith(("past_key_values.", "present."))}


def _check_kv_groups_pruned(model: onnx.ModelProto, result) -> None:
    check_pruned(model, result)  # the oracle across the recorded interface changes
    checked = result.report.verification["checked_at"]
    assert len(checked) == 2 and "past_key_values.0.key=1,2,0,16" in checked[0]
    assert "past_key_values.0.key=1,2,3,16" in checked[1]  # a non-empty past, all heads fed
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == \
        [(KV, 1, None)] * LAYERS
    assert _gqa_attrs(result.model) == [{"num_heads": HEADS // KV, "kv_num_heads": 1}] * LAYERS
    assert _cache_heads(model.graph.input) == {KV}
    assert _cache_heads(result.model.graph.input) == _cache_heads(result.model.graph.output) \
        == {1}
    changes = result.report.interface_changes
    assert len(changes) == 4 * LAYERS and {(c["before"][1], c["after"][1], c["axis"])
                                           for c in changes} == {(KV, 1, 1)}
    # the MACs of the pruned model are counted at its own cache sizes
    sizes = {k: list(v) for k, v in result.report.input_sizes["primary"].items()}
    for name in sizes:
        if name.startswith("past_key_values."):
            sizes[name][1] = 1
    assert result.report.after.macs == count_macs(result.model, sizes) > 0


@pytest.mark.parametrize("packed", [True, False])
def test_flag_prunes_kv_groups_with_their_caches(packed: bool) -> None:
    model = genai_gqa(packed)
    result = onnx_fpgm.prune(model, 0.5, allow_interface_change=True)
    _check_kv_groups_pruned(model, result)
    kept_columns = (HEADS // KV + 2) * HD  # one KV group: 2 query heads, its K and V head
    stored = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    if packed:
        assert stored["l0_w_qkv"] == (DIM, kept_columns)
    else:
        assert [stored[f"l0_w_{n}"][1] for n in "qkv"] == [HEADS // KV * HD, HD, HD]
    assert stored["l0_w_o"] == (HEADS // KV * HD, DIM)


def test_flag_prunes_kv_groups_int4() -> None:
    """MatMulNBits projections (blocks of 16 along K): a KV group's columns (N) go with their
    scales, o_proj's rows (K) of the removed query heads are repacked."""
    model = quantize(genai_gqa(packed=True), block_size=16, symmetric=False)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 2 * LAYERS
    result = onnx_fpgm.prune(model, 0.5, allow_interface_change=True)
    _check_kv_groups_pruned(model, result)
    n = {node.name.split("_Q4")[0]: {a.name: a.i for a in node.attribute}
         for node in result.model.graph.node if node.op_type == "MatMulNBits"}
    assert (n["l0_qkv_proj"]["N"], n["l0_o_proj"]["K"]) == ((HEADS // KV + 2) * HD,
                                                             HEADS // KV * HD), n


def test_without_the_flag_the_interface_stays() -> None:
    """The KV heads stay (query slots prune, ``kv_num_heads`` kept): nothing of the interface
    changes."""
    model = genai_gqa()
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    assert result.report.interface_changes == []
    assert [(v.name, v.type) for v in result.model.graph.input] == \
        [(v.name, v.type) for v in model.graph.input]
    assert [(v.name, v.type) for v in result.model.graph.output] == \
        [(v.name, v.type) for v in model.graph.output]
    assert _gqa_attrs(result.model) == [{"num_heads": HEADS // 2, "kv_num_heads": KV}] * LAYERS


def _folder(tmp_path, model: onnx.ModelProto):
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, folder / "model.onnx")
    (folder / "genai_config.json").write_text(json.dumps(GENAI))
    out = tmp_path / "out"
    out.mkdir()
    return folder, out


def test_cli_writes_genai_config_for_out(tmp_path, capsys) -> None:
    """The counts from the rewritten op, ``filename`` naming OUT, the rest as it was."""
    folder, out = _folder(tmp_path, genai_gqa())
    code = cli.main([str(folder / "model.onnx"), str(out / "pruned.onnx"), "--sparsity", "0.5",
                     "--allow-interface-change", "-q"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((out / "genai_config.json").read_text())
    assert written["model"]["decoder"] == {**GENAI["model"]["decoder"], "filename": "pruned.onnx",
                                           "num_attention_heads": 2, "num_key_value_heads": 1}
    assert written["search"] == GENAI["search"]
    assert json.loads((folder / "genai_config.json").read_text()) == GENAI


def test_api_save_writes_the_same_config(tmp_path) -> None:
    folder, out = _folder(tmp_path, genai_gqa(packed=False))
    result = onnx_fpgm.prune(folder / "model.onnx", 0.5, allow_interface_change=True)
    result.save(out / "decoder.onnx")
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["filename"], decoder["num_attention_heads"],
            decoder["num_key_value_heads"]) == ("decoder.onnx", 2, 1)


def test_mixed_layers_refused(tmp_path, capsys) -> None:
    """Layer 1's attention excluded: its caches keep 2 KV heads while layer 0's keep 1, and
    genai counts one number for all layers: refused, exit 2, nothing written."""
    folder, out = _folder(tmp_path, genai_gqa())
    code = cli.main([str(folder / "model.onnx"), str(out / "model.onnx"), "--sparsity", "0.5",
                     "--allow-interface-change", "--exclude", "l1_qkv_proj",
                     "--report", str(out / "report.json"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "genai_config.json counts one number of heads" in err
    assert len(err.strip().splitlines()) == 1
    assert list(out.iterdir()) == []
    result = onnx_fpgm.prune(folder / "model.onnx", 0.5, allow_interface_change=True,
                             exclude=("l1_qkv_proj",))
    with pytest.raises(ConfigError, match="layers"):
        result.save(out / "model.onnx")
    assert list(out.iterdir()) == []


def test_counts_and_layers_left_whole() -> None:
    from onnx_fpgm.model.genai_config import updated_genai_config

    def change(name, before, after):
        kind = "input" if name.startswith("past") else "output"
        return {"name": name, "kind": kind, "axis": 1, "before": ["b", before, "s", HD],
                "after": ["b", after, "s", HD]}

    text = json.dumps(GENAI)
    layer0 = [change(f"past_key_values.0.{n}", 2, 1) for n in ("key", "value")]
    with pytest.raises(ConfigError, match="1 of 2 layers kept their KV caches whole"):
        updated_genai_config(text, layer0)
    with pytest.raises(ConfigError, match="different head counts"):
        updated_genai_config(text, [], {(2, 1), (2, 2)})
    layers = layer0 + [change(f"past_key_values.1.{n}", 2, 1) for n in ("key", "value")]
    written, note = updated_genai_config(text, layers, {(2, 1)}, "out.onnx")
    decoder = json.loads(written)["model"]["decoder"]
    assert (decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["filename"]) == (2, 1, "out.onnx") and "2 -> 1" in note
    # query slots only (the KV heads stayed): the head count still follows the op
    written, _ = updated_genai_config(text, [], {(2, 2)}, "model.onnx")
    assert json.loads(written)["model"]["decoder"]["num_attention_heads"] == 2
    assert updated_genai_config(text, [], {(HEADS, KV)}, "model.onnx")[0] == text
