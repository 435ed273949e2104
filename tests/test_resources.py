"""Resource budgets (issue 19): the tool answers clearly, within a memory cap and a time limit,
on models that cost far more to run or score than their file size says.

The CLI runs in a child under ``RLIMIT_AS`` (its peak resident memory read back by ``wait4``):
token attention over the H*W pixels of a dynamic-size image (the size probe skips sizes whose
activations would not fit), and a 300k-output Gemm (FPGM's ``O(N^2 D)`` scoring is estimated
and the group left whole, where scoring it took minutes; wider ones cost the analysis seconds).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

import onnx_fpgm
import onnx_fpgm.oracle.sized_shapes
from onnx_fpgm.cli import main as cli
from onnx_fpgm.deps.reasons import classify
from onnx_fpgm.importance.cost import fpgm_cost
from onnx_fpgm.importance.group import group_filters, group_width

from .attention_models import build_deit_like
from .hostile_inputs import ROOT, conv_model, digest, one_error_line
from .resource_models import token_attention_model, wide_gemm_model
from .torch_models import export_onnx

GIB = 1 << 30
#: The child's address-space cap: torch and onnxruntime reserve ~0.9 GiB of it on 2 cores
#: (thread stacks and malloc arenas grow with the cores); the fixed run peaks at ~1.1 GiB
#: resident, the unfixed one at 3.3 GiB before onnxruntime's allocation failed.
CAP = int(4.5 * GIB) + (os.cpu_count() or 1) * (64 << 20)


def run_capped(*args: str | os.PathLike, tmp_path: Path, timeout: float
               ) -> tuple[int | None, str, str, int, float]:
    """``python -m onnx_fpgm ARGS`` under ``CAP``: (exit code or None when killed at
    ``timeout``, stdout, stderr, peak resident bytes, seconds)."""
    # the cap is set by the child itself: a preexec_fn is unsafe in a parent with threads
    capped = ("import resource, runpy, sys; "
              f"resource.setrlimit(resource.RLIMIT_AS, ({CAP}, {CAP})); "
              "sys.argv[0] = 'onnx_fpgm'; runpy.run_module('onnx_fpgm', run_name='__main__')")
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    started = time.monotonic()
    with out.open("w") as stdout, err.open("w") as stderr:
        child = subprocess.Popen([sys.executable, "-c", capped, *map(str, args)],
                                 stdout=stdout, stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        code = None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - started > timeout:
                child.kill()
                _, _, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
        child.returncode = code if code is not None else -9  # reaped here, not by Popen
    return (code, out.read_text(), err.read_text(), usage.ru_maxrss * 1024,
            time.monotonic() - started)


def test_token_attention_over_dynamic_sizes_is_sized_within_memory(tmp_path):
    """At 96 x 96 with a batch of 2 the (N, heads, HW, HW) attention is 2.7 GB a tensor: the
    size probe judges each candidate's activations first and skips that one."""
    source = tmp_path / "attention.onnx"
    onnx.save(token_attention_model(), source)
    code, stdout, stderr, peak, _ = run_capped(
        source, tmp_path / "out.onnx", tmp_path=tmp_path, timeout=120)
    assert code == 0, stderr
    assert "skipped for their activation memory" in stdout
    assert peak < 2 * GIB, f"peak resident memory {peak / GIB:.2f} GiB"
    assert onnx.load(str(tmp_path / "out.onnx")).graph.node


def test_wide_gemm_is_left_whole_with_its_scoring_cost(tmp_path):
    """300k filters of 4 weights: 9e10 distance pairs, minutes of scoring. The estimate
    (1.2e13 work units, over the 1e13 budget) leaves the group whole and says how to prune it."""
    source = tmp_path / "wide.onnx"
    onnx.save(wide_gemm_model(300_000), source)
    code, stdout, stderr, peak, seconds = run_capped(
        source, tmp_path / "out.onnx", "--no-verify", tmp_path=tmp_path, timeout=60)
    assert code == 0, f"exit {code} after {seconds:.0f} s: {stderr[-300:]}"
    assert "scoring by FPGM would take" in stdout and "--criterion l2" in stdout
    assert peak < 2 * GIB


def test_every_size_over_the_memory_budget_is_exit_2(capsys, monkeypatch, tmp_path):
    source = tmp_path / "attention.onnx"
    onnx.save(token_attention_model(), source)
    monkeypatch.setattr(onnx_fpgm.oracle.sized_shapes, "available_bytes", lambda: 1 << 12)
    before = digest(tmp_path)
    code = cli.main([str(source), str(tmp_path / "out.onnx")])
    assert code == 2
    one_error_line(capsys.readouterr().err, "every size tried", "--input-shape")
    assert digest(tmp_path) == before


def test_scoring_budget_freezes_the_group_with_a_documented_reason():
    result = onnx_fpgm.prune(conv_model(filters=64), 0.5, max_scoring_work=1e5)
    (frozen,) = [g.frozen for g in result.report.groups
                 if g.frozen and not g.frozen.startswith("reaches graph output")]
    assert "scoring by FPGM would take ~6.3e+05 multiply-adds (64 x 64 distances" in frozen
    assert classify(frozen).title == "scoring cost"
    assert result.plan.n_removed == 0
    # a norm criterion costs O(N D): no budget applies
    assert onnx_fpgm.prune(conv_model(filters=64), 0.5, criterion="l2",
                           max_scoring_work=1e5).plan.n_removed


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), True, "1e13"])
def test_scoring_budget_must_be_positive(value):
    with pytest.raises(onnx_fpgm.ConfigError, match="max_scoring_work"):
        onnx_fpgm.PruneConfig(max_scoring_work=value)


def test_scoring_cost_lets_real_layers_through():
    """VGG's 4096 x 25088 classifier (4.6 s) and a 70B LLM's 28672 x 8192 MLP fit; 300k and
    1M short filters do not."""
    budget = onnx_fpgm.PruneConfig().max_scoring_work
    for n, d in ((4096, 25088), (28672, 8192), (512, 4608)):
        assert fpgm_cost(n, d).over(budget, 64 * GIB) is None
    for n, d in ((300_000, 4), (1_000_000, 4)):
        assert fpgm_cost(n, d).over(budget, 64 * GIB)
    # a callable distance gets the whole N x N matrix: 65536 filters need ~96 GiB of it
    assert "would need" in fpgm_cost(65536, 64, dist=lambda x: x).over(None, 64 * GIB)
    assert fpgm_cost(65536, 64).over(None, 64 * GIB) is None  # blocks of ~1M elements


def test_group_width_is_the_scored_matrix_width():
    """Estimated without building: heads (several rows per channel) and joint groups."""
    analysis = onnx_fpgm.prune(export_onnx(*build_deit_like()), 0.5).analysis
    widths = [(group_width(analysis, g), group_filters(analysis, g).shape[1])
              for g in analysis.groups]
    assert len(widths) > 3
    assert all(a == b for a, b in widths), widths
    assert any(len(g.members) > 1 for g in analysis.groups)
    assert any(g.heads for g in analysis.groups)
