"""The original model run at candidate sizes, in one onnxruntime session (``input_sizes``)."""
from __future__ import annotations

import logging

import onnx

from ..model.runtime import make_session, random_inputs

logger = logging.getLogger(__name__)

#: Probing stops after this many onnxruntime runs.
MAX_PROBES = 32


class Prober:
    """Runs the original model at candidate sizes in one onnxruntime session."""

    def __init__(self, model: onnx.ModelProto, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.runs = 0
        self.error: str | None = None
        try:
            self.session = make_session(model, quiet=True)
        except Exception as err:  # onnxruntime refuses the model whatever the size
            self.session = None
            self.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)

    def runs_at(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        import onnxruntime as ort  # on first use: keeps it off the CLI's start-up path

        if self.session is None or self.runs >= MAX_PROBES:
            return False
        self.runs += 1
        options = ort.RunOptions()
        options.log_severity_level = 4
        try:
            self.session.run(None, random_inputs(self.model, self.seed, shapes), options)
        except Exception as err:  # this size is refused: try the next
            logger.debug("original model refuses %s: %s", shapes, err)
            self.error = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            return False
        return True
