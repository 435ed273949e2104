"""The ``onnx-fpgm`` command line: exit codes, one-line errors, atomic OUT, IN never modified.

Contract: exit 0 done, 1 verification failed, 2 bad input or usage, 3 internal error. Every
error is ONE stderr line starting with ``onnx-fpgm: error:``, never a traceback. OUT is written
atomically (nothing partial or temporary is left in its directory on failure), IN is never
modified, and OUT == IN is refused however it is spelled.

Most cases call ``onnx_fpgm.cli.main.main`` in-process; ``test_subprocess_smoke`` runs the real
entry points once.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import onnx_fpgm.api
import onnx_fpgm.model.files
import onnx_fpgm.model.io
from onnx_fpgm.cli import main as cli
from onnx_fpgm.oracle.validate import CompareResult

from .onnx_patterns import PATTERNS

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


# --- helpers and fixtures ---------------------------------------------------------------------


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """conv1(8) -> bn1 -> relu1 -> head(4): conv1 is the one prunable group."""
    path = tmp_path / "models" / "in.onnx"
    path.parent.mkdir()
    onnx.save(PATTERNS["conv_bn_relu_conv"].build(), path)
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def run(capsys: pytest.CaptureFixture, *args: str | os.PathLike) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error(err: str, *fragments: str) -> str:
    """Exactly one stderr line, prefixed ``onnx-fpgm: error:``, holding every fragment."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnx-fpgm: error:"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(path: Path) -> bytes | list[str] | None:
    """Bytes of a file, names in a directory, None when absent: "IN untouched" compares these."""
    if path.is_dir():
        return sorted(p.name for p in path.iterdir())
    return path.read_bytes() if path.exists() else None


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def conv1_channels(path: Path) -> int:
    model = onnx.load(str(path))
    weights = {t.name: t for t in model.graph.initializer}
    # The consumer follows its producer: head's input channels equal conv1's output channels.
    assert weights["head.weight"].dims[1] == weights["conv1.weight"].dims[0]
    return weights["conv1.weight"].dims[0]


# --- happy paths ------------------------------------------------------------------------------


def test_prune_writes_out_and_prints_summary(capsys, model_file, out_dir):
    before = snapshot(model_file)
    out = out_dir / "out.onnx"
    code, stdout, stderr = run(capsys, model_file, out)
    assert code == 0, stderr
    assert stderr == ""
    for text in ("conv1", "->", "params:", "MACs:", "verify: passed", f"wrote {out}"):
        assert text in stdout, text
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert conv1_channels(out) == 4
    assert snapshot(model_file) == before
    assert tree(out_dir) == ["out.onnx"]  # no temporary file left next to OUT


def test_report_json_matches_written_model(capsys, model_file, out_dir):
    out, report = out_dir / "out.onnx", out_dir / "r.json"
    code, _, stderr = run(capsys, model_file, out, "--report", report)
    assert code == 0, stderr
    data = json.loads(report.read_text())
    assert {"layers", "groups", "coverage", "verification"} <= data.keys()
    assert data["verification"]["passed"] is True
    assert data["coverage"]["prunable_channels"] <= data["coverage"]["total_channels"]
    layer = next(entry for entry in data["layers"] if entry["name"] == "conv1")
    kept = layer["kept"]
    assert layer["channels_before"] == 8 and layer["channels_after"] == len(kept) == 4
    assert kept == sorted(set(kept)) and set(kept) <= set(range(8))
    # The reported indices are the ones actually kept: OUT's conv1 weight is W[kept].
    original = numpy_helper.to_array(
        next(t for t in onnx.load(str(model_file)).graph.initializer if t.name == "conv1.weight"))
    pruned = numpy_helper.to_array(
        next(t for t in onnx.load(str(out)).graph.initializer if t.name == "conv1.weight"))
    np.testing.assert_array_equal(pruned, original[kept])
    assert tree(out_dir) == ["out.onnx", "r.json"]


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
def test_quiet_prints_nothing(capsys, model_file, out_dir, flag):
    code, stdout, stderr = run(capsys, model_file, out_dir / "out.onnx", flag)
    assert (code, stdout, stderr) == (0, "", "")
    assert (out_dir / "out.onnx").is_file()


