"""Sensitivity probes that run only the part of the model downstream of the probed group give
the losses of whole-model probes, and that part holds only what the group can change."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_fpgm
from onnx_fpgm.api import _scorer
from onnx_fpgm.config import PruneConfig
from onnx_fpgm.measure.calibration import Calibration
from onnx_fpgm.planning.allocate import SENSITIVITY_LEVELS
from onnx_fpgm.planning.downstream import downstream_part
from onnx_fpgm.planning.plan import n_to_keep
from onnx_fpgm.planning.sensitivity import build_masked_model, measure_sensitivity
from tests.onnx_patterns import _Net


def _chain_with_side_output() -> onnx.ModelProto:
    """conv1 -> conv2 -> conv3 -> head ("output"); conv1's activation also feeds a second
    output ("side"), which no group after conv1 reaches."""
    n = _Net(18)
    r1 = n.relu("relu1", n.conv("conv1", "input", 3, 8))
    r2 = n.relu("relu2", n.conv("conv2", r1, 8, 8))
    r3 = n.relu("relu3", n.conv("conv3", r2, 8, 8))
    n.head(r3, 8)
    n.conv("side", r1, 8, 4, k=1, out="side")
    return n.model({"output": ["N", 4, 8, 8], "side": ["N", 4, 8, 8]},
                   {"input": ["N", 3, 8, 8]})


def _setup():
    model = _chain_with_side_output()
    analysis = onnx_fpgm.prune(model, 0.0, verify=False).analysis
    units = [[g] for g in analysis.groups if not g.frozen]
    select = _scorer(PruneConfig(), model, analysis)
    data = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    return model, analysis, units, select, Calibration({"input": data})


def _counts(unit, level):
    return [n_to_keep(g.n_channels, level, 1, None) for g in unit]


@pytest.mark.parametrize("update", [False, True], ids=["plain", "obs-updated"])
def test_downstream_probes_equal_whole_model_probes(update: bool) -> None:
    model, analysis, units, select, calibration = _setup()
    assert len(units) == 3
    losses = [measure_sensitivity(model, analysis, units, SENSITIVITY_LEVELS, select,
                                  calibration, _counts, samples=16, harmful=None, cheap=None,
                                  update=update, downstream=downstream)
              for downstream in (False, True)]
    assert losses[0].min() > 0
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)


def test_part_holds_only_what_the_group_reaches() -> None:
    model, analysis, units, _, _ = _setup()
    masked = build_masked_model(model, analysis)
    proto = onnx.load_from_string(masked.proto)
    fed = set(masked.masks)
    by_producer = {unit[0].producers[0]: unit for unit in units}
    parts = {}
    for name in ("conv1", "conv3"):
        atoms = analysis.removed_atoms(by_producer[name][0].classes)
        changed = {m for m, (labels, _, _) in masked.masks.items() if atoms[labels].any()}
        parts[name] = downstream_part(proto, changed, fed)
    last = parts["conv3"]
    assert [node.op_type for node in last.nodes] == ["Mul", "Conv"]  # the mask, then the head
    assert last.outputs == [0]  # "side" is not recomputed: the reference's is used
    assert last.crossing == ["relu3_out"]
    first = parts["conv1"]
    assert first.outputs == [0, 1] and first.crossing == ["relu1_out"]
    assert "conv1" not in {node.name for node in first.nodes}
