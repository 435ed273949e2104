"""Llama-like decoders exported with a KV cache (optimum's ``text-generation-with-past`` form,
issue 21): the past/present interface keeps the KV heads whole, the query heads within each KV
group (the same slots from every group: repeat_kv's ``n_rep`` shrinks) and the MLP widths prune;
the oracle checks at an empty past and a non-empty one. With ``--allow-interface-change`` whole
KV groups prune and the past/present caches shrink with them (a genai_config.json follows)."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from tests.conftest import check_pruned
from tests.llama_models import build_llama_like, export_llama_with_past

#: 8 query heads on 2 KV heads (n_rep 4), head_dim 4, as the issue's config in miniature
CONFIG = {"vocab": 16, "dim": 32, "heads": 8, "kv_heads": 2, "hidden": 48, "layers": 2,
          "with_positions": True}


@functools.cache
def _export(dynamo: bool) -> bytes:
    return export_llama_with_past(build_llama_like(**CONFIG), dynamo).SerializeToString()


def _weights(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """(K, N) of every MatMul weight, by the node's name."""
    stored = {t.name: tuple(t.dims) for t in model.graph.initializer}
    return {n.name: stored[n.input[1]] for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in stored}


@pytest.mark.torch_export
def test_query_slots_and_mlp_prune_kv_heads_stay() -> None:
    model = onnx.load_from_string(_export(True))
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    sizes = result.report.input_sizes
    pasts = {sizes[key]["past_key_values.0.key"][2] for key in ("primary", "secondary")}
    assert 0 in pasts and max(pasts) > 0  # an empty and a non-empty cache were checked
    heads = [g for g in result.report.groups if g.heads]
    # per layer: 4 query slots (each the same slot of both KV groups) -> 2
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(4, 2, None)] * 2
    kv = [g for g in result.report.groups if g.frozen and "present." in g.frozen]
    assert len(kv) == 4 and all("reaches graph output" in g.frozen for g in kv)
    shapes = sorted(_weights(result.model).values())
    # per layer q keeps 4 of 8 heads (32 -> 16), k and v stay (8), o reads 16 rows,
    # gate/up/down keep half the MLP; the LM head stays
    layer = [(32, 16), (32, 8), (32, 8), (16, 32), (32, 24), (32, 24), (24, 32)]
    assert shapes == sorted([*layer, *layer, (32, 16)])
    for out in result.model.graph.output:  # present.* keep their 2 KV heads
        if out.name.startswith("present."):
            assert out.type.tensor_type.shape.dim[1].dim_value == 2


@pytest.mark.torch_export
def test_torchscript_cache_export_prunes_query_slots() -> None:
    """TorchScript reads the KV head count back by Shape for repeat_kv's Expand (its shape
    through ``Where(Equal(s, -1), 1, s)``) and merges ``Shape(k)[1] * n_rep`` heads: n_rep is
    rewritten in both, so the query slots prune as in the dynamo export, KV heads stay."""
    model = onnx.load_from_string(_export(False))
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(4, 2, None)] * 2
    widths = [g for g in result.report.groups if not g.heads and not g.frozen]
    assert [(g.channels_before, g.channels_after) for g in widths] == [(48, 24)] * 2
    layer = [(32, 16), (32, 8), (32, 8), (16, 32), (32, 24), (32, 24), (24, 32)]
    assert sorted(_weights(result.model).values()) == sorted([*layer, *layer, (32, 16)])