LONG_NAME = "StatefulPartitionedCall/functional_1/block5_conv3_with_a_long_scope/Conv2D"


@pytest.mark.parametrize("dry_run", [False, True], ids=["pruned_table", "dry_run_tables"])
def test_piped_tables_print_full_node_names(capsys, tmp_path, out_dir, dry_run):
    """Not a terminal (capsys): a long node name is printed whole on one line, not folded."""
    model = PATTERNS["conv_bn_relu_conv"].build()
    for node in model.graph.node:
        if node.name == "conv1":
            node.name = LONG_NAME
    source = tmp_path / "long.onnx"
    onnx.save(model, source)
    args = ["--dry-run"] if dry_run else [out_dir / "out.onnx"]
    code, stdout, _ = run(capsys, source, *args)
    assert code == 0
    assert any(LONG_NAME in line for line in stdout.splitlines())


@pytest.mark.parametrize("with_report", [False, True], ids=["plain", "with_report"])
def test_dry_run_writes_no_model(capsys, monkeypatch, tmp_path, model_file, with_report):
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    extra = ["--report", "r.json"] if with_report else []
    code, stdout, stderr = run(capsys, model_file, "--dry-run", *extra)
    assert code == 0, stderr
    assert "conv1" in stdout and "coverage:" in stdout
    assert "wrote" not in stdout and "verify:" not in stdout
    assert tree(tmp_path) == sorted(before + ["r.json"] if with_report else before)
    if with_report:
        assert {"layers", "groups", "coverage"} <= json.loads(Path("r.json").read_text()).keys()


def test_benchmark_prints_latency(capsys, model_file, out_dir):
    code, stdout, stderr = run(capsys, model_file, out_dir / "out.onnx", "--benchmark")
    assert code == 0, stderr
    line = next(line for line in stdout.splitlines() if "latency" in line)
    assert "speedup" in line or "speedup" in stdout  # rich may wrap the line


@pytest.mark.parametrize(
    ("options", "channels"),
    [
        (["--round-to", "8"], 8),
        (["--round-to", "2", "--sparsity", "0.3"], 6),
        (["--exclude", "conv1"], 8),
        (["--layer-sparsity", "conv1=0.25"], 6),
        (["--layer-sparsity", "nomatch=0.9"], 4),
        (["--sparsity", "0.9", "--min-channels", "3"], 3),
        (["--sparsity", "0"], 8),
        (["--dist", "1"], 4),
        (["--device", "cpu"], 4),
        (["--strict"], 4),
        (["--seed", "7"], 4),
        (["--no-verify"], 4),
    ],
    ids=["round_to_8", "round_to_2", "exclude", "layer_sparsity", "layer_sparsity_no_match",
         "min_channels", "sparsity_0", "dist_l1", "device_cpu", "strict", "seed", "no_verify"],
)
def test_options(capsys, model_file, out_dir, options, channels):
    out = out_dir / "out.onnx"
    code, stdout, stderr = run(capsys, model_file, out, *options)
    assert code == 0, stderr
    assert conv1_channels(out) == channels
    assert ("verify: passed" in stdout) == ("--no-verify" not in options)
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_input_shape_on_symbolic_batch(capsys, tmp_path, out_dir):
    source = tmp_path / "sym.onnx"
    onnx.save(PATTERNS["symbolic_batch"].build(), source)
    out = out_dir / "out.onnx"
    code, stdout, stderr = run(capsys, source, out, "--input-shape", "input=1,3,8,8")
    assert code == 0, stderr
    assert "MACs:" in stdout and "verify: passed" in stdout
    pruned = onnx.load(str(out))
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # stays symbolic
    assert conv1_channels(out) == 4


