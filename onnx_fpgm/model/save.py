"""Saving a model as OUT (and its data file) so that a reader sees the old pair or the new one.

The steps (``files`` owns the checks and the exclusive, atomic file writes):

1. the file plan is checked: OUT and ``OUT.data`` collide with no file the run read;
2. the large tensors go to a data file created exclusively under a fresh name (``OUT.data``
   when free, else ``OUT.<random>.data``): no existing file is written into;
3. OUT is written to a temporary file and renamed over the old OUT in one step; until then
   the old OUT still references its own, untouched data;
4. the old OUT's data file is removed, only when onnx-fpgm wrote it (it starts with
   ``DATA_MAGIC`` and is named after OUT) and it is not a file the run read.

A failure before step 3 removes the new data file; an older OUT's data is never removed.
Tensors that still reference external data (a memory-mapped input: its untouched weights, or
weights inside If bodies) are read through a checked descriptor (``external``) and written to
OUT's own data: OUT never references the input's data file.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import onnx

from ..errors import OutputError
from . import external, files, genai_config, io
from .light import _numel

#: Initializers of at least this many bytes go to OUT's data file (onnx's default threshold).
EXTERNAL_THRESHOLD = 1024
#: The first bytes of every data file onnx-fpgm writes: only such files are ever removed.
DATA_MAGIC = b"onnx-fpgm external data\n"
_ALIGN = 4096
#: An OUT written with a data file holds only tensors under 1 KiB: larger files are not read.
_SHELL_MAX_BYTES = 1 << 28
_TENSOR_DATA_FIELDS = frozenset({
    "raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data",
    "uint64_data", "external_data", "data_location"})


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_data: bool = False, source_dir: Path | None = None,
               reads: Iterable[tuple[str, str | os.PathLike]] = ()) -> None:
    """Write ``model`` as ``path`` (plus its data file), replacing an older pair atomically.

    Args:
        external_data: large initializers go to a data file (also when the model is too large
            for one protobuf message); ``model`` itself is never modified.
        source_dir: the folder the model's remaining external references resolve in (a
            memory-mapped input); their data is copied into OUT.
        reads: (role, path) of the files the run read: none may be overwritten.

    Raises:
        OutputError: a collision, a missing or unwritable folder, or a full disk.
    """
    path = Path(path)
    plan = files.FilePlan.of(reads=reads)
    plan.add_model_output(path)
    plan.check()
    external_data = external_data or io.too_large(model)
    directory = path.parent
    old_data = _our_data_file(path)
    data_path: Path | None = None
    try:
        if external_data:
            data_path, handle = files.create_exclusive(directory, _data_names(path))
            with handle:
                handle.write(DATA_MAGIC)
                shell, wrote = _shell(model, handle, data_path.name, source_dir)
                handle.flush()
                os.fsync(handle.fileno())
            if not wrote:
                data_path.unlink()
                data_path = None
            files.crash_point("data-written")
        elif source_dir is not None and _references_data(model):
            shell, _ = _shell(model, None, "", source_dir)
        else:
            shell = model
        with files.atomic_file(path, "OUT") as handle:
            handle.write(shell.SerializeToString())
    except BaseException as err:
        if data_path is not None:  # no new data file without its model; the old pair stays
            with contextlib.suppress(OSError):
                data_path.unlink()
        if isinstance(err, OSError):
            raise OutputError(f"{path}: cannot write ({err.strerror or err})") from err
        raise
    files.crash_point("OUT-renamed")
    if old_data is not None and (data_path is None or old_data != data_path) and not any(
            files.same_file(old_data, Path(p)) for _, p in reads):
        with contextlib.suppress(OSError):
            old_data.unlink()


def _data_names(path: Path):
    yield path.name + ".data"
    for _ in range(100):
        yield f"{path.name}.{secrets.token_hex(4)}.data"


def _our_data_file(path: Path) -> Path | None:
    """The data file the current OUT references when onnx-fpgm wrote it (named after OUT, in
    its folder, a regular file that starts with ``DATA_MAGIC``); None otherwise: other data
    files are never removed."""
    if not path.is_file() or path.stat().st_size > _SHELL_MAX_BYTES:
        return None  # a file that size is no shell of ours: its tensors are inline
    pattern = re.escape(path.name) + r"(\.[0-9a-f]{8})?\.data"
    names = [n for n in files.referenced_data(path) if re.fullmatch(pattern, n)]
    found = files.regular_file_in(path.parent, names[0]) if len(names) == 1 else None
    if found is None:
        return None
    with contextlib.suppress(OSError), open(found, "rb") as handle:
        if handle.read(len(DATA_MAGIC)) == DATA_MAGIC:
            return found
    return None


def _references_data(model: onnx.ModelProto) -> bool:
    from onnx.external_data_helper import _get_all_tensors

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model))


def _shell(model: onnx.ModelProto, data: BinaryIO | None, location: str,
           source_dir: Path | None) -> tuple[onnx.ModelProto, bool]:
    """``model`` with its large tensors in ``data`` (``None``: every tensor inline).

    ``onnx.save_model(save_as_external_data=True)`` is not used: it converts the caller's
    tensors in place (afterwards they point at the file and hold no data) and refuses when a
    file named ``location`` exists in the *current* directory. Here a shell model is built
    (every field copied, except that tensors of ``EXTERNAL_THRESHOLD`` bytes or more become
    references into ``data``); the top-level weights are streamed one tensor at a time.
    Returns the shell and whether any tensor went to ``data``.
    """
    from onnx.external_data_helper import _get_all_tensors

    shell = onnx.ModelProto()
    io.copy_fields(model, shell, skip={"graph"})
    io.copy_fields(model.graph, shell.graph, skip={"initializer"})
    wrote = False
    for tensor in list(_get_all_tensors(shell)):  # inside nodes: Constants, If/Loop bodies
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            source = onnx.TensorProto()
            source.CopyFrom(tensor)
            tensor.Clear()
            wrote |= _store(source, tensor, data, location, source_dir)
    for tensor in model.graph.initializer:
        wrote |= _store(tensor, shell.graph.initializer.add(), data, location, source_dir)
    return shell, wrote


def _store(tensor: onnx.TensorProto, stub: onnx.TensorProto, data: BinaryIO | None,
           location: str, source_dir: Path | None) -> bool:
    """Copy ``tensor`` into ``stub``, its bytes into ``data`` when large; True when it did."""
    raw = _raw_bytes(tensor, source_dir)
    if raw is None or data is None or len(raw) < EXTERNAL_THRESHOLD:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and raw is not None:
            io.copy_fields(tensor, stub, skip=_TENSOR_DATA_FIELDS)
            stub.raw_data = raw
        else:
            stub.CopyFrom(tensor)
        return False
    offset = data.tell()
    if len(raw) >= _ALIGN and offset % _ALIGN:  # aligned data can be memory-mapped
        data.write(b"\0" * (_ALIGN - offset % _ALIGN))
        offset = data.tell()
    data.write(raw)
    io.copy_fields(tensor, stub, skip=_TENSOR_DATA_FIELDS)
    stub.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
        entry = stub.external_data.add()
        entry.key, entry.value = key, str(value)
    return True


def _raw_bytes(tensor: onnx.TensorProto, source_dir: Path | None) -> bytes | None:
    """The tensor's little-endian data, or None when it cannot be stored externally."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        if source_dir is None:
            raise OutputError(f"tensor {tensor.name} references external data that was not "
                              "loaded; pass the model with its data")
        nbytes = _numel(tensor) * io._itemsize(tensor.data_type)
        return external.read_tensor_bytes(tensor, source_dir, nbytes)
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def genai_config_writer(out: str | os.PathLike, reads: list[tuple[str, Path]],
                        pruned: onnx.ModelProto, changes: list[dict]):
    """onnxruntime-genai's ``genai_config.json`` beside IN (``reads[0]``), rewritten for the
    pruned model beside OUT (``genai_config.config_for_out``), planned and checked as the CLI
    does (``files.FilePlan``): returns a function that writes it and returns the note, or None
    when IN has no such file.

    Raises:
        OutputError: the copy would overwrite a file the run read or writes.
        ConfigError: the config cannot describe the pruned layers (nothing is written).
    """
    if not reads:
        return None
    plan = files.FilePlan.of(reads=reads)
    plan.add_model_output(out)
    found = plan.add_genai_config(reads[0][1], out)
    if found is None:
        return None
    plan.check()
    text, note = genai_config.config_for_out(found[0].read_text(), pruned, changes,
                                             Path(out).name)

    def write() -> str:
        if text is not None:
            files.write_text(found[1], text, f"OUT's {genai_config.GENAI_CONFIG}")
        return note
    return write