def test_only_a_join_into_a_graph_output_is_a_past_length() -> None:
    """``present = Concat(past, new)`` marks the past's axis; an input joined elsewhere (two
    images on a symbolic axis) keeps its size role: it must never be sized 0."""
    from onnx import TensorProto, helper

    from onnx_fpgm.oracle.cache_inputs import past_axes
    from onnx_fpgm.oracle.input_sizes import Role, symbolic_dims

    def value(name, dims):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    nodes = [helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
             helper.make_node("Concat", ["a", "b"], ["ab"], axis=2),
             helper.make_node("Relu", ["ab"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [value("past", [1, 2, "past_sequence", 4]), value("new", [1, 2, 3, 4]),
                     value("a", [1, 3, "h", 8]), value("b", [1, 3, "h", 8])],
        [value("present", [1, 2, None, 4]), value("out", [1, 3, None, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    axes = past_axes(model)
    assert ("past", 2) in axes and ("a", 2) not in axes
    roles = {(d.input, d.axis): d.role for d in symbolic_dims(model)}
    assert roles[("past", 2)] is Role.PAST and roles[("a", 2)] is Role.HEIGHT


def _heads(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in values
            if v.name.startswith(("past_key_values.", "present."))}


@pytest.mark.torch_export
def test_interface_change_prunes_whole_kv_groups() -> None:
    """The flag lets the caches shrink: KV groups (K and V head, their 4 query heads) 2 -> 1,
    past_key_values.* and present.* declare 1 head (and 2 of 4 head dims); checked at past 0
    and 3, the pruned model fed the original's past without the removed head and dims."""
    model = onnx.load_from_string(_export(True))
    result = onnx_fpgm.prune(model, 0.5, allow_interface_change=True)
    check_pruned(model, result)  # the oracle across the recorded interface changes
    checked = result.report.verification["checked_at"]
    assert len(checked) == 2 and "past_key_values.0.key=1,2,0,4" in checked[0]
    heads = [g for g in result.report.groups if g.heads]
    assert [(g.channels_before, g.channels_after, g.frozen) for g in heads] == [(2, 1, None)] * 2
    assert _heads(model.graph.input) == dict.fromkeys(_heads(result.model.graph.input), 2)
    assert set(_heads(result.model.graph.input).values()) == {1}
    assert set(_heads(result.model.graph.output).values()) == {1}
    changes = result.report.interface_changes
    assert len(changes) == 8 and {(c["before"][1], c["after"][1], c["axis"]) for c in changes} \
        == {(2, 1, 1)}
    # q keeps 4 heads x 2 of 4 dims, k/v 1 head x 2 dims (head dims go with the cache's
    # head_dim under the flag: tests/test_cache_interface_axes.py), o reads 8 rows
    layer = [(32, 8), (32, 2), (32, 2), (8, 32), (32, 24), (32, 24), (24, 32)]
    assert sorted(_weights(result.model).values()) == sorted([*layer, *layer, (32, 16)])
    assert result.model.metadata_props and any(
        p.key == "onnx_fpgm.allow_interface_change" for p in result.model.metadata_props)


GENAI = {"model": {"decoder": {"head_size": 4, "hidden_size": 32, "num_attention_heads": 8,
                               "num_key_value_heads": 2, "num_hidden_layers": 2},
                   "type": "llama"}, "search": {"max_length": 64}}


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(_export(True))
    (folder / "genai_config.json").write_text(json.dumps(GENAI))
    return folder


@pytest.mark.torch_export
def test_cli_prints_reports_and_writes_genai_config(tmp_path, capsys) -> None:
    """The changes printed and in the report JSON; the genai config rewritten beside OUT;
    --benchmark feeds the pruned model caches of its own head count."""
    folder, out = _model_folder(tmp_path), tmp_path / "out"
    out.mkdir()
    report = tmp_path / "report.json"
    code = cli.main([str(folder / "model.onnx"), str(out / "model.onnx"), "--sparsity", "0.5",
                     "--allow-interface-change", "--report", str(report),
                     "--benchmark"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "interface change: input past_key_values.0.key: (" in printed
    assert printed.count("interface change:") == 8 and ", 2, " in printed and ", 1, " in printed
    assert "latency (" in printed  # the pruned model timed on its own (smaller) past
    written = json.loads((out / "genai_config.json").read_text())
    # head dims went with the caches' head_dim axis (4 -> 2): head_size follows them
    assert written["model"]["decoder"] == {**GENAI["model"]["decoder"], "filename": "model.onnx",
                                           "num_attention_heads": 4, "num_key_value_heads": 1,
                                           "head_size": 2}
    assert written["search"] == GENAI["search"]
    assert json.loads((folder / "genai_config.json").read_text()) == GENAI  # IN's untouched
    assert len(json.loads(report.read_text())["interface_changes"]) == 8


@pytest.mark.torch_export
def test_genai_config_collision_and_no_flag(tmp_path, capsys) -> None:
    """OUT beside IN would overwrite IN's genai_config.json: refused before any work; without
    the flag nothing but OUT is written and the caches keep their heads."""
    folder = _model_folder(tmp_path)
    code = cli.main([str(folder / "model.onnx"), str(folder / "pruned.onnx"),
                     "--allow-interface-change"])
    err = capsys.readouterr().err
    assert code == 2 and "genai_config.json" in err and "same file" in err
    assert not (folder / "pruned.onnx").exists()
    out = tmp_path / "out"
    out.mkdir()
    assert cli.main([str(folder / "model.onnx"), str(out / "model.onnx"), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert set(_heads(onnx.load(out / "model.onnx").graph.output).values()) == {2}


@pytest.mark.torch_export
def test_api_save_writes_genai_config_as_the_cli_does(tmp_path) -> None:
    """PruneResult.save: the config rewritten beside OUT, IN's untouched, its note in the
    report; beside IN it would overwrite IN's config: refused before OUT is written."""
    from onnx_fpgm.errors import OutputError

    folder, out = _model_folder(tmp_path), tmp_path / "out"
    out.mkdir()
    result = onnx_fpgm.prune(folder / "model.onnx", 0.5, allow_interface_change=True,
                             keep_head_dims=True)  # head_size stays 4
    with pytest.raises(OutputError, match="genai_config.json"):
        result.save(folder / "pruned.onnx")
    assert not (folder / "pruned.onnx").exists()
    result.save(out / "model.onnx")
    written = json.loads((out / "genai_config.json").read_text())
    assert written["model"]["decoder"] == {**GENAI["model"]["decoder"], "filename": "model.onnx",
                                           "num_attention_heads": 4, "num_key_value_heads": 1}
    assert json.loads((folder / "genai_config.json").read_text()) == GENAI
    assert any("genai_config.json written beside OUT" in n for n in result.report.notes)
    plain = onnx_fpgm.prune(folder / "model.onnx", 0.5)  # without the flag: OUT alone
    plain.save(tmp_path / "plain.onnx")
    assert not (tmp_path / "genai_config.json").exists()


def test_genai_config_counts() -> None:
    """The counts follow the caches (KV heads and query heads by the same factor); a config
    that does not match the caches is not written; layers that kept different counts are
    refused (genai counts one number for all layers)."""
    from onnx_fpgm.errors import ConfigError
    from onnx_fpgm.model.genai_config import updated_genai_config

    def change(before, after):
        return {"name": "present.0.key", "kind": "output", "axis": 1,
                "before": ["b", before, "s", 4], "after": ["b", after, "s", 4]}

    text = json.dumps(GENAI)
    written, note = updated_genai_config(text, [change(2, 1), change(2, 1)])
    assert json.loads(written)["model"]["decoder"]["num_attention_heads"] == 4 and "2 -> 1" in note
    with pytest.raises(ConfigError, match="different numbers of KV heads"):
        updated_genai_config(text, [change(2, 1), change(2, 2)])
    assert updated_genai_config(text, [change(4, 2)])[0] is None  # declares 2, caches 4
    assert updated_genai_config(text, [])[0] == text
    assert updated_genai_config("{}", [change(2, 1)])[0] is None

    def dims(before, after, heads=(2, 2)):  # heads and head_dim changes, as to_dict writes them
        return {"name": "present.0.key", "kind": "output", "axis": 1, "axes": [1, 3],
                "heads_axis": 1, "head_dim_axis": 3,
                "before": ["b", heads[0], "s", before], "after": ["b", heads[1], "s", after]}

    decoder = json.loads(updated_genai_config(text, [dims(4, 2, (2, 1))])[0])["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (2, 1)
    only_dims = {**dims(4, 2), "axis": 3, "axes": [3]}  # KV heads whole: their count stays
    decoder = json.loads(updated_genai_config(text, [only_dims])[0])["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"]) == (2, 2)
    with pytest.raises(ConfigError, match="different head sizes"):
        updated_genai_config(text, [dims(4, 2, (2, 1)), dims(4, 3, (2, 1))])
    assert updated_genai_config(text, [dims(8, 4, (2, 1))])[0] is None  # declares 4, caches 8


@pytest.mark.torch_export
def test_interface_change_refuses_data_paths(tmp_path) -> None:
    """Calibration data would feed the pruned model the original's past: refused (exit 2)."""
    import numpy as np

    model = onnx.load_from_string(_export(True))
    data = tmp_path / "calib.npz"
    np.savez(data, input_ids=np.zeros((1, 4), np.int64))
    with pytest.raises(onnx_fpgm.errors.ConfigError, match="allow-interface-change"):
        onnx_fpgm.prune(model, 0.5, allow_interface_change=True, calibration=str(data),
                        verify=False)
