"""onnx-fpgm: structured FPGM filter pruning of ONNX models, verified with onnxruntime."""
from __future__ import annotations

from .api import PruneResult, benchmark, verify
from .config import PruneConfig
from .errors import (
    ConfigError,
    ExportError,
    ModelLoadError,
    OnnxFpgmError,
    OutputError,
    PlanError,
    RewriteError,
    UnsupportedOpError,
    VerificationError,
)
from .outcome.entry import prune

__all__ = [
    "ConfigError",
    "ExportError",
    "ModelLoadError",
    "OnnxFpgmError",
    "OutputError",
    "PlanError",
    "PruneConfig",
    "PruneResult",
    "RewriteError",
    "UnsupportedOpError",
    "VerificationError",
    "benchmark",
    "prune",
    "verify",
]
__version__ = "0.1.0"
