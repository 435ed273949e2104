"""The architecture zoo (tests/torch_models.py), exported by both torch exporters, pruned and
checked with the oracle; coverage asserted per model."""
from __future__ import annotations

import onnx
import pytest

import onnx_fpgm
from tests.conftest import check_pruned, run_outputs
from tests.torch_models import ZOO, export_built

EXPORTERS = {
    "torchscript": dict(dynamo=False, fold_bn=True),   # BN folded into Conv
    "dynamo": dict(dynamo=True, fold_bn=False),         # BatchNormalization kept, unoptimised
}

# Why a group may stay whole, per model: anything else frozen is a coverage regression.
ALWAYS = ("reaches graph output",)
ALLOWED_FROZEN = {
    "vit_like": ALWAYS + ("normalises over the channel axis",),
    "resnext_like": ALWAYS + ("grouped conv",),
}
DYNAMO_ALLOWED: dict[str, tuple[str, ...]] = {}


def _model(name: str, exporter: str) -> onnx.ModelProto:
    return export_built(ZOO[name], **EXPORTERS[exporter])


CASES = [(n, e) for n in ZOO for e in EXPORTERS]


@pytest.mark.torch_export
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_zoo_prunes_and_passes_oracle(name: str, exporter: str) -> None:
    model = _model(name, exporter)
    for sparsity, round_to in ((0.3, None), (0.6, None), (0.5, 8)):
        result = onnx_fpgm.prune(model, sparsity, round_to=round_to)
        check_pruned(model, result)
        assert result.report.after.params < result.report.before.params, "nothing pruned"
        if round_to:
            for group in result.report.groups:
                if not group.frozen and not group.heads and \
                        group.channels_after != group.channels_before:
                    assert group.channels_after % round_to == 0


@pytest.mark.torch_export
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_zoo_coverage(name: str, exporter: str) -> None:
    result = onnx_fpgm.prune(_model(name, exporter), 0.5, verify=False)
    allowed = ALLOWED_FROZEN.get(name, ALWAYS)
    if exporter == "dynamo":
        allowed = allowed + DYNAMO_ALLOWED.get(name, ())
    for group in result.report.groups:
        if group.frozen:
            assert any(a in group.frozen for a in allowed), \
                f"group {group.producers} frozen: {group.frozen}"
    report = result.report
    assert report.prunable_channels > 0.25 * report.total_channels
    if name == "vit_like":  # MLP hidden widths and heads are groups of their own, prunable
        mlp = [g for g in report.groups if not g.frozen and not g.heads and not g.head_dims]
        heads = [g for g in report.groups if not g.frozen and g.heads]
        assert len(mlp) >= 2 and all(len(g.producers) == 1 for g in mlp)
        assert len(heads) == 2 and all(g.channels_before == 4 for g in heads)
    if name == "mobilenetv2_like":  # expanded (depthwise) widths are prunable groups
        dw_groups = [g for g in report.groups if not g.frozen and len(g.producers) >= 2]
        assert dw_groups


@pytest.mark.torch_export
@pytest.mark.parametrize("name", list(ZOO), ids=list(ZOO))
def test_zoo_sparsity_zero_is_noop(name: str) -> None:
    model = _model(name, "torchscript")
    result = onnx_fpgm.prune(model, 0.0)
    assert not result.plan.n_removed
    for want, have in zip(run_outputs(model), run_outputs(result.model)):
        assert (want == have).all()


@pytest.mark.torch_export
@pytest.mark.parametrize("name", ["conv_bn_relu_conv", "resnet18_like", "mobilenetv2_like",
                                  "vgg_like"])
def test_folded_and_unfolded_bn_select_the_same_filters(name: str) -> None:
    """Scoring the effective filter makes BN-folded and BN-kept exports agree."""
    folded = onnx_fpgm.prune(_model(name, "torchscript"), 0.5, verify=False).report
    unfolded = onnx_fpgm.prune(_model(name, "dynamo"), 0.5, verify=False).report
    kept_a = [layer.kept for layer in folded.layers]
    kept_b = [layer.kept for layer in unfolded.layers]
    assert len(kept_a) == len(kept_b)
    assert kept_a == kept_b
