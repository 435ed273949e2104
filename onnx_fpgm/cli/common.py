"""What both commands (``onnx-fpgm IN OUT`` and ``onnx-fpgm sweep IN``) share: the parser's
error form, ``--input-shape`` parsing and progress bars (files: ``model.files``)."""
from __future__ import annotations

import argparse

#: Exit code of our own failure (a bug), never blamed on the input.
EXIT_INTERNAL = 3
#: Console width when stdout is not a terminal: wide enough that no table cell wraps.
PIPE_WIDTH = 10_000


class Parser(argparse.ArgumentParser):
    """Usage errors as one ``onnx-fpgm: error: ...`` line (exit 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,..., got {text!r}")
    return name, shape


class ProgressBars:
    """Progress bars on stderr, only when it is a terminal (rich decides)."""

    def __init__(self, console) -> None:
        self.console = console
        self._bar = None

    def __enter__(self):
        if self.console.is_terminal and not self.console.quiet:
            from rich.progress import Progress  # rich's bars load only on a terminal

            self._bar = Progress(console=self.console, transient=True)
            self._bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, phase: str, total: int):
        if self._bar is None:
            return lambda n=1, note=None: None
        task = self._bar.add_task(phase, total=total)

        def advance(n: int = 1, note: str | None = None) -> None:  # note: e.g. the loss
            self._bar.update(task, advance=n,
                             **({"description": f"{phase} ({note})"} if note else {}))

        return advance
