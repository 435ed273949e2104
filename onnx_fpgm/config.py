"""Options of one pruning run, validated once so every stage can trust them."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Union

from .errors import ConfigError

DistSpec = Union[int, Callable]
Device = Literal["auto", "cpu", "cuda"]
Criterion = Literal["fpgm", "l1", "l2", "random", "obs"]
Compensation = Literal["none", "bias", "lstsq", "obs", "sequential", "auto"]
CRITERIA = ("fpgm", "l1", "l2", "random", "obs")
COMPENSATIONS = ("none", "bias", "lstsq", "obs", "sequential", "auto")
Allocation = Literal["auto", "uniform", "global", "sensitivity"]
ALLOCATIONS = ("auto", "uniform", "global", "sensitivity")
Recovery = Literal["none", "distill"]
RECOVERIES = ("none", "distill")
#: Default training budget of ``recover="distill"`` (optimiser steps).
RECOVER_STEPS = 300
#: Default most work units (multiply-add equivalents) one group's FPGM scoring may take:
#: 24x VGG's 4096 x 25088 classifier (4.6 s); a 1M-output Gemm is 13x over (importance/cost.py).
MAX_SCORING_WORK = 1e13


@dataclass(frozen=True)
class ImageScaling:
    """How pixels become input values for ``--calibration DIR`` (see ``measure/images.py``)."""

    pixel_scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False
    letterbox: bool = False

    def describe(self) -> str:
        return (f"pixels x {self.pixel_scale:.6g}, {'BGR' if self.bgr else 'RGB'}, mean "
                f"{list(self.mean)}, std {list(self.std)}, "
                f"{'letterboxed' if self.letterbox else 'resized'}")


@dataclass(frozen=True)
class PruneConfig:
    """Settings of one run.

    Attributes:
        sparsity: fraction of each group's channels to remove, in [0, 1].
        head_sparsity: fraction of each attention layer's heads to remove (None: ``sparsity``);
            at least one head stays.
        keep_head_dims: keep every kept head's ``head_dim`` whole. Off (default), each kept
            head also loses ``sparsity`` of its dimensions (the same ones in every head of a
            layer; at least one stays), so attention keeps ``(1 - head_sparsity) *
            (1 - sparsity)`` of its channels: a quarter at 0.5.
        dist: 1 (L1), 2 (L2, default) or a callable mapping an (N, D) tensor to (N, N) distances.
        device: where FPGM scores are computed.
        exclude: regexes; a group any of whose producer node names matches is left unpruned.
        layer_sparsity: (regex, sparsity) pairs; the first that matches a producer of a group
            sets that group's sparsity.
        min_channels: channels every group keeps at least (physical removal cannot empty a layer).
        round_to: keep a multiple of this many channels in every group (None: no rounding).
        verify: run the onnxruntime oracle on the result.
        strict: raise UnsupportedOpError instead of leaving groups behind unknown ops unpruned.
        input_shapes: concrete shapes for graph inputs with symbolic dims (verification, MACs).
        seed: seed of the random verification inputs (and of the ``random`` criterion).
        criterion: how channels are ranked: FPGM (default), filter L1/L2 norm, random, or obs
            (the channels whose removal raises the consumers' reconstruction error on the
            calibration data least; needs ``calibration``).
        calibration: path of an npz with real inputs (fidelity report, compensation).
        compensate: recover the removed channels' contribution in the consumers: bias,
            lstsq, obs or sequential (``recover/compensate.py``); ``auto`` chooses among none,
            bias and lstsq.
        evaluation: path of an npz of held-out data (same format) for the fidelity/accuracy
            report; without it the calibration data is used (optimistic under lstsq).
        recover: ``distill`` trains the pruned model's weights to reproduce the original on
            the calibration data (after any ``compensate``, which gives it its start).
        recover_steps: most optimiser steps of ``distill``; recover_time: most seconds (None:
            no time limit). Training also stops early on its held-out slice.
        image_scaling: how a folder of images given as ``calibration``/``evaluation`` becomes
            input values.
        max_scoring_work: most work units (multiply-add equivalents, ``N^2 (D + 128)`` for
            ``N`` filters of ``D`` weights) FPGM may spend on one group; a group over it is left
            whole with a reason (None: no limit). Norm criteria cost ``O(N D)`` and need none.
        allow_interface_change: KV-cache inputs/outputs (``present = Concat(past, new)``) may
            shrink along their head axis, so whole KV groups prune; off, the KV heads stay.
    """

    sparsity: float = 0.5
    head_sparsity: float | None = None
    keep_head_dims: bool = False
    dist: DistSpec = 2
    device: Device = "auto"
    exclude: tuple[str, ...] = ()
    layer_sparsity: tuple[tuple[str, float], ...] = ()
    min_channels: int = 1
    round_to: int | None = None
    verify: bool = True
    strict: bool = False
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    seed: int = 0
    criterion: Criterion = "fpgm"
    calibration: str | None = None
    compensate: Compensation = "none"
    evaluation: str | None = None
    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    allocation: Allocation = "auto"
    plan: str | None = None
    recover: Recovery = "none"
    recover_steps: int = RECOVER_STEPS
    recover_time: float | None = None
    image_scaling: ImageScaling = ImageScaling()
    max_scoring_work: float | None = MAX_SCORING_WORK
    allow_interface_change: bool = False
    _compiled: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_sparsity(self.sparsity)
        if self.head_sparsity is not None:
            check_sparsity(self.head_sparsity, what="head sparsity")
        for pattern, value in self.layer_sparsity:
            check_sparsity(value, what=f"sparsity for {pattern!r}")
        if not (callable(self.dist) or self.dist in (1, 2)):
            raise ConfigError(f"dist must be 1, 2 or a callable, got {self.dist!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ConfigError(f"min_channels must be an integer >= 1, got {self.min_channels!r}")
        if self.round_to is not None and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise ConfigError(f"round_to must be an integer >= 1, got {self.round_to!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}, "
                              f"got {self.criterion!r}")
        if self.criterion == "obs" and not self.calibration:
            raise ConfigError("criterion obs needs --calibration data (the consumers' input "
                              "statistics)")
        if self.compensate not in COMPENSATIONS:
            raise ConfigError(f"compensate must be one of {', '.join(COMPENSATIONS)}, "
                              f"got {self.compensate!r}")
        targets = [t for t in (self.target_macs, self.target_params, self.target_latency)
                   if t is not None]
        if len(targets) > 1:
            raise ConfigError("give one target: target_macs, target_params or target_latency")
        for value in targets:
            check_target(value)
        if self.plan and targets:
            raise ConfigError("a plan fixes every group's channels: give a plan or a target")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, "
                              f"got {self.allocation!r}")
        if self.allocation == "sensitivity" and not self.calibration:
            raise ConfigError("allocation sensitivity needs --calibration data to measure "
                              "each group's loss")
        self._check_recovery()
        if self.max_scoring_work is not None and (
                isinstance(self.max_scoring_work, bool) or
                not isinstance(self.max_scoring_work, (int, float)) or
                not 0 < self.max_scoring_work < math.inf):
            raise ConfigError(f"max_scoring_work must be a positive number or None, "
                              f"got {self.max_scoring_work!r}")
        compiled_exclude = tuple(_compile(p) for p in self.exclude)
        compiled_layers = tuple((_compile(p), s) for p, s in self.layer_sparsity)
        object.__setattr__(self, "_compiled", (compiled_exclude, compiled_layers))

    def _check_recovery(self) -> None:
        if self.recover not in RECOVERIES:
            raise ConfigError(f"recover must be one of {', '.join(RECOVERIES)}, "
                              f"got {self.recover!r}")
        if not isinstance(self.recover_steps, int) or isinstance(self.recover_steps, bool) \
                or self.recover_steps < 1:
            raise ConfigError(f"recover_steps must be an integer >= 1, got {self.recover_steps!r}")
        if self.recover_time is not None and not (
                isinstance(self.recover_time, (int, float)) and self.recover_time > 0
                and math.isfinite(self.recover_time)):
            raise ConfigError(f"recover_time must be a positive number of seconds, "
                              f"got {self.recover_time!r}")
        if self.recover != "none" and not self.calibration:
            raise ConfigError(f"recover {self.recover} needs --calibration data (the inputs the "
                              "original teaches the pruned model on)")

    @property
    def target(self) -> tuple[str, float] | None:
        """("macs" or "params", fraction of the original) when a target is set."""
        if self.target_macs is not None:
            return "macs", float(self.target_macs)
        if self.target_params is not None:
            return "params", float(self.target_params)
        if self.target_latency is not None:
            return "latency", float(self.target_latency)
        return None

    @property
    def resolved_allocation(self) -> str:
        if self.allocation != "auto":
            return self.allocation
        return "sensitivity" if self.calibration else "global"

    def is_excluded(self, names: list[str]) -> str | None:
        """Return the exclude pattern matching any of ``names``, else None."""
        for regex in self._compiled[0]:
            if any(regex.search(n) for n in names):
                return regex.pattern
        return None

    def sparsity_for(self, names: list[str], heads: bool = False) -> float:
        """Sparsity of a group with these producer names (first matching --layer-sparsity),
        else ``head_sparsity`` for attention heads, else ``sparsity``."""
        fixed = self.layer_sparsity_for(names)
        if fixed is not None:
            return fixed
        if heads and self.head_sparsity is not None:
            return self.head_sparsity
        return self.sparsity

    def layer_sparsity_for(self, names: list[str]) -> float | None:
        """The first matching --layer-sparsity value, or None (targets leave such groups be)."""
        for regex, value in self._compiled[1]:
            if any(regex.search(n) for n in names):
                return value
        return None

    def to_metadata(self) -> dict[str, str]:
        """The settings as strings, recorded in the output model's metadata_props."""
        dist = self.dist if not callable(self.dist) else getattr(self.dist, "__name__", "callable")
        return {
            "sparsity": repr(self.sparsity),
            "head_sparsity": repr(self.head_sparsity),
            "dist": str(dist),
            "exclude": ",".join(self.exclude),
            "layer_sparsity": ",".join(f"{p}={s}" for p, s in self.layer_sparsity),
            "min_channels": str(self.min_channels),
            "round_to": str(self.round_to or ""),
            "criterion": self.criterion,
            "compensate": self.compensate,
            # only when set: without --recover the output's bits stay as before
            **({"recover": f"{self.recover}(steps={self.recover_steps}, "
                           f"time={self.recover_time})"} if self.recover != "none" else {}),
            **({"allow_interface_change": "true"} if self.allow_interface_change else {}),
            **({"keep_head_dims": "true"} if self.keep_head_dims else {}),
            **({"target": f"{self.target[0]}={self.target[1]!r}",
                "allocation": self.resolved_allocation} if self.target else {}),
        }


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1]; NaN and non-numbers are rejected."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must be a number in [0, 1], got {value!r}") from err
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ConfigError(f"{what} must be in [0, 1], got {value!r}")
    return v


def check_target(value: float, what: str = "target") -> float:
    """Validate a target fraction of the original, in (0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must be a fraction of the original in (0, 1], "
                          f"got {value!r}") from err
    if math.isnan(v) or not 0.0 < v <= 1.0:
        raise ConfigError(f"{what} must be a fraction of the original in (0, 1], got {value!r}")
    return v


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"invalid regular expression {pattern!r}: {err}") from err
