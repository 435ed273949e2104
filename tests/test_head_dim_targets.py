"""Head dims under every way of asking for a cut (issue 21): a target's allocation counts and
cuts them like other groups (the cost model counts them within the kept heads), ``--exclude``
and ``--layer-sparsity`` apply to them by the layers they belong to, ``--keep-head-dims`` keeps
them; every prune checked by the oracle."""
from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

import onnx_fpgm
from tests.attention_models import build_separate_qkv_like
from tests.conftest import check_pruned
from tests.test_targets import _cost_models, _one_channel
from tests.torch_models import export_onnx

pytestmark = pytest.mark.torch_export


@functools.cache
def _exported() -> bytes:
    module, shape = build_separate_qkv_like()  # 2 blocks, 4 heads of 8, separate q/k/v
    return export_onnx(module, shape, dynamo=False).SerializeToString()


def _model() -> onnx.ModelProto:
    return onnx.load_from_string(_exported())


def _dims_kept(result) -> dict[tuple[str, ...], tuple[int, int]]:
    """(kept, of) per head-dim group, by the short names of its producers."""
    plans = {p.group_id: p for p in result.plan.groups}
    return {tuple(sorted(p.split("/")[-2] for p in g.producers)) + (g.producers[0],):
            (plans[g.id].n_keep, g.n_channels) for g in result.analysis.groups if g.dims}


@pytest.mark.parametrize("metric,allocation", [("macs", "uniform"), ("macs", "global"),
                                               ("params", "uniform")])
def test_target_cuts_head_dims_and_is_met(metric: str, allocation: str) -> None:
    model = _model()
    result = onnx_fpgm.prune(model, **{f"target_{metric}": 0.5}, allocation=allocation)
    check_pruned(model, result)
    kept = _dims_kept(result)
    assert len(kept) == 4 and any(k < n for k, n in kept.values()), kept
    achieved = getattr(result.report.after, metric) / getattr(result.report.before, metric)
    assert result.report.target.estimated == pytest.approx(achieved, abs=1e-9)
    assert achieved <= 0.5 + 1e-12
    assert 0.5 - achieved <= max(0.005, _one_channel(model, result, metric))


def test_cost_model_counts_head_dims_within_kept_heads() -> None:
    """Heads and dims cut together: a head grid keeps (heads kept) x (dims kept) positions, and
    ``q @ k^T`` contracts over the kept dims only; the model agrees with the rewritten counts."""
    model = _model()
    result = onnx_fpgm.prune(model, 0.5, verify=False)
    assert any(k < n for k, n in _dims_kept(result).values())
    removed = result.analysis.removed_atoms(result.plan.removed_classes)
    keep = np.array([g.n_keep for g in result.plan.groups])
    for metric, cost in _cost_models(model).items():
        real = getattr(result.report.after, metric)
        assert cost.exact(removed) == real, metric
        assert cost.cost(keep) == pytest.approx(real, rel=1e-9), metric


def test_exclude_keeps_the_head_dims_of_its_layer() -> None:
    model = _model()
    result = onnx_fpgm.prune(model, target_macs=0.5, exclude=["blocks.0/attn/value"])
    check_pruned(model, result)
    kept = _dims_kept(result)
    v0 = [v for k, v in kept.items() if "value" in k and "blocks.0" in k[-1]]
    others = [v for k, v in kept.items() if not ("value" in k and "blocks.0" in k[-1])]
    assert v0 == [(8, 8)]
    assert any(k < n for k, n in others), kept


def test_layer_sparsity_fixes_the_head_dims_of_its_layer() -> None:
    """``--layer-sparsity`` sets the head dims of the layers it names, a target spreads the
    rest; at plain ``--sparsity`` too."""
    model = _model()
    pattern = [("blocks.1/attn/query", 0.75)]
    for asked in ({"target_macs": 0.6}, {"sparsity": 0.25}):
        result = onnx_fpgm.prune(model, **asked, layer_sparsity=pattern)
        check_pruned(model, result)
        kept = _dims_kept(result)
        qk1 = [v for k, v in kept.items() if "query" in k and "blocks.1" in k[-1]]
        assert qk1 == [(2, 8)], (asked, kept)


def test_keep_head_dims_still_keeps_them_under_a_target() -> None:
    model = _model()
    result = onnx_fpgm.prune(model, target_macs=0.5, keep_head_dims=True)
    check_pruned(model, result)
    assert all(v == (8, 8) for v in _dims_kept(result).values())
    assert result.report.after.macs / result.report.before.macs <= 0.5
