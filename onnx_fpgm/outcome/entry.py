"""The public ``onnx_fpgm.prune``: one prune (``api.prune``), or a search over prunes when the
target is a latency.

A latency is not a quantity of the model: it is searched by pruning and timing
(``latency_target``), which calls ``api.prune`` many times. The dispatch lives here, above the
orchestrator, so ``api`` never calls up into the searches built on it.
"""
from __future__ import annotations

import os

import onnx

from ..api import Progress, PruneResult
from ..api import prune as prune_once
from ..config import PruneConfig
from ..model import mapped
from .latency_target import prune_to_latency


def prune(model: str | os.PathLike | onnx.ModelProto | mapped.Loaded, sparsity: float = 0.5, *,
          config: PruneConfig | None = None, progress: Progress | None = None,
          cache: dict | None = None, **options) -> PruneResult:
    """Prune ``model`` by FPGM and verify the result (``api.prune``'s arguments and errors).

    With ``target_latency`` the model is pruned and timed until onnxruntime runs it in that
    fraction of the original's time (``latency_target.prune_to_latency``).
    """
    config = config or PruneConfig(sparsity=sparsity, **options)
    if config.target_latency is not None:
        return prune_to_latency(model, config, progress, cache)
    return prune_once(model, config=config, progress=progress, cache=cache)
