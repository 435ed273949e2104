"""The tool's promise under hostile or careless use (issue 19): IN is never modified, OUT is
written as a pair a reader sees whole or not at all, a bad input is exit 2 with one line, and
nothing outside the intended paths is touched.

Every case runs inside a sentinel folder whose every byte is compared before and after
(``hostile_inputs.digest``); generators are in ``tests/hostile_inputs.py``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_fpgm
import onnx_fpgm.measure.calibration
import onnx_fpgm.model.mapped
from onnx_fpgm.cli import main as cli

from .hostile_inputs import (
    conv_model,
    digest,
    if_body_model,
    nested_json,
    one_error_line,
    outputs,
    retarget,
    run_cli,
    save_external,
    sparse_model,
    start_cli,
    training_info_model,
)


@pytest.fixture
def ext(tmp_path: Path) -> Path:
    """A model with external data: ``src/in.onnx`` + ``src/in.onnx.data``."""
    return save_external(conv_model(), tmp_path / "src" / "in.onnx")


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, root: Path, *args, fragments=()) -> str:
    """Exit 2, one error line, every file under ``root`` exactly as before."""
    before = digest(root)
    code, _, stderr = run(capsys, *args)
    assert code == 2, stderr
    line = one_error_line(stderr, *fragments)
    assert digest(root) == before
    return line


# --- 1. output collides with an input ---------------------------------------------------------


def _collisions(root: Path, source: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    data = source.with_name("in.onnx.data")
    sibling_in = save_external(conv_model(), root / "odd" / "x.onnx", location="out.onnx.data")
    model_named_data = save_external(conv_model(), root / "odd2" / "o.onnx.data",
                                     location="weights.bin")
    calib = root / "calib.npz"
    np.savez(calib, input=np.zeros((2, 3, 8, 8), np.float32))
    return {
        "out_is_in_data": ([source, data], ("OUT", "IN's data file")),
        "out_data_is_in_data": ([sibling_in, sibling_in.with_name("out.onnx")],
                                ("OUT's data file", "IN's data file")),
        "out_data_is_in": ([model_named_data, model_named_data.with_name("o.onnx")],
                           ("OUT's data file", "IN")),
        "report_is_in_data": ([source, root / "o.onnx", "--report", data], ("--report",)),
        "dry_run_report_is_in_data": ([source, "--dry-run", "--report", data], ("--report",)),
        "out_is_calibration": ([source, calib, "--calibration", calib], ("--calibration",)),
        "report_is_out_data": ([source, root / "o.onnx", "--report", root / "o.onnx.data"],
                               ("--report", "OUT's data file")),
        "sweep_json_is_in_data": (["sweep", source, "--targets", "0.5", "--runs", "0",
                                   "--json", data], ("--json",)),
        "sweep_plot_is_in": (["sweep", source, "--targets", "0.5", "--runs", "0",
                              "--plot", source], ("--plot", "IN")),
    }


COLLISIONS = ["out_is_in_data", "out_data_is_in_data", "out_data_is_in", "report_is_in_data",
              "dry_run_report_is_in_data", "out_is_calibration", "report_is_out_data",
              "sweep_json_is_in_data", "sweep_plot_is_in"]


@pytest.mark.parametrize("case", COLLISIONS)
def test_output_colliding_with_an_input_is_refused(capsys, tmp_path, ext, case):
    args, fragments = _collisions(tmp_path, ext)[case]
    line = assert_refused(capsys, tmp_path, *args, fragments=("same file as", *fragments))
    assert "refusing to overwrite" in line


def test_collision_through_a_symlink_is_refused(capsys, tmp_path, ext):
    link = tmp_path / "report.json"
    link.symlink_to(ext.with_name("in.onnx.data"))
    assert_refused(capsys, tmp_path, ext, tmp_path / "o.onnx", "--report", link,
                   fragments=("--report", "IN's data file"))


def test_out_data_of_another_model_is_never_replaced(capsys, tmp_path, ext):
    other = save_external(conv_model(seed=1), tmp_path / "out" / "other.onnx",
                          location="out.onnx.data")
    before = outputs(other)
    assert_refused(capsys, tmp_path, ext, tmp_path / "out" / "out.onnx",
                   fragments=("out.onnx.data", "another model"))
    np.testing.assert_array_equal(outputs(other)["output"], before["output"])


# --- odd files: FIFOs, directories ------------------------------------------------------------


@pytest.mark.parametrize("option", ["--plan", "--calibration", "--eval"])
def test_fifo_input_is_refused_without_blocking(tmp_path, ext, option):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = digest(tmp_path)
    done = run_cli(ext, tmp_path / "o.onnx", option, fifo, timeout=30)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, option, "FIFO")
    assert digest(tmp_path) == before


@pytest.mark.parametrize("what", ["out_fifo", "report_dir"])
def test_output_that_is_not_a_regular_file_is_refused(capsys, tmp_path, ext, what):
    odd = tmp_path / "odd"
    os.mkfifo(odd) if what == "out_fifo" else odd.mkdir()
    args = [ext, odd] if what == "out_fifo" else [ext, tmp_path / "o.onnx", "--report", odd]
    assert_refused(capsys, tmp_path, *args,
                   fragments=("FIFO" if what == "out_fifo" else "a directory",))


# --- 2. temp files and the atomic pair --------------------------------------------------------


def test_planted_temp_symlink_is_not_followed(capsys, tmp_path, ext):
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("precious")
    (tmp_path / ".r.json.tmp").symlink_to(sentinel / "keep.txt")
    (tmp_path / ".o.onnx.tmp").symlink_to(sentinel / "keep.txt")
    code, _, stderr = run(capsys, ext, tmp_path / "o.onnx", "--report", tmp_path / "r.json",
                          "-q")
    assert code == 0, stderr
    assert (sentinel / "keep.txt").read_text() == "precious"
    assert (tmp_path / ".r.json.tmp").is_symlink() and (tmp_path / ".o.onnx.tmp").is_symlink()
    assert onnx.load(str(tmp_path / "o.onnx"))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_second_run_replaces_the_pair_and_removes_only_its_own_old_data(capsys, tmp_path, ext):
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    keep = out.parent / "out.onnx.notes"  # a stranger file named like ours: never touched
    keep.write_text("mine")
    assert run(capsys, ext, out, "--sparsity", "0.25", "-q")[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data",
                                                           "out.onnx.notes"]
    assert run(capsys, ext, out, "--sparsity", "0.125", "-q")[0] == 0
    names = sorted(p.name for p in out.parent.iterdir())
    assert len(names) == 3 and "out.onnx.data" not in names, names  # old data gone
    assert keep.read_text() == "mine"
    onnx.checker.check_model(str(out), full_check=True)
    weights = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert weights["conv1.weight"].dims[0] == 14
    assert run(capsys, ext, out, "--sparsity", "0.25", "-q")[0] == 0  # and back
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data",
                                                           "out.onnx.notes"]


@pytest.mark.parametrize(("step", "new"), [("data-written", False), ("OUT-written", False),
                                           ("OUT-renamed", True)])
def test_killed_between_steps_a_reader_sees_one_whole_pair(capsys, tmp_path, ext, step, new):
    """The process exits at once at ``step`` (test hook ``ONNX_FPGM_CRASH_AT``): OUT is the old
    pair or the new one, whole, never the old OUT with new data."""
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    reference = {}
    for sparsity in ("0.125", "0.25"):
        ref = tmp_path / f"ref{sparsity}" / "ref.onnx"
        ref.parent.mkdir()
        assert run(capsys, ext, ref, "--sparsity", sparsity, "-q", "--no-verify")[0] == 0
        reference[sparsity] = outputs(ref)["output"]
    assert run(capsys, ext, out, "--sparsity", "0.25", "-q", "--no-verify")[0] == 0
    done = run_cli(ext, out, "--sparsity", "0.125", "-q", "--no-verify",
                   env={"ONNX_FPGM_CRASH_AT": step})
    assert done.returncode == 70, done.stderr  # it did crash there
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(outputs(out)["output"], reference["0.125" if new else "0.25"])


def test_two_runs_writing_one_out_leave_one_complete_pair(tmp_path, ext):
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    runs = [start_cli(ext, out, "--sparsity", s, "-q", "--no-verify") for s in ("0.25", "0.125")]
    for child in runs:
        _, stderr = child.communicate(timeout=120)
        assert child.returncode == 0, stderr
    onnx.checker.check_model(str(out), full_check=True)
    weights = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert weights["conv1.weight"].dims[0] in (12, 14)
    assert np.isfinite(outputs(out)["output"]).all()
    assert _leftovers(out.parent) == []


# --- 3. OUT always carries its own data -------------------------------------------------------


@pytest.mark.parametrize("form", ["nothing_pruned", "weights_in_if_bodies"])
def test_mapped_input_out_carries_its_own_data(capsys, monkeypatch, tmp_path, form):
    """A memory-mapped input whose weights reach OUT unread (nothing pruned; If bodies): OUT
    must not reference IN's data file name, which in OUT's folder is an unrelated file."""
    model = conv_model(filters=64) if form == "nothing_pruned" else if_body_model()
    source = save_external(model, tmp_path / "src" / "in.onnx")
    options = ["--sparsity", "0"] if form == "nothing_pruned" else []
    reference = tmp_path / "ref" / "ref.onnx"  # the same prune, weights read in (not mapped)
    reference.parent.mkdir()
    assert run(capsys, source, reference, *options, "-q")[0] == 0
    out = tmp_path / "out" / "out.onnx"
    out.parent.mkdir()
    decoy = out.parent / "in.onnx.data"
    decoy.write_bytes(np.random.default_rng(9).bytes(source.with_name("in.onnx.data")
                                                     .stat().st_size))
    monkeypatch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1)
    code, _, stderr = run(capsys, source, out, *options, "-q")
    assert code == 0, stderr
    locations = {e.value for t in onnx.external_data_helper._get_all_tensors(
        onnx.load(str(out), load_external_data=False)) for e in t.external_data
        if e.key == "location"}
    assert locations and all(loc.startswith("out.onnx") for loc in locations), locations
    np.testing.assert_array_equal(outputs(out)["output"], outputs(reference)["output"])


# --- 4. names are text: no markup, no raw control characters ----------------------------------


@pytest.mark.parametrize("name", ["conv[/evil]1", "conv[bold]1[/bold]", "conv\x1b]0;pwned\x07",
                                  "conv\x1b[31mred\nsecond"],
                         ids=["closing_tag", "markup", "osc_title", "ansi_newline"])
def test_crafted_node_names_print_as_text(capsys, tmp_path, name):
    source = tmp_path / "in.onnx"
    onnx.save(conv_model(name=name), source)
    out = tmp_path / "out.onnx"
    for args in ([source, out, "--report", tmp_path / "r.json"], [source, "--dry-run"]):
        code, stdout, stderr = run(capsys, *args)
        assert code == 0, stderr
        assert "\x1b" not in stdout + stderr and "\x07" not in stdout + stderr
        shown = name.encode("unicode_escape").decode("ascii")
        assert shown in stdout, stdout
    assert {n.name for n in onnx.load(str(out)).graph.node} >= {name}


# --- 5. bad input is exit 2 with the reason, never exit 3 -------------------------------------


def _plan(tmp_path: Path, kept) -> Path:
    path = tmp_path / f"plan{len(list(tmp_path.glob('plan*')))}.json"
    path.write_text(json.dumps({"layers": [{"name": "conv1", "channels_before": 16,
                                            "kept": kept}]}))
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list, str]]:
    good = tmp_path / "good.onnx"
    onnx.save(conv_model(), good)
    negative = tmp_path / "negative.onnx"
    onnx.save(conv_model(dims=[-16, -3, 3, 3]), negative)
    sparse = tmp_path / "sparse.onnx"
    onnx.save(sparse_model(), sparse)
    deep = tmp_path / "deep.json"
    deep.write_text(nested_json(5_000_000))  # 10 MB
    npy = tmp_path / "calib.npy"
    np.save(npy, np.zeros((2, 3, 8, 8), np.float32))
    return {
        "negative_dims": (negative, [], "negative dims"),
        "sparse_initializer": (sparse, [], "sparse initializer"),
        "deep_json_plan": (good, ["--plan", deep], "nested too deeply"),
        "npy_as_calibration": (good, ["--calibration", npy], "numpy.savez"),
        "plan_bool_indices": (good, ["--plan", _plan(tmp_path, [True, False])], "integers"),
        "plan_out_of_range": (good, ["--plan", _plan(tmp_path, [0, 16])], "0..15"),
        "plan_duplicates": (good, ["--plan", _plan(tmp_path, [1, 1, 2])], "unique and sorted"),
        "plan_unsorted": (good, ["--plan", _plan(tmp_path, [3, 1, 2])], "unique and sorted"),
    }


BAD_INPUTS = ["negative_dims", "sparse_initializer", "deep_json_plan", "npy_as_calibration",
              "plan_bool_indices", "plan_out_of_range", "plan_duplicates", "plan_unsorted"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_exit_2_with_its_reason(capsys, tmp_path, case):
    source, options, fragment = _bad_inputs(tmp_path)[case]
    assert_refused(capsys, tmp_path, source, tmp_path / "out.onnx", *options,
                   fragments=(fragment,))


def test_zero_filters_are_refused_without_hanging(tmp_path):
    source = tmp_path / "zero.onnx"
    onnx.save(conv_model(filters=0), source)
    before = digest(tmp_path)
    done = run_cli(source, tmp_path / "out.onnx", timeout=30)
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "empty weight")
    assert digest(tmp_path) == before


def test_calibration_names_and_sizes_are_judged_before_decompressing(capsys, monkeypatch,
                                                                     tmp_path):
    source = tmp_path / "in.onnx"
    onnx.save(conv_model(), source)
    calib = tmp_path / "calib.npz"
    np.savez_compressed(calib, input=np.zeros((64, 3, 8, 8), np.float32))
    monkeypatch.setattr(onnx_fpgm.measure.calibration, "_budget_bytes", lambda: 1 << 12)
    read = []
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__",
                        lambda self, key: read.append(key))
    assert_refused(capsys, tmp_path, source, tmp_path / "o.onnx", "--calibration", calib,
                   fragments=("declare", "bytes decompressed"))
    assert read == []


# --- 6. memory-mapped loading: one checked descriptor per data file ---------------------------


@pytest.fixture
def mapped_input(monkeypatch, tmp_path: Path) -> Path:
    """``src/in.onnx`` whose conv1.weight (6912 bytes) is memory-mapped from ``in.onnx.data``."""
    monkeypatch.setattr(onnx_fpgm.model.mapped, "MAP_EXTERNAL_BYTES", 1)
    return save_external(conv_model(filters=64), tmp_path / "src" / "in.onnx")


@pytest.mark.parametrize(("entries", "fragment"), [
    ({"offset": "-6912"}, "negative offset"),
    ({"offset": "100000"}, "beyond the end"),
    ({"length": "-4"}, "negative"),
    ({"location": "x" * 5000}, "too long"),
    ({"offset": "abc"}, "conv1.weight"),
], ids=["negative_offset", "offset_beyond_end", "negative_length", "location_too_long",
        "offset_not_a_number"])
def test_bad_external_data_of_a_mapped_input_is_exit_2(capsys, tmp_path, mapped_input,
                                                       entries, fragment):
    retarget(mapped_input, "conv1.weight", **entries)
    assert_refused(capsys, tmp_path, mapped_input, tmp_path / "out.onnx", fragments=(fragment,))


def test_data_file_swapped_for_a_link_after_the_check_is_not_read(capsys, monkeypatch, tmp_path,
                                                                  mapped_input):
    """The data file is replaced by a link to a file outside the model's folder right after
    onnx's checker approved it: the mapping opens it once, by descriptor, with the checks."""
    data = mapped_input.with_name("in.onnx.data")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(np.random.default_rng(3).bytes(data.stat().st_size))
    check = onnx.checker.check_model

    def check_then_swap(*args, **kwargs):
        check(*args, **kwargs)
        data.rename(data.with_name("moved.bin"))
        data.symlink_to(outside)

    monkeypatch.setattr(onnx.checker, "check_model", check_then_swap)
    code, _, stderr = run(capsys, mapped_input, tmp_path / "out.onnx")
    assert code == 2, stderr
    one_error_line(stderr, "symbolic link")
    assert not (tmp_path / "out.onnx").exists()


