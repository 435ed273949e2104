"""The run's file plan: every file one run reads and writes, checked before any work, and the
only way files are written.

A run reads IN, IN's external data files and the ``--plan``/``--calibration``/``--eval`` files,
and writes OUT, OUT's data file, ``--report`` and the sweep's ``--json``/``--plot`` (and, with
``--allow-interface-change``, a ``genai_config.json`` beside IN is read and rewritten beside OUT). Before any
work (``FilePlan.check``) every written path is compared with every read path and with the
other written paths after resolving links (``os.path.samefile``/``realpath``): a collision is
an ``OutputError`` naming both. A path that exists but is not a regular file (a FIFO, a device,
a directory) is refused up front, so a FIFO given as ``--plan`` never blocks the run.

Every write goes through an exclusive temporary file in the target's folder (``mkstemp``:
``O_EXCL``, no symlink followed), then one ``os.replace`` (``atomic_file``). A model and its
data file are replaced as a pair by ``save.save_model`` (data under a fresh name first).

``ONNX_FPGM_CRASH_AT=<step>`` makes the process ``os._exit`` at a named step (``crash_point``):
a test hook that shows a reader never sees a mixed pair when a run is killed between steps.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError, ModelLoadError, OutputError
from .genai_config import GENAI_CONFIG

#: Environment variable naming the step at which the process exits at once (tests only).
CRASH_ENV = "ONNX_FPGM_CRASH_AT"


def crash_point(step: str) -> None:
    """Exit the process at once when ``ONNX_FPGM_CRASH_AT`` names ``step`` (a test hook)."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(70)


@dataclass(frozen=True)
class FileUse:
    """One file of the run: its role (``IN``, ``--report``, ...) and path."""

    role: str
    path: Path

    def __str__(self) -> str:
        return f"{self.role} ({self.path})"


def data_sibling(out: str | os.PathLike) -> Path:
    """The data file OUT's large tensors go to by default: ``OUT.data`` next to OUT."""
    out = Path(out)
    return out.with_name(out.name + ".data")


@dataclass
class FilePlan:
    """What one run reads and writes (``None`` paths are options not given)."""

    reads: list[FileUse] = field(default_factory=list)
    writes: list[FileUse] = field(default_factory=list)

    @classmethod
    def of(cls, reads: Iterable[tuple[str, str | os.PathLike | None]] = (),
           writes: Iterable[tuple[str, str | os.PathLike | None]] = ()) -> FilePlan:
        return cls([FileUse(r, Path(p)) for r, p in reads if p],
                   [FileUse(r, Path(p)) for r, p in writes if p])

    def add_model_output(self, out: str | os.PathLike) -> None:
        """OUT and the data file next to it."""
        self.writes.append(FileUse("OUT", Path(out)))
        self.writes.append(FileUse("OUT's data file", data_sibling(out)))

    def add_genai_config(self, inp: str | os.PathLike, out: str | os.PathLike
                         ) -> tuple[Path, Path] | None:
        """onnxruntime-genai's config beside IN (a regular file), read, and its copy beside
        OUT, written (``genai_config``); returns (read, written) or None when IN has none."""
        source = regular_file_in(Path(inp).parent, GENAI_CONFIG)
        if source is None:
            return None
        written = Path(out).parent / GENAI_CONFIG
        self.reads.append(FileUse(f"IN's {GENAI_CONFIG}", source))
        self.writes.append(FileUse(f"OUT's {GENAI_CONFIG}", written))
        return source, written

    def add_reads(self, role: str, paths: Iterable[str | os.PathLike]) -> None:
        self.reads.extend(FileUse(role, Path(p)) for p in paths)

    def check(self, *, complete: bool = True) -> None:
        """Refuse odd files and collisions before any work.

        Args:
            complete: every read is known (IN's data files too): an existing ``OUT.data`` is
                then checked to be OUT's own (else it may be a read file, named as such).

        Raises:
            ModelLoadError: IN (or its data) exists but is not a regular file.
            ConfigError: another read file exists but is not a regular file.
            OutputError: a written path is not a regular file or its folder is missing or
                unwritable; a written path is a read one or another written one.
        """
        for use in self.reads:
            _check_readable(use)
        for use in self.writes:
            _check_writable(use)
        reads = [*self.reads, *_folder_files(self.reads)]
        for i, written in enumerate(self.writes):
            for read in reads:
                if same_file(written.path, read.path):
                    raise OutputError(_collision(written, read))
            for other in self.writes[i + 1:]:
                if same_file(written.path, other.path):
                    raise OutputError(_collision(written, other))
        out = next((w.path for w in self.writes if w.role == "OUT"), None)
        if out is not None and complete:
            _check_data_sibling(out)


