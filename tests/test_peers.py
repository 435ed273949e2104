"""Parameter reduction at sparsity 0.5 versus the ONNX-native peer (onnxsim's structured pruning).

onnxsim is an optional peer (extra ``peers``); without it these tests are skipped.
"""
from __future__ import annotations

import pytest

import onnx_fpgm
from onnx_fpgm.measure.bench import count_params
from tests.test_zoo import EXPORTERS, _model
from tests.torch_models import ZOO

pruning = pytest.importorskip("onnxsim.pruning", reason="peer onnxsim not installed")

CASES = [(n, e) for n in ZOO for e in EXPORTERS]


@pytest.mark.torch_export
@pytest.mark.parametrize("name,exporter", CASES, ids=[f"{n}-{e}" for n, e in CASES])
def test_param_reduction_at_least_the_peers(name: str, exporter: str) -> None:
    model = _model(name, exporter)
    before = count_params(model)
    ours = onnx_fpgm.prune(model, 0.5).report.after.params
    try:
        peer = count_params(pruning.apply_structured_pruning(model, 0.5))
    except Exception as err:  # the peer refusing a model counts as "no reduction"
        peer = before
        print(f"peer failed on {name}-{exporter}: {err}")
    print(f"{name}-{exporter}: params {before} -> ours {ours}, peer {peer}")
    assert before - ours >= before - peer
