"""``--target-latency R``: prune until onnxruntime runs the model in R times the original's time.

Latency is not additive over layers, so it is searched, not modelled: a MACs target is chosen,
the model pruned to it (``planning/allocate.py``) and both models timed, interleaved as ``--benchmark``
does; the MACs target is then corrected (secant step on the measured ratio, kept inside the
bracket found so far) until the measured ratio is within the measurement's spread of R (the
relative interquartile ranges of both timings, at least 2 %). The last model is pruned once more
with every option (verification, compensation) and its timing reported.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from ..api import prune
from ..config import PruneConfig
from ..errors import ConfigError
from ..measure.bench import benchmark
from ..model import mapped

logger = logging.getLogger(__name__)

#: Pruned-and-timed trials at most.
MAX_TRIALS = 7
#: Smallest tolerance on the latency ratio (timings on a busy machine are not finer).
MIN_SPREAD = 0.02


def prune_to_latency(model, config: PruneConfig, progress=None, cache: dict | None = None,
                     runs: int = 30):
    """Search a MACs target whose pruned model meets ``config.target_latency``."""
    loaded = model if isinstance(model, mapped.Loaded) else mapped.load_mapped(model)
    with mapped.reading_from(loaded):  # loaded once: its weights are mapped or viewed
        return _search(loaded, config, progress, cache if cache is not None else {}, runs)


def _search(loaded, config: PruneConfig, progress, cache: dict, runs: int):
    """Bisect (then step by the MACs-latency proportion) over MACs targets, timing each."""
    original = loaded.model
    goal = float(config.target_latency)
    quick = replace(config, target_latency=None, verify=False, compensate="none",
                    evaluation=None)
    lo, hi, macs = 0.0, 1.0, goal  # bracket of MACs fractions: too slow below hi is unknown
    trials: list[tuple[float, float, float]] = []  # (MACs target, latency ratio, spread)
    advance = progress("latency search", MAX_TRIALS) if progress else None
    best_reachable = None
    chosen = None
    for _ in range(MAX_TRIALS):
        try:
            result = prune(loaded, config=replace(quick, target_macs=macs), cache=cache)
        except ConfigError as err:
            if "not reachable" not in str(err):
                raise
            lo = macs
            macs = (lo + hi) / 2
            continue
        ratio, spread = _timed_ratio(benchmark, original, result.model, runs,
                                     result.input_sizes.primary)
        trials.append((macs, ratio, spread))
        logger.info("MACs target %.4f: latency ratio %.3f (+-%.3f)", macs, ratio, spread)
        if advance:
            advance(1)
        best_reachable = ratio if best_reachable is None else min(best_reachable, ratio)
        if abs(ratio - goal) <= spread:
            chosen = macs
            break
        if ratio > goal:
            hi = macs
        else:
            lo = macs
        step = macs * goal / ratio  # latency roughly proportional to MACs
        macs = step if lo < step < hi else (lo + hi) / 2
        if hi - lo < 1e-3:
            break
    if chosen is None:
        fitting = [t for t in trials if t[1] <= goal + t[2]]
        if not fitting:
            raise ConfigError(f"target latency {goal:.4g} of the original is not reachable: the "
                              f"best reached is {best_reachable or 1.0:.3f} "
                              f"(after {len(trials)} pruned-and-timed trials)")
        chosen = max(fitting)[0]  # the most channels among those fast enough
    result = prune(loaded, config=replace(config, target_latency=None, target_macs=chosen),
                   progress=progress, cache=cache)
    latency = benchmark(original, result.model, runs=runs,
                        input_shapes=result.input_sizes.primary)
    result.report.latency = latency
    outcome = result.report.target
    outcome.metric, outcome.target = "latency", goal
    outcome.estimated = outcome.achieved = latency.pruned_ms / latency.original_ms
    outcome.trials = [{"macs_target": m, "latency_ratio": round(r, 4), "spread": round(s, 4)}
                      for m, r, s in trials]
    result.report.notes.append(
        f"latency target: MACs target {chosen:.4f} after {len(trials)} timed trials; measured "
        f"ratio {outcome.achieved:.3f} (trial spread +-{min(t[2] for t in trials):.3f})")
    return result


#: A relative spread above this is too noisy to steer by: the timing is repeated, longer.
NOISY = 0.1


def _timed_ratio(benchmark, original, pruned, runs: int, shapes) -> tuple[float, float]:
    """(pruned / original median latency, relative spread), timed longer when noisy."""
    for attempt in range(3):
        latency = benchmark(original, pruned, runs=runs * 3**attempt, input_shapes=shapes)
        spread = max(MIN_SPREAD, latency.original_iqr_ms / latency.original_ms +
                     latency.pruned_iqr_ms / latency.pruned_ms)
        if spread <= NOISY:
            break
    return latency.pruned_ms / latency.original_ms, spread