# --- 7. what OUT does not keep is said ---------------------------------------------------------


@pytest.mark.parametrize("sparsity", ["0", "0.5"], ids=["nothing_pruned", "pruned"])
def test_training_info_is_kept_or_its_loss_noted(capsys, tmp_path, sparsity):
    source = tmp_path / "in.onnx"
    onnx.save(training_info_model(), source)
    out = tmp_path / "out.onnx"
    code, stdout, stderr = run(capsys, source, out, "--sparsity", sparsity,
                               "--report", tmp_path / "r.json")
    assert code == 0, stderr
    kept = len(onnx.load(str(out)).training_info)
    noted = [n for n in json.loads((tmp_path / "r.json").read_text())["notes"]
             if "training_info" in n]
    assert (kept, len(noted)) == ((1, 0) if sparsity == "0" else (0, 1))
    assert ("training_info (1 entry) not written" in stdout) == bool(noted)


def test_a_session_over_its_time_limit_ends_the_run_with_one_line(tmp_path):
    """onnxruntime's check of some models never returns: the CLI's watchdog ends the run
    (here with the limit lowered so far that any model is over it)."""
    source = tmp_path / "in.onnx"
    onnx.save(conv_model(), source)
    before = digest(tmp_path)
    done = run_cli(source, tmp_path / "out.onnx", env={"ONNX_FPGM_SESSION_LIMIT_S": "0.000001"})
    assert done.returncode == 2, done.stderr
    one_error_line(done.stderr, "did not finish", "nothing was written")
    assert digest(tmp_path) == before


def test_api_save_refuses_to_overwrite_what_the_prune_read(tmp_path, ext):
    result = onnx_fpgm.prune(ext, 0.5)
    before = digest(tmp_path)
    for target in (ext, ext.with_name("in.onnx.data")):
        with pytest.raises(onnx_fpgm.OutputError, match="same file as IN"):
            result.save(target)
    assert digest(tmp_path) == before
