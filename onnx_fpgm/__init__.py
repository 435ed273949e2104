"""onnx-fpgm: structured FPGM filter pruning of ONNX models, verified with onnxruntime."""
from __future__ import annotations

from . import io, validate
from .api import PruneResult, benchmark, prune, verify
from .config import PruneConfig
from .errors import (
    ConfigError,
    ExportError,
    ModelLoadError,
    OnnxFpgmError,
    OutputError,
    RewriteError,
    UnsupportedOpError,
    VerificationError,
)

__all__ = [
    "ConfigError",
    "ExportError",
    "ModelLoadError",
    "OnnxFpgmError",
    "OutputError",
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
