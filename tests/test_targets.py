"""Targets (--target-macs/--target-params), the cost model behind them, and re-applied plans.

Every check runs the real pipeline (onnxruntime, the rewrite, ``count_macs``/``count_params``):
the analytic cost model must agree with the counts of the rewritten model, a target must be met
to within 1 % or one channel's worth, and a plan saved from one export must select the same
channels in another export and pass the oracle there.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.cli import main as cli
from onnx_fpgm.deps.analysis import build_analysis
from onnx_fpgm.deps.constants import fold_constant_shapes
from onnx_fpgm.model import io
from onnx_fpgm.planning.costmodel import build_cost_model

from .conftest import check_pruned
from .onnx_patterns import PATTERNS
from .torch_models import ZOO, export_built

ARCHITECTURES = ["resnet18_like", "mobilenetv2_like", "resnext_like", "densenet_like",
                 "vit_like", "conv_flatten_gemm"]


@pytest.fixture(scope="module")
def exported() -> dict[tuple[str, bool], onnx.ModelProto]:
    def get(name: str, dynamo: bool = False, fold_bn: bool = True) -> onnx.ModelProto:
        return export_built(ZOO[name], dynamo=dynamo, fold_bn=fold_bn)

    return get


def _cost_models(model: onnx.ModelProto):
    shapes = io.infer_shapes(io.light_copy(model))
    graph = io.import_graph(model, shapes)
    fold_constant_shapes(graph)
    analysis = build_analysis(graph, io.default_opset(model), io.overridable_inputs(model))
    return {m: build_cost_model(analysis, graph, model, m) for m in ("macs", "params")}


def _one_channel(model: onnx.ModelProto, result: onnx_fpgm.PruneResult, metric: str) -> float:
    """Largest cost of one more kept channel in any pruned group, as a fraction."""
    cost = _cost_models(model)[metric]
    keep = np.array([g.n_keep for g in result.plan.groups], dtype=np.float64)
    worth = 0.0
    for g in result.plan.groups:
        if g.n_keep < g.n_channels:
            more = keep.copy()
            more[g.group_id] += 1
            worth = max(worth, float(cost.ratio(more) - cost.ratio(keep)))
    return worth


@pytest.mark.torch_export
@pytest.mark.parametrize("name,dynamo", [(a, False) for a in ARCHITECTURES] +
                         [("resnet18_like", True), ("mobilenetv2_like", True)],
                         ids=[*ARCHITECTURES, "resnet18_like-dynamo", "mobilenetv2_like-dynamo"])
def test_cost_model_agrees_with_counts(exported, name: str, dynamo: bool) -> None:
    model = exported(name, dynamo)
    models = _cost_models(model)
    result = onnx_fpgm.prune(model, 0.4, verify=False)  # head dims cut too (vit_like)
    removed = result.analysis.removed_atoms(result.plan.removed_classes)
    keep = np.array([g.n_keep for g in result.plan.groups])
    for metric, cost in models.items():
        real = getattr(result.report.after, metric)
        assert cost.total == getattr(result.report.before, metric)
        assert cost.exact(removed) == real, metric
        assert cost.cost(keep) == pytest.approx(real, rel=1e-9), metric


@pytest.mark.torch_export
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("metric,ratio", [("macs", 0.5), ("params", 0.3)])
@pytest.mark.parametrize("name", ["resnet18_like", "mobilenetv2_like", "resnext_like",
                                  "densenet_like"])
def test_target_is_met(exported, name: str, metric: str, ratio: float, allocation: str) -> None:
    model = exported(name)
    result = onnx_fpgm.prune(model, **{f"target_{metric}": ratio}, allocation=allocation)
    outcome = result.report.target
    achieved = getattr(result.report.after, metric) / getattr(result.report.before, metric)
    assert outcome.achieved == pytest.approx(achieved)
    assert outcome.estimated == pytest.approx(achieved, abs=1e-9)  # the model is exact here
    assert achieved <= ratio + 1e-12
    assert ratio - achieved <= max(0.01 * ratio, _one_channel(model, result, metric))
    assert result.report.verification["passed"]
    assert {g["id"] for g in outcome.groups} == \
        {g.group_id for g in result.plan.groups if g.n_keep < g.n_channels}


def _calibration(tmp_path, model, n=16, labels=False) -> str:
    rng = np.random.default_rng(0)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    arrays = {"input": rng.standard_normal((n, *shape[1:])).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, 10, n)
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.torch_export
def test_sensitivity_allocation_meets_target(exported, tmp_path) -> None:
    model = exported("resnet18_like")
    calib = _calibration(tmp_path, model)
    calls = []

    def progress(phase, total):
        calls.append((phase, total))
        return lambda n=1: None

    result = onnx_fpgm.prune(model, target_macs=0.4, calibration=calib, progress=progress)
    outcome = result.report.target
    assert outcome.allocation == "sensitivity"
    assert outcome.sensitivity and all(len(s["loss"]) == 4 for s in outcome.sensitivity)
    assert ("sensitivity", 4 * len(outcome.sensitivity)) in calls
    assert outcome.achieved <= 0.4
    assert 0.4 - outcome.achieved <= max(0.004, _one_channel(model, result, "macs"))
    check_pruned(model, result)


def test_sensitivity_loss_grows_with_sparsity(tmp_path) -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    result = onnx_fpgm.prune(model, target_params=0.6, allocation="sensitivity",
                             calibration=_calibration(tmp_path, model))
    losses = result.report.target.sensitivity[0]["loss"]
    assert losses == sorted(losses) and losses[-1] > losses[0] > 0


def test_pattern_targets_respect_round_to() -> None:
    model = PATTERNS["conv_bn_relu_conv"].build()
    result = onnx_fpgm.prune(model, target_macs=0.6, round_to=4, allocation="global")
    assert all(g.n_keep % 4 == 0 or g.n_keep == g.n_channels for g in result.plan.groups)
    assert result.report.target.achieved <= 0.6


def test_unreachable_target_fails_in_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(PATTERNS["conv_bn_relu_conv"].build(), path)
    code = cli.main([str(path), str(tmp_path / "out.onnx"), "--target-macs", "0.01"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "best reachable is 0." in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("args,match", [
    (["--target-macs", "0.5", "--sparsity", "0.3"], "not both"),
    (["--target-macs", "0"], "in (0, 1]"),
    (["--target-params", "1.5"], "in (0, 1]"),
    (["--target-macs", "0.5", "--target-params", "0.5"], "not allowed with"),
    (["--target-macs", "0.5", "--allocation", "sensitivity"], "needs --calibration"),
], ids=["with-sparsity", "zero", "above-one", "two-targets", "sensitivity-without-data"])
def test_bad_target_options(tmp_path, capsys, args, match) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(PATTERNS["conv_bn_relu_conv"].build(), path)
    code = cli.main([str(path), str(tmp_path / "out.onnx"), *args])
    assert code == 2
    assert match in capsys.readouterr().err


def test_cli_target_report_lists_group_sparsities(tmp_path, capsys) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(PATTERNS["concat_skip"].build(), path)
    report = tmp_path / "report.json"
    code = cli.main([str(path), str(tmp_path / "out.onnx"), "--target-macs", "0.7",
                     "--report", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert "Per-group sparsity" in out and "target MACs 0.7 of the original: reached" in out
    data = json.loads(report.read_text())["target"]
    assert data["metric"] == "macs" and data["achieved"] <= 0.7
    assert data["groups"] and all(0 < g["sparsity"] <= 1 for g in data["groups"])


# --- re-applied plans ---------------------------------------------------------------------------


@pytest.mark.torch_export
@pytest.mark.parametrize("to", ["dynamo", "bn-unfolded", "dynamo-bn-unfolded"])
def test_plan_applies_to_another_export(exported, tmp_path, to: str) -> None:
    source = exported("resnet18_like")
    saved = onnx_fpgm.prune(source, target_macs=0.5)
    plan = tmp_path / "report.json"
    plan.write_text(saved.report.to_json())
    other = exported("resnet18_like", dynamo="dynamo" in to, fold_bn="unfolded" not in to)
    result = onnx_fpgm.prune(other, plan=str(plan))
    assert [lay.kept for lay in result.report.layers] == [lay.kept for lay in saved.report.layers]
    assert result.report.after.macs == saved.report.after.macs
    check_pruned(other, result)
    # The other export, pruned on its own at the same settings, picks the same channels.
    own = onnx_fpgm.prune(other, target_macs=0.5)
    assert [lay.kept for lay in own.report.layers] == [lay.kept for lay in saved.report.layers]


def test_plan_on_the_same_model_reproduces_it(tmp_path) -> None:
    model = PATTERNS["se_block"].build()
    first = onnx_fpgm.prune(model, 0.5)
    plan = tmp_path / "report.json"
    plan.write_text(first.report.to_json())
    again = onnx_fpgm.prune(model, plan=str(plan))
    assert any("matched by node name" in n for n in again.report.notes)
    assert onnx.numpy_helper.to_array(again.model.graph.initializer[0]).tolist() == \
        onnx.numpy_helper.to_array(first.model.graph.initializer[0]).tolist()
    check_pruned(model, again)


def test_plan_that_does_not_fit_is_refused(tmp_path, capsys) -> None:
    plan = tmp_path / "report.json"
    plan.write_text(onnx_fpgm.prune(PATTERNS["se_block"].build(), 0.5).report.to_json())
    path = tmp_path / "in.onnx"
    onnx.save(PATTERNS["concat_skip"].build(), path)
    code = cli.main([str(path), str(tmp_path / "out.onnx"), "--plan", str(plan)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "plan does not fit" in err
    assert not (tmp_path / "out.onnx").exists()


def test_plan_whose_coupled_channels_disagree_is_refused(tmp_path) -> None:
    model = PATTERNS["repvgg_parallel_branches"].build()
    report = json.loads(onnx_fpgm.prune(model, 0.5).report.to_json())
    grouped = {}
    for layer in report["layers"]:
        grouped.setdefault(layer["group"], []).append(layer)
    coupled = next(v for v in grouped.values() if len(v) > 1 and v[0]["kept"] != list(
        range(v[0]["channels_before"])))
    coupled[0]["kept"] = sorted(set(range(coupled[0]["channels_before"])) -
                                {coupled[0]["kept"][0]})
    plan = tmp_path / "report.json"
    plan.write_text(json.dumps(report))
    with pytest.raises(onnx_fpgm.errors.PlanError, match="coupled"):
        onnx_fpgm.prune(model, plan=str(plan))


@pytest.mark.parametrize("text,match", [("not json", "readable"), ("{}", "no 'layers'"),
                                        ('{"layers": [{"name": 3}]}', "malformed")])
def test_plan_file_errors(tmp_path, text, match) -> None:
    plan = tmp_path / "report.json"
    plan.write_text(text)
    with pytest.raises(onnx_fpgm.errors.PlanError, match=match):
        onnx_fpgm.prune(PATTERNS["se_block"].build(), plan=str(plan))


@pytest.mark.torch_export
def test_latency_target_is_searched_by_timing(exported) -> None:
    """The mechanism, not the machine's speed: trials are timed, the reported ratio is the
    measured one, and the chosen model is verified (speed claims live in benchmarks/)."""
    model = exported("vgg_like")
    result = onnx_fpgm.prune(model, target_latency=0.6, allocation="uniform")
    outcome = result.report.target
    assert outcome.metric == "latency" and outcome.target == 0.6
    assert outcome.trials and all(t["latency_ratio"] > 0 for t in outcome.trials)
    lat = result.report.latency
    assert outcome.achieved == pytest.approx(lat.pruned_ms / lat.original_ms)
    assert result.report.after.macs < result.report.before.macs
    assert result.report.verification["passed"]
    assert "latency target" in " ".join(result.report.notes)


@pytest.mark.torch_export
def test_target_keeps_fixed_and_excluded_groups(exported) -> None:
    model = exported("resnet18_like")
    plain = onnx_fpgm.prune(model, 0.5, verify=False)
    open_groups = [g for g in plain.plan.groups if not g.frozen]
    fixed, excluded = open_groups[0].producers[0], open_groups[1].producers[0]
    result = onnx_fpgm.prune(model, target_macs=0.5, allocation="global",
                             layer_sparsity=((f"^{fixed}$", 0.25),),
                             exclude=(f"^{excluded}$",))
    by_id = {g.group_id: g for g in result.plan.groups}
    assert by_id[open_groups[0].group_id].n_keep == \
        open_groups[0].n_channels - round(0.25 * open_groups[0].n_channels)
    assert by_id[open_groups[1].group_id].n_keep == open_groups[1].n_channels
    assert result.report.target.achieved <= 0.5


@pytest.mark.parametrize("form", ["fp16", "dynamic-batch"])
def test_plan_applies_to_fp16_and_dynamic_batch_forms(tmp_path, form: str) -> None:
    from onnx import TensorProto

    from .test_forms import _ladder, _to_dtype

    base = _ladder()
    saved = onnx_fpgm.prune(base, 0.5)
    plan = tmp_path / "report.json"
    plan.write_text(saved.report.to_json())
    if form == "fp16":
        other = _to_dtype(base, TensorProto.FLOAT16)
    else:
        other = onnx.ModelProto()
        other.CopyFrom(base)
        for value in [*other.graph.input, *other.graph.output]:
            value.type.tensor_type.shape.dim[0].dim_param = "N"
    result = onnx_fpgm.prune(other, plan=str(plan))
    assert [lay.kept for lay in result.report.layers] == [lay.kept for lay in saved.report.layers]
    check_pruned(other, result)


@pytest.mark.parametrize("dims", ["named", "minus_one"])
def test_target_on_symbolic_inputs_counts_at_the_chosen_sizes(dims: str) -> None:
    """A model with symbolic input dims: the cost model counts MACs at the sizes the tool
    chose, so its estimate is what the report measures on the rewritten model."""
    from .shipped_forms import paddle_detector
    from .test_shipped_forms import _oracle

    model = paddle_detector(dims)
    result = onnx_fpgm.prune(model, target_macs=0.5)
    for shapes in result.input_sizes.sets:
        _oracle(model, result, shapes)
    outcome = result.report.target
    measured = result.report.after.macs / result.report.before.macs
    assert outcome.achieved == pytest.approx(measured)
    assert outcome.estimated == pytest.approx(measured)
    assert measured <= 0.5
    assert result.report.input_sizes["symbolic_dims"]
