"""What a recovery by distillation did (a report row), kept free of torch so the report can
import it without loading the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RecoveryReport:
    """One ``--recover`` run.

    Attributes:
        method: ``distill``.
        device: where it trained (``cpu``, or ``cuda`` with the card's name).
        steps: optimiser steps taken; ``stopped``: why training ended.
        time_s: wall time of the training (the teacher's runs included).
        loss_before / loss_after: the distillation loss on the held-out slice of the
            calibration data, before training and of the weights kept (the best seen).
        held_out: samples in that slice (the rest, ``trained_on``, were trained on).
        tensors: intermediate tensors supervised (pruned ones on their kept channels);
            ``parameters``: initializers trained.
        fidelity_before / fidelity_after: fidelity lines on the evaluation data (else the
            calibration data) before and after training.
    """

    method: str
    device: str
    steps: int = 0
    stopped: str = ""
    time_s: float = 0.0
    loss_before: float = 0.0
    loss_after: float = 0.0
    held_out: int = 0
    trained_on: int = 0
    tensors: int = 0
    parameters: int = 0
    fidelity_before: list[str] = field(default_factory=list)
    fidelity_after: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"recover {self.method} on {self.device}: {self.steps} steps in "
                f"{self.time_s:.1f} s ({self.stopped}); held-out loss {self.loss_before:.4g} -> "
                f"{self.loss_after:.4g} ({self.held_out} held out, {self.trained_on} trained on; "
                f"{self.tensors} tensors supervised, {self.parameters} initializers trained)")