def _save_external(pattern: str, path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    onnx.save_model(PATTERNS[pattern].build(), str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)


@pytest.mark.parametrize(
    ("pattern", "data_file"),
    [("nchw_flatten_gemm", True), ("conv_bn_relu_conv", False)],
    ids=["data_file", "all_tensors_small"],  # save_model moves tensors >= 1 KiB out
)
def test_external_data_input(capsys, tmp_path, out_dir, pattern, data_file):
    """Weights stored as external data: OUT loads back, IN and its data file are untouched."""
    source = tmp_path / "ext" / "in.onnx"
    _save_external(pattern, source)
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    out = out_dir / "out.onnx"
    code, _, stderr = run(capsys, source, out, "--quiet")
    assert code == 0, stderr
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert next(t for t in pruned.graph.initializer if t.name == "conv1.weight").dims[0] == 4
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before
    assert tree(out_dir) == (["out.onnx", "out.onnx.data"] if data_file else ["out.onnx"])


def test_help_returns_zero(capsys):
    code, stdout, _ = run(capsys, "--help")
    assert code == 0 and "usage: onnx-fpgm" in stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_cuda(capsys, model_file, out_dir):
    code, _, stderr = run(capsys, model_file, out_dir / "out.onnx", "--device", "cuda")
    assert code == 0, stderr
    assert conv1_channels(out_dir / "out.onnx") == 4


# --- bad input: exit 2, one line, IN untouched, no OUT ----------------------------------------


def _checker_failure(path: Path, good: bytes, rng) -> None:
    model = onnx.load_from_string(good)
    model.graph.node[1].input[0] = "undefined_tensor"
    onnx.save(model, path)


def _short_weight(typed: bool):
    """The biggest weight's data one value short: checked apart from the light checker."""
    def make(path: Path, good: bytes, rng) -> None:
        model = onnx.load_from_string(good)
        weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        values = numpy_helper.to_array(weight).ravel()[:-1]
        weight.ClearField("raw_data")
        if typed:
            weight.float_data.extend(values.tolist())
        else:
            weight.raw_data = values.tobytes()
        path.write_bytes(model.SerializeToString())
    return make


def _no_opset(path: Path, good: bytes, rng) -> None:
    model = onnx.load_from_string(good)
    del model.opset_import[:]
    path.write_bytes(model.SerializeToString())


BAD_INPUTS = {
    "missing": (lambda path, good, rng: None, "no such file"),
    "directory": (lambda path, good, rng: path.mkdir(), "directory"),
    "empty": (lambda path, good, rng: path.write_bytes(b""), "empty"),
    "random_bytes": (lambda path, good, rng: path.write_bytes(rng.bytes(512)), "not"),
    "truncated": (lambda path, good, rng: path.write_bytes(good[: len(good) // 2]), "not"),
    "tensor_proto": (
        lambda path, good, rng: path.write_bytes(
            numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString()),
        "not"),
    "graph_proto": (
        lambda path, good, rng: path.write_bytes(onnx.load_from_string(good).graph
                                                 .SerializeToString()),
        "not an ONNX model"),
    "checker_failure": (_checker_failure, "onnx.checker"),
    "short_raw_weight": (_short_weight(typed=False), "onnx.checker"),
    "short_typed_weight": (_short_weight(typed=True), "onnx.checker"),
    "no_opset": (_no_opset, "opset"),
}


@pytest.mark.parametrize("kind", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input(capsys, tmp_path, out_dir, rng, kind):
    make, fragment = BAD_INPUTS[kind]
    source = tmp_path / "bad.onnx"
    make(source, PATTERNS["conv_bn_relu_conv"].build().SerializeToString(), rng)
    before = snapshot(source)
    code, stdout, stderr = run(capsys, source, out_dir / "out.onnx")
    assert code == 2
    assert_one_error(stderr, str(source), fragment)
    assert stdout == ""
    assert snapshot(source) == before
    assert tree(out_dir) == []


def _same_spelling(models: Path) -> tuple[str, str]:
    return "models/in.onnx", "models/in.onnx"


def _dot_dotdot(models: Path) -> tuple[str, str]:
    return "models/in.onnx", "./models/../models/in.onnx"


def _absolute(models: Path) -> tuple[str, str]:
    return "models/in.onnx", str(models.resolve() / "in.onnx")


def _symlink_out(models: Path) -> tuple[str, str]:
    (models / "link.onnx").symlink_to("in.onnx")
    return "models/in.onnx", "models/link.onnx"


def _symlink_in(models: Path) -> tuple[str, str]:
    (models / "link.onnx").symlink_to("in.onnx")
    return "models/link.onnx", "models/in.onnx"


def _hardlink(models: Path) -> tuple[str, str]:
    os.link(models / "in.onnx", models / "hard.onnx")
    return "models/in.onnx", "models/hard.onnx"


SAME_FILE = {"same_spelling": _same_spelling, "dot_dotdot": _dot_dotdot, "absolute": _absolute,
             "symlink_out": _symlink_out, "symlink_in": _symlink_in, "hardlink": _hardlink}


@pytest.mark.parametrize("spelling", list(SAME_FILE), ids=list(SAME_FILE))
def test_out_same_as_in_refused(capsys, monkeypatch, tmp_path, model_file, spelling):
    monkeypatch.chdir(tmp_path)
    source, target = SAME_FILE[spelling](model_file.parent)
    before, listing = snapshot(model_file), tree(model_file.parent)
    code, _, stderr = run(capsys, source, target)
    assert code == 2
    assert_one_error(stderr, "same file as IN")
    assert snapshot(model_file) == before
    assert tree(model_file.parent) == listing
    if spelling.startswith("symlink"):
        assert (model_file.parent / "link.onnx").is_symlink()


def test_out_in_missing_directory(capsys, tmp_path, model_file):
    target = tmp_path / "nowhere" / "out.onnx"
    code, _, stderr = run(capsys, model_file, target)
    assert code == 2
    assert_one_error(stderr, str(target.parent), "does not exist")
    assert not target.parent.exists()


def test_out_is_a_directory(capsys, model_file, out_dir):
    (out_dir / "sub").mkdir()
    code, _, stderr = run(capsys, model_file, out_dir / "sub")
    assert code == 2
    assert_one_error(stderr, "is a directory")
    assert tree(out_dir) == ["sub"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to a 0o500 directory anyway")
def test_out_directory_not_writable(capsys, model_file, out_dir):
    out_dir.chmod(0o500)
    try:
        code, _, stderr = run(capsys, model_file, out_dir / "out.onnx")
    finally:
        out_dir.chmod(0o700)
    assert code == 2
    assert_one_error(stderr, "not writable")
    assert tree(out_dir) == []


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (["--sparsity", "-0.1"], "sparsity"),
        (["--sparsity", "1.5"], "sparsity"),
        (["--sparsity", "nan"], "sparsity"),
        (["--sparsity", "inf"], "sparsity"),
        (["--sparsity", "abc"], "sparsity"),
        (["--layer-sparsity", "conv1"], "REGEX=S"),
        (["--layer-sparsity", "conv1=2"], "conv1"),
        (["--layer-sparsity", "conv[=0.5"], "regular expression"),
        (["--exclude", "("], "regular expression"),
        (["--input-shape", "input"], "NAME=D1,D2"),
        (["--input-shape", "input=1,x,8,8"], "NAME=D1,D2"),
        (["--input-shape", "input=0,3,8,8"], "NAME=D1,D2"),
        (["--input-shape", "=1,3,8,8"], "NAME=D1,D2"),
        (["--dist", "3"], "--dist"),
        (["--device", "tpu"], "--device"),
        (["--min-channels", "0"], "min_channels"),
        (["--round-to", "0"], "round_to"),
        (["--bogus"], "--bogus"),
    ],
    ids=["sparsity_negative", "sparsity_above_1", "sparsity_nan", "sparsity_inf",
         "sparsity_text", "layer_sparsity_no_equals", "layer_sparsity_above_1",
         "layer_sparsity_bad_regex", "exclude_bad_regex", "input_shape_no_equals",
         "input_shape_not_int", "input_shape_zero", "input_shape_no_name", "dist_3",
         "device_unknown", "min_channels_0", "round_to_0", "unknown_option"],
)
def test_bad_options(capsys, model_file, out_dir, options, fragment):
    before = snapshot(model_file)
    code, stdout, stderr = run(capsys, model_file, out_dir / "out.onnx", *options)
    assert code == 2
    assert_one_error(stderr, fragment)
    assert "usage:" not in stdout + stderr
    assert snapshot(model_file) == before
    assert tree(out_dir) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is available here")
def test_device_cuda_without_gpu(capsys, model_file, out_dir):
    code, _, stderr = run(capsys, model_file, out_dir / "out.onnx", "--device", "cuda")
    assert code == 2
    assert_one_error(stderr, "cuda", "no CUDA GPU")
    assert tree(out_dir) == []


@pytest.mark.parametrize(
    ("args", "fragment"),
    [([], "IN"), (["MODEL"], "OUT is required")],
    ids=["no_arguments", "no_out_without_dry_run"],
)
def test_missing_arguments(capsys, tmp_path, model_file, args, fragment):
    listing = tree(tmp_path)
    code, _, stderr = run(capsys, *[model_file if a == "MODEL" else a for a in args])
    assert code == 2
    assert_one_error(stderr, fragment)
    assert tree(tmp_path) == listing


@pytest.mark.parametrize(
    ("report", "dry_run", "fragment"),
    [("IN", False, "overwrite IN"), ("IN", True, "overwrite IN"),
     ("OUT", False, "overwrite OUT"), ("missing_dir", False, "does not exist"),
     ("missing_dir", True, "does not exist")],
    ids=["report_is_in", "report_is_in_dry_run", "report_is_out", "report_dir_missing",
         "report_dir_missing_dry_run"],
)
def test_bad_report_path(capsys, tmp_path, model_file, out_dir, report, dry_run, fragment):
    """A bad --report fails before anything is written (OUT included) and never touches IN."""
    out = out_dir / "out.onnx"
    path = {"IN": model_file, "OUT": out, "missing_dir": tmp_path / "nowhere" / "r.json"}[report]
    before = snapshot(model_file)
    args = [model_file, "--dry-run"] if dry_run else [model_file, out]
    code, _, stderr = run(capsys, *args, "--report", path)
    assert code == 2
    assert_one_error(stderr, fragment)
    assert snapshot(model_file) == before
    assert tree(out_dir) == []
    assert not (tmp_path / "nowhere").exists()


# --- failures while writing: exit 2, nothing left behind --------------------------------------


class _HalfWrittenFile:
    """A file that takes half of what is written, then reports a full disk."""

    def __init__(self, path, mode="r", *args, **kwargs):
        self._file = builtins.open(path, mode, *args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        raise ENOSPC

    def __getattr__(self, name):
        return getattr(self._file, name)


def _raise_enospc(*args, **kwargs):
    raise ENOSPC


DISK_FULL = {
    "write": ("os.fdopen", _HalfWrittenFile),
    "fsync": ("os.fsync", _raise_enospc),
    "rename": ("os.replace", _raise_enospc),
    "mkstemp": ("tempfile.mkstemp", _raise_enospc),
}


@pytest.mark.parametrize("where", list(DISK_FULL), ids=list(DISK_FULL))
def test_disk_full_leaves_nothing(capsys, monkeypatch, model_file, out_dir, where):
    attribute, replacement = DISK_FULL[where]
    owner, _, name = attribute.rpartition(".")
    monkeypatch.setattr(getattr(onnx_fpgm.model.files, owner), name, replacement)
    before = snapshot(model_file)
    out = out_dir / "out.onnx"
    code, _, stderr = run(capsys, model_file, out)
    monkeypatch.undo()
    assert code == 2
    assert_one_error(stderr, str(out_dir), "No space left on device")
    if where != "mkstemp":
        assert str(out) in stderr
    assert tree(out_dir) == []  # neither OUT nor a temporary directory or file
    assert snapshot(model_file) == before


def test_disk_full_with_external_data_leaves_no_data_file(capsys, monkeypatch, tmp_path, out_dir):
    """The new data file next to OUT is removed again when OUT itself cannot be renamed."""
    source = tmp_path / "ext" / "in.onnx"
    _save_external("nchw_flatten_gemm", source)
    real_replace, renamed = os.replace, []

    def replace(src, dst):
        if str(dst).endswith(".onnx"):
            raise ENOSPC
        renamed.append(Path(dst).name)
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_fpgm.model.files.os, "replace", replace)
    code, _, stderr = run(capsys, source, out_dir / "out.onnx")
    monkeypatch.undo()
    assert code == 2
    assert_one_error(stderr, "No space left on device")
    assert renamed == []  # the data file is created under its own name, never renamed
    assert tree(out_dir) == []


def test_report_disk_full_leaves_no_temp_file(capsys, monkeypatch, tmp_path, model_file,
                                              out_dir):
    reports = tmp_path / "reports"
    reports.mkdir()
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise ENOSPC
        return real_replace(src, dst)

    monkeypatch.setattr(onnx_fpgm.model.files.os, "replace", replace)
    code, _, stderr = run(capsys, model_file, out_dir / "out.onnx",
                          "--report", reports / "r.json")
    monkeypatch.undo()
    assert code == 2
    assert_one_error(stderr, str(reports / "r.json"), "No space left on device")
    assert tree(reports) == []


# --- interrupts, verification failure, internal errors ----------------------------------------


def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize(
    ("target", "exc", "code", "fragment"),
    [
        ("api.plan_pruning", KeyboardInterrupt(), 2, "interrupted"),
        ("model.files.os.fsync", KeyboardInterrupt(), 2, "interrupted"),
        ("api.plan_pruning", MemoryError(), 2, "out of memory"),
        ("api.apply_plan", RuntimeError("boom\nsecond line"), 3,
         "internal error (RuntimeError: boom)"),
        ("model.export.export_graph", KeyError("lost"), 3, "internal error (KeyError"),
        ("api.apply_plan", onnx_fpgm.RewriteError("cannot slice w of conv on axis 1"), 3,
         "internal error: cannot slice w of conv on axis 1; please report it"),
    ],
    ids=["interrupt_while_planning", "interrupt_while_saving", "out_of_memory",
         "internal_runtime_error", "internal_key_error", "rewrite_error_is_ours"],
)
def test_unexpected_exceptions(capsys, monkeypatch, model_file, out_dir, target, exc, code,
                               fragment):
    owner, _, name = target.rpartition(".")
    obj = onnx_fpgm
    for part in owner.split("."):
        obj = getattr(obj, part)
    monkeypatch.setattr(obj, name, _raise(exc))
    before = snapshot(model_file)
    result, _, stderr = run(capsys, model_file, out_dir / "out.onnx")
    monkeypatch.undo()
    assert result == code
    line = assert_one_error(stderr, fragment)
    assert "second line" not in line
    assert tree(out_dir) == []
    assert snapshot(model_file) == before


def test_verification_failure_exits_1(capsys, monkeypatch, model_file, out_dir):
    monkeypatch.setattr(onnx_fpgm.api, "_verify",
                        lambda *args, **kwargs: CompareResult(problem="forced"))
    report = out_dir / "r.json"
    code, _, stderr = run(capsys, model_file, out_dir / "out.onnx", "--report", report)
    assert code == 1
    assert_one_error(stderr, "verification failed", "forced")
    assert tree(out_dir) == []


def test_no_verify_skips_the_oracle(capsys, monkeypatch, model_file, out_dir):
    monkeypatch.setattr(onnx_fpgm.api, "_verify",
                        lambda *args, **kwargs: CompareResult(problem="forced"))
    code, _, stderr = run(capsys, model_file, out_dir / "out.onnx", "--no-verify")
    assert code == 0, stderr
    assert tree(out_dir) == ["out.onnx"]


# --- real processes ---------------------------------------------------------------------------


def _launcher(kind: str) -> list[str]:
    if kind == "module":
        return [sys.executable, "-m", "onnx_fpgm"]
    script = (shutil.which("onnx-fpgm", path=str(Path(sys.executable).parent))
              or shutil.which("onnx-fpgm"))
    if script is None:
        pytest.skip("onnx-fpgm console script is not installed")
    return [script]


@pytest.mark.parametrize("kind", ["module", "console_script"],
                         ids=["python_-m", "console_script"])
def test_subprocess_smoke(tmp_path, model_file, out_dir, kind):
    command = _launcher(kind)
    out = out_dir / "out.onnx"
    done = subprocess.run([*command, str(model_file), str(out)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "verify: passed" in done.stdout
    assert out.is_file()
    failed = subprocess.run([*command, str(tmp_path / "missing.onnx"), str(out_dir / "x.onnx")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert failed.returncode == 2
    assert_one_error(failed.stderr, "no such file")
    assert failed.stdout == ""
