"""The ``--runs`` grammar the real-model studies share (``detector.py``, ``paddleocr_det.py``).

A run is ``allocation/criterion/compensate/recover`` (``sensitivity/obs/obs/distill``), runs are
separated by commas. Each field is checked against the tool's own choices here, so a typo fails
before an hour of pruning rather than at the run that has it.
"""
from __future__ import annotations

from typing import NamedTuple

from onnx_fpgm.config import ALLOCATIONS, COMPENSATIONS, CRITERIA, RECOVERIES


class PruneRun(NamedTuple):
    """One configuration of a study: how many channels go where, which, and how to recover."""

    allocation: str
    criterion: str
    compensate: str
    recover: str

    def label(self) -> str:
        return "/".join(self)


_CHOICES = dict(zip(PruneRun._fields, (ALLOCATIONS, CRITERIA, COMPENSATIONS, RECOVERIES)))


def parse_runs(text: str) -> list[PruneRun]:
    """``"uniform/fpgm/none/none,sensitivity/obs/obs/none"`` -> the runs, in order.

    Raises:
        ValueError: a run without four fields, or a field the tool has no such choice for.
    """
    runs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        fields = item.split("/")
        if len(fields) != len(PruneRun._fields):
            raise ValueError(f"run {item!r}: want {'/'.join(PruneRun._fields)}")
        for name, value in zip(PruneRun._fields, fields):
            if value not in _CHOICES[name]:
                raise ValueError(f"run {item!r}: {name} must be one of "
                                 f"{', '.join(_CHOICES[name])}, not {value!r}")
        runs.append(PruneRun(*fields))
    if not runs:
        raise ValueError("no run given")
    return runs


def recovery_note(recovery, empty: str = "-") -> str:
    """A report's ``recovery`` row in one line (``empty`` when the run recovered nothing)."""
    if recovery is None:
        return empty
    return (f"{recovery.steps} steps, {recovery.time_s:.0f} s, loss {recovery.loss_before:.3g} "
            f"-> {recovery.loss_after:.3g} ({recovery.stopped})")
