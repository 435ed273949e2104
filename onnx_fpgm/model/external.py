"""External data files of a model, opened once by descriptor with the checks onnx applies.

A data file named by a tensor's ``location`` must be a regular file inside the model's folder:
a relative path, no ``..`` leaving the folder, no symbolic link; its offset and length must be
non-negative and within the file. onnx's own opener (``_open_external_data``, onnx >= 1.18)
makes these checks and returns a descriptor; the file is then read or mapped from that
descriptor only, so a file swapped for a link after the check is never read. Bad data is the
input's fault: ``ModelLoadError`` (exit 2).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from ..errors import ModelLoadError


@dataclass
class DataFile:
    """One open external data file: its descriptor and size (from ``fstat``)."""

    location: str
    fd: int
    size: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def external_locations(model: onnx.ModelProto) -> list[str]:
    """Every external data location the model's tensors (subgraphs too) name, in order."""
    from onnx.external_data_helper import _get_all_tensors

    seen: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            seen.setdefault(external_info(tensor).get("location", ""), None)
    return list(seen)


def open_data_file(directory: Path, location: str, tensor_name: str = "?") -> DataFile:
    """Open ``directory/location`` read-only after onnx's checks.

    Raises:
        ModelLoadError: the location is empty, absolute, leaves the folder, is a link, is too
            long, or is not a regular file.
    """
    where = f"external data of {tensor_name} ({location[:80]!r})"
    if not location or "\0" in location:
        raise ModelLoadError(f"{where}: empty or invalid location")
    try:
        fd = _open_checked(directory, location, tensor_name)
        info = os.fstat(fd)
    except (OSError, RuntimeError, ValueError, onnx.checker.ValidationError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{where}: {text[:200]}") from err
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ModelLoadError(f"{where}: not a regular file")
    return DataFile(location, fd, info.st_size)


def _open_checked(directory: Path, location: str, tensor_name: str) -> int:
    try:
        from onnx.onnx_cpp2py_export.checker import _open_external_data
    except ImportError:  # onnx < 1.18: the same checks, made here
        return _open_checked_here(directory, location)
    return _open_external_data(str(directory), location, tensor_name, True)


def _open_checked_here(directory: Path, location: str) -> int:
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
        raise ValueError("should be a relative path, but it is an absolute path")
    path = directory / location
    inside = os.path.realpath(directory)
    if os.path.commonpath([inside, os.path.realpath(path)]) != inside:
        raise ValueError(f"should be a file inside {directory}, but it points outside it")
    if os.path.islink(path):
        raise ValueError("is a symbolic link")
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))


def tensor_range(tensor: onnx.TensorProto, data: DataFile, nbytes: int) -> tuple[int, int]:
    """The (offset, length) of ``tensor`` in ``data``, checked against the file and its shape.

    Raises:
        ModelLoadError: offset or length negative, not integers, beyond the file's end, or not
            the size the tensor's shape and type need.
    """
    info = external_info(tensor)
    where = f"external data of {tensor.name} ({data.location[:80]!r})"
    try:
        offset = int(info.get("offset", 0))
        length = int(info.get("length", nbytes))
    except ValueError as err:
        raise ModelLoadError(f"{where}: offset/length are not integers") from err
    if offset < 0 or length < 0:
        raise ModelLoadError(f"{where}: negative offset {offset} or length {length}")
    if length != nbytes:
        raise ModelLoadError(f"{where}: length {length} bytes, its shape needs {nbytes}")
    if offset + length > data.size:
        raise ModelLoadError(f"{where}: bytes {offset}..{offset + length} lie beyond the end of "
                             f"the file ({data.size} bytes)")
    return offset, length


def map_file(data: DataFile) -> mmap.mmap | bytes:
    """A read-only map of the whole file, from its descriptor (empty files: no map)."""
    if data.size == 0:
        return b""
    return mmap.mmap(data.fd, data.size, access=mmap.ACCESS_READ)


def read_tensor_bytes(tensor: onnx.TensorProto, directory: Path, nbytes: int) -> bytes:
    """The bytes of one external tensor, read through a checked descriptor."""
    location = external_info(tensor).get("location", "")
    data = open_data_file(directory, location, tensor.name)
    try:
        offset, length = tensor_range(tensor, data, nbytes)
        return os.pread(data.fd, length, offset) if length else b""
    finally:
        data.close()
