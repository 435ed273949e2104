"""Typed errors; the CLI maps each family to an exit code (usage/bad input 2, verification 1,
our own failure 3)."""
from __future__ import annotations


class OnnxFpgmError(Exception):
    """Base of every error onnx-fpgm raises on purpose."""
    exit_code = 2

class ConfigError(OnnxFpgmError):
    """An option value is invalid (sparsity outside [0, 1], unknown device, ...)."""

class ModelLoadError(OnnxFpgmError):
    """The input is not a readable, valid ONNX model."""

class UnsupportedOpError(OnnxFpgmError):
    """Raised under --strict when an op blocks pruning."""

class ScoringError(OnnxFpgmError):
    """Weights cannot be scored (non-finite values, ...)."""

class RewriteError(OnnxFpgmError):
    """The pruned graph could not be built: the analysis accepted a plan the rewrite cannot
    carry out, a bug of ours (exit 3), never the input's fault (it refuses such layers)."""
    exit_code = 3

class ExportError(RewriteError):
    """Our written model fails a check the input passes: a bug of ours (exit 3), never the
    input's fault."""

class VerificationError(OnnxFpgmError):
    """The pruned model does not match the masked original."""
    exit_code = 1

class OutputError(OnnxFpgmError):
    """OUT cannot be written (same as IN, unwritable directory, disk full)."""

class PlanError(OnnxFpgmError):
    """A saved plan (``--plan report.json``) does not fit the model."""