def _collision(written: FileUse, other: FileUse) -> str:
    return (f"{written.role} {written.path} is the same file as {other.role} {other.path}; "
            f"refusing to overwrite {other.role}")


def same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file (links resolved; hard links too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


#: Reads that may be a folder (of calibration images): its files are reads too.
FOLDER_READS = frozenset({"--calibration", "--eval"})


def _folder_files(reads: list[FileUse]) -> list[FileUse]:
    """The regular files inside the folders given as ``FOLDER_READS`` (each a read)."""
    found = []
    for use in reads:
        if use.role in FOLDER_READS and use.path.is_dir():
            found += [FileUse(use.role, f) for f in sorted(use.path.iterdir()) if f.is_file()]
    return found


def _check_readable(use: FileUse) -> None:
    try:
        mode = os.stat(use.path).st_mode
    except OSError:
        return  # missing: the reader words it
    if stat.S_ISDIR(mode) and use.role in FOLDER_READS:
        return  # a folder of images: its files are compared as reads (``_folder_files``)
    if not stat.S_ISREG(mode):
        error = ModelLoadError if use.role.startswith("IN") else ConfigError
        raise error(f"{use}: is {_kind(mode)}, not a regular file")


def _check_writable(use: FileUse) -> None:
    try:
        mode = os.stat(use.path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise OutputError(f"{use}: cannot be written ({err.strerror or err})") from err
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputError(f"{use}: is {_kind(mode)}, not a regular file; refusing to replace it")
    directory = use.path.parent
    if not directory.is_dir():
        raise OutputError(f"{directory}: output directory of {use.role} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{directory}: output directory of {use.role} is not writable")


def _check_data_sibling(out: Path) -> None:
    """``OUT.data`` may exist only as the current OUT's own data (replaced with it)."""
    sibling = data_sibling(out)
    if not os.path.lexists(sibling):
        return
    if sibling.name not in referenced_data(out):
        raise OutputError(f"OUT's data file {sibling} exists and is not the data of OUT "
                          f"({out}); it may belong to another model: refusing to replace it")


def referenced_data(model_file: Path) -> set[str]:
    """Locations of the external data ``model_file`` references (empty when unreadable)."""
    import onnx  # the header parse; only when a data file is in the way
    from onnx.external_data_helper import _get_all_tensors

    try:
        if not model_file.is_file():
            return set()
        header = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # not a model: it references nothing
        return set()
    return {e.value for t in _get_all_tensors(header)
            if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def _file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, role: str = "OUT") -> Iterator[BinaryIO]:
    """A binary file that replaces ``path`` in one rename when the block ends without error.

    The temporary file is created exclusively in ``path``'s folder (``mkstemp``: ``O_EXCL``,
    no symlink followed) and removed on any failure; ``path`` is then untouched.

    Raises:
        OutputError: the file cannot be created, written or renamed (the message names it).
    """
    path = Path(path)
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise OutputError(f"{path}: cannot write {role} ({err.strerror or err})") from err
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        crash_point(f"{role}-written")
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise OutputError(f"{path}: cannot write {role} ({err.strerror or err})") from err
        raise


def write_text(path: str | os.PathLike, text: str, role: str = "--report") -> None:
    """Write a text output atomically (``atomic_file``)."""
    with atomic_file(path, role) as handle:
        handle.write(text.encode())


def create_exclusive(directory: Path, names: Iterable[str]) -> tuple[Path, BinaryIO]:
    """Create the first of ``names`` that does not exist in ``directory`` (``O_EXCL``, no symlink
    followed), else a fresh unique name; returns its path and the open file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    for name in names:
        path = directory / name
        try:
            fd = os.open(path, flags, _file_mode())
        except FileExistsError:
            continue
        return path, os.fdopen(fd, "wb")
    raise FileExistsError(f"{directory}: no free data file name")


def regular_file_in(directory: Path, name: str) -> Path | None:
    """``directory/name`` when it is a regular file there (not a link, nothing outside)."""
    path = directory / name
    if Path(name).name != name or not os.path.lexists(path):
        return None
    return path if stat.S_ISREG(os.lstat(path).st_mode) else None
