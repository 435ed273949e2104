"""``onnx-fpgm sweep``: JSON and table output, the plot and its optional extra, and the
subcommand living beside positional ``IN OUT``."""
from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fpgm.cli import main as cli

from .onnx_patterns import PATTERNS


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "in.onnx"
    onnx.save(PATTERNS["concat_skip"].build(), path)
    return path


def _data(tmp_path: Path, model_file: Path, name: str, seed: int) -> str:
    model = onnx.load(model_file)
    shape = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    path = tmp_path / name
    np.savez(path, input=rng.standard_normal((8, *shape[1:])).astype(np.float32))
    return str(path)


def test_sweep_writes_json_and_table(tmp_path, model_file, capsys) -> None:
    calib = _data(tmp_path, model_file, "calib.npz", 0)
    held_out = _data(tmp_path, model_file, "eval.npz", 1)
    out = tmp_path / "sweep.json"
    code = cli.main(["sweep", str(model_file), "--targets", "0.8,0.5,0.001", "--calibration",
                     calib, "--eval", held_out, "--json", str(out), "--runs", "3"])
    text = capsys.readouterr().out
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["fidelity_on"] == "evaluation"
    points = data["points"]
    assert {p["allocation"] for p in points} == {"uniform", "global", "sensitivity"}
    assert len(points) == 9
    for p in points:
        if p["target"] == 0.001:
            assert "not reachable" in p["error"] and p["macs"] is None
            continue
        assert p["error"] is None
        assert p["macs"] <= p["target"] + 1e-12
        assert 0 < p["cosine"] <= 1 + 1e-9 and p["latency_ms"] > 0 and p["speedup"] > 0
    assert "Sweep of" in text and "unreachable" in text and "best reachable" in text


def test_sweep_plot(tmp_path, model_file) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    code = cli.main(["sweep", str(model_file), "--targets", "0.8,0.6", "--plot", str(png),
                     "--runs", "2", "--allocations", "uniform", "--quiet"])
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(tmp_path, model_file, capsys,
                                                 monkeypatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    code = cli.main(["sweep", str(model_file), "--plot", str(tmp_path / "s.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "onnx-fpgm: error: --plot needs matplotlib: pip install 'onnx-fpgm[plot]'"
    assert not (tmp_path / "s.png").exists()


def test_sensitivity_sweep_needs_calibration(model_file, capsys) -> None:
    code = cli.main(["sweep", str(model_file), "--allocations", "sensitivity"])
    assert code == 2 and "needs --calibration" in capsys.readouterr().err


def test_positional_in_out_still_works_and_a_file_named_sweep(tmp_path, model_file,
                                                              capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.replace(model_file, tmp_path / "sweep")
    # `sweep` first is the subcommand; the error for a missing IN points to ./sweep.
    code = cli.main(["sweep", "out.onnx"])
    assert code == 2
    assert "write ./sweep" in capsys.readouterr().err
    assert cli.main(["./sweep", "out.onnx", "--quiet"]) == 0
    assert onnx.load("out.onnx").graph.node
    assert cli.main(["sweep", "--help"]) == 0
    assert "--targets" in capsys.readouterr().out
