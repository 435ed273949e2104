"""The ``--runs`` grammar of the real-model studies (``benchmarks/prune_runs.py``).

``benchmarks/`` is scripts, not a package: the module is loaded from its file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "prune_runs.py"
_SPEC = importlib.util.spec_from_file_location("prune_runs", _PATH)
prune_runs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(prune_runs)


def test_runs_are_parsed_in_order_with_their_fields() -> None:
    runs = prune_runs.parse_runs("sensitivity/obs/sequential/none, uniform/fpgm/lstsq/distill,")
    assert [r.label() for r in runs] == ["sensitivity/obs/sequential/none",
                                         "uniform/fpgm/lstsq/distill"]
    assert runs[0].allocation == "sensitivity" and runs[0].compensate == "sequential"
    assert runs[1].criterion == "fpgm" and runs[1].recover == "distill"


@pytest.mark.parametrize("text,says", [
    ("sensitivity/obs/obs", "want allocation/criterion/compensate/recover"),
    ("uniform/fpgm/none/none/none", "want allocation/criterion/compensate/recover"),
    ("uniform/fgpm/none/none", "criterion must be one of"),
    ("sensitive/obs/obs/none", "allocation must be one of"),
    ("uniform/obs/ols/none", "compensate must be one of"),
    ("uniform/obs/obs/finetune", "recover must be one of"),
    (" , ", "no run given"),
])
def test_a_malformed_run_is_refused_before_any_pruning(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        prune_runs.parse_runs(text)
