"""FPGM importance: filters close to the geometric median of their layer are redundant.

Definition (pinned by ``tests/test_fpgm.py``, same as PyTorch's ``FPGMPruner``): flatten the
filters once to ``X`` of shape ``(N, D)``; the score of filter ``i`` is

    score[i] = sum_j |dist(X[i], X[j])|

and the ``round(sparsity * N)`` filters with the *smallest* scores are pruned: a filter whose
distances to all others are small sits near the geometric median, so the others can stand in
for it.

Speed and exactness. For the default Euclidean distance the distances come from float32 Gram
blocks (``||x||^2 + ||y||^2 - 2 x.y``); only the upper block triangle is formed, so the cost is
about half a GEMM plus a few cache-resident passes over each block. That formula cancels, so
float32 scores alone could select a different set than an exact float64 computation. Each
float32 score therefore carries a rigorous a-priori error bound (worst-case rounding analysis,
``gamma_k = k u / (1 - k u)``, with the GEMM accumulated in ``K``-column chunks to cap the
summation depth, and IEEE float32 GEMMs enforced: no TF32/bf16). Only filters whose intervals
straddle the selection cut are rescored: with a float64 Gram of their rows (again bounded),
then, for anything still undecided (in practice exact ties such as duplicate filters), with
float64 direct differences. Equal exact scores go to the lowest index. The selection thus
equals that of a float64 ``cdist`` reference. Small layers on CPU (per-op overhead, not flops,
dominates there) take one bounded float64 Gram pass instead. The Manhattan distance (no Gram
identity) uses ``torch.cdist(p=1)`` with the same bound-and-rescore cascade; a callable is
evaluated once, on float64 input.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ..errors import ConfigError, ScoringError
from ._distances import (
    _SAFE_EXP,
    _callable_scores,
    _direct_scores,
    _gram_pass,
    _ieee_matmul,
    _l1_pass,
    _l1_stage,
    _l2_small_stage,
    _l2_stage,
    _sq_norms64,
)

__all__ = [
    "DistSpec",
    "fpgm_scores",
    "fpgm_select",
    "keep_from_prune",
    "n_to_prune",
    "resolve_device",
    "to_filter_matrix",
]

logger = logging.getLogger(__name__)

DistSpec = Union[int, Callable[[torch.Tensor], torch.Tensor]]  # noqa: UP007 (runtime alias)
"""``1`` (Manhattan), ``2`` (Euclidean) or a callable mapping ``(N, D)`` to ``(N, N)``."""

# Layers up to this many filters are scored by one float64 pass in NumPy (CPU).
_SMALL_ROWS = 128
# Undecided rows * N * D up to which they are rescored by explicit differences at once.
_DIRECT_MACS = 1 << 20


def resolve_device(device: str = "auto") -> torch.device:
    """Map a device option to a ``torch.device``.

    Args:
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``.

    Returns:
        The device to compute on.

    Raises:
        ConfigError: Unknown value, or ``"cuda"`` without a usable GPU.
    """
    if not isinstance(device, str):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but no CUDA GPU is available to torch")
        return torch.device("cuda")
    raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def _device_of(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device} requested but no CUDA GPU is available to torch")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"device must be a CPU or CUDA device, got {device}")
        return device
    return resolve_device(device)


def to_filter_matrix(filters: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Flatten filters to ``(N, D)`` without copying when possible.

    Args:
        filters: Tensor or array of shape ``(N, ...)``; axis 0 indexes filters.

    Returns:
        A floating tensor of shape ``(N, D)`` on the input's device. Integer and boolean
        inputs become float64 (exact); floating dtypes are kept.

    Raises:
        ScoringError: Zero-dimensional, complex or non-numeric input.
    """
    if isinstance(filters, torch.Tensor):
        t = filters.detach()
    else:
        arr = np.ascontiguousarray(filters)
        try:
            with warnings.catch_warnings():
                # torch warns on read-only buffers (ONNX raw_data views); scoring never writes
                # to its input, so the view is shared rather than copied.
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                t = torch.from_numpy(arr)
        except TypeError as err:
            raise ScoringError(f"weights of dtype {arr.dtype} cannot be scored") from err
    if t.dim() == 0:
        raise ScoringError("filters must have at least one dimension (axis 0 = filters)")
    if t.is_complex():
        raise ScoringError(f"complex weights cannot be scored (dtype {t.dtype})")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    n = t.shape[0]
    return t.reshape(n, math.prod(t.shape[1:]))


def _resolve_dist(dist: DistSpec) -> int | Callable[[torch.Tensor], torch.Tensor]:
    if callable(dist):
        return dist
    if isinstance(dist, bool) or dist not in (1, 2):
        raise ConfigError(f"dist must be 1, 2 or a callable (N, D) -> (N, N), got {dist!r}")
    return int(dist)


@dataclass
class _Prepared:
    """Filters ready for scoring, plus what the error bounds need to know about them."""

    x: torch.Tensor  # (N, D) on the compute device, original floating dtype
    x32: torch.Tensor  # scaled float32 data for the fast pass (the input itself if possible)
    sq64: torch.Tensor  # float64 squared row norms of x64
    scale: float  # power of two applied to x32/x64 (scores scale by it)
    cast_error: bool  # x32 was rounded from float64 (adds a term to the bound)
    float64: torch.Tensor | None = None  # x64 once made

    @property
    def x64(self) -> torch.Tensor:
        """Scaled float64 data: exact, for the bounds and the rescoring; made on first use for
        big float32 layers (twice their size: 0.8 GB for a 4096 x 25088 classifier, where the
        float32 stage usually decides every filter)."""
        if self.float64 is None:
            x64 = self.x.to(torch.float64)
            self.float64 = x64 * self.scale if self.scale != 1.0 else x64
        return self.float64


#: float32 layers whose float64 copy would take this many bytes get it only when needed.
_LAZY_FLOAT64_BYTES = 64 << 20


def _prepare(matrix: torch.Tensor, device: torch.device) -> _Prepared:
    x = matrix.to(device)
    is64 = x.dtype == torch.float64
    lazy = x.dtype == torch.float32 and x.numel() * 8 >= _LAZY_FLOAT64_BYTES
    # Small layers: the float64 copy is needed by the rescoring stage anyway, and float64
    # norms are ~3x cheaper from it than from float32 data. Big float32 ones: norms by blocks.
    x64 = None if lazy else x if is64 else x.to(torch.float64)
    # The norms double as the finiteness check: NaN/Inf propagate into them (and float32
    # data cannot overflow float64 squares), so the common case costs one reduction.
    sq = _sq_norms64(x) if x64 is None else _sq_norms64(x64)
    top = float(sq.max()) if sq.numel() else 0.0
    if math.isfinite(top) and top > 2.0**-900:
        exp = math.frexp(math.sqrt(top))[1]
    else:
        if not bool(torch.isfinite(x).all()):
            raise ScoringError(
                f"weights of shape {tuple(x.shape)} contain NaN or Inf; FPGM needs finite values"
            )
        # float64 values beyond ~1e154 (squares overflow) or below ~1e-150 (squares go
        # subnormal or to zero): estimate the largest row norm's exponent from the largest value.
        amax = float(x.abs().max()) if x.numel() else 0.0
        exp = math.frexp(amax)[1] + (x.shape[1].bit_length() + 1) // 2 if amax > 0.0 else 0
    # Largest row norm into about [0.5, 1): float32 squares then neither overflow nor go
    # subnormal. Only outside a generous range, to skip the copies in the common case.
    scale = 1.0
    if abs(exp) > _SAFE_EXP:
        scale = math.ldexp(1.0, -exp)
        x64 = (x.to(torch.float64) if x64 is None else x64) * scale
        sq = _sq_norms64(x64)
    x32 = x if x.dtype == torch.float32 and scale == 1.0 else x64.to(torch.float32)
    return _Prepared(x, x32, sq, scale, cast_error=is64, float64=x64)


@torch.no_grad()
def fpgm_scores(
    filters: torch.Tensor | np.ndarray,
    dist: DistSpec = 2,
    device: str | torch.device = "auto",
) -> torch.Tensor:
    """FPGM score of every filter: the sum of its distances to all filters.

    Smaller means closer to the geometric median, i.e. more redundant. For float32/16 inputs
    with ``dist`` 1 or 2 this is the fast float32 value (relative error around 1e-6); use
    :func:`fpgm_select` for a selection guaranteed to match an exact float64 computation.

    Args:
        filters: ``(N, ...)`` tensor or array; axis 0 indexes filters.
        dist: 1, 2 or a callable ``(N, D) float64 tensor -> (N, N) tensor``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.

    Returns:
        ``(N,)`` CPU tensor: float64 for float64 inputs and callables, float32 otherwise.

    Raises:
        ConfigError: Bad ``dist``/``device`` or a callable returning the wrong shape.
        ScoringError: Non-finite weights, or scores that overflow.
    """
    fn = _resolve_dist(dist)
    dev = _device_of(device)
    prep = _prepare(to_filter_matrix(filters), dev)
    n = prep.x.shape[0]
    if callable(fn):
        return _callable_scores(prep.x, fn).cpu()
    work = prep.x64 if prep.cast_error else prep.x32  # float64 inputs stay float64
    if n == 0 or work.shape[1] == 0:
        return torch.zeros(n, dtype=work.dtype)
    with _ieee_matmul(dev):
        if fn == 1:
            scores = _l1_pass(work, None)
        else:
            sq = prep.sq64.to(work.dtype)
            scores, _ = _gram_pass(work, sq, None, with_bound=False, clamp=False)
            if bool(torch.isnan(scores).any()):
                scores, _ = _gram_pass(work, sq, None, with_bound=False, clamp=True)
    if prep.scale != 1.0:
        scores = scores / prep.scale
    if not bool(torch.isfinite(scores).all()):
        raise ScoringError(
            f"FPGM scores overflow {scores.dtype} for weights of shape {tuple(prep.x.shape)}"
        )
    return scores.cpu()


def n_to_prune(n: int, sparsity: float, min_channels: int = 1) -> int:
    """Number of filters to prune: ``round(sparsity * n)``, keeping ``min(min_channels, n)``.

    Python's ``round`` (half to even) is used, as PyTorch's ``FPGMPruner`` does, so results
    match it wherever the ``min_channels`` clamp does not apply.

    Args:
        n: Number of filters.
        sparsity: Fraction to prune, in ``[0, 1]``.
        min_channels: Filters that must survive (at least 1, so no layer is emptied).

    Returns:
        The count, in ``[0, n - min(min_channels, n)]``.

    Raises:
        ConfigError: ``sparsity`` outside ``[0, 1]`` or NaN, ``min_channels < 1``, ``n < 0``.
    """
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"sparsity must be a number in [0, 1], got {sparsity!r}") from err
    if not 0.0 <= s <= 1.0:  # also rejects NaN
        raise ConfigError(f"sparsity must be in [0, 1], got {sparsity!r}")
    if isinstance(min_channels, bool) or int(min_channels) != min_channels or min_channels < 1:
        raise ConfigError(f"min_channels must be an integer >= 1, got {min_channels!r}")
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ConfigError(f"filter count must be a non-negative integer, got {n!r}")
    n = int(n)
    return max(0, min(round(s * n), n - min(int(min_channels), n)))


def _split(scores: np.ndarray, bound: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Split candidates into sure-pruned / undecided given scores +- bound and k to pick.

    The rank of ``i`` (ties by index) is at most ``#{j != i: lo_j <= hi_i}`` and at least
    ``#{j: hi_j < lo_i}``; a filter is decided when that range lies wholly on one side of k.

    Returns:
        Positions surely pruned, positions still undecided, and how many of the undecided
        must still be pruned.
    """
    # A NaN or negative bound would silently "decide" a filter; make it undecided instead.
    bound = np.where(bound >= 0.0, bound, np.inf)
    lo = scores - bound
    hi = scores + bound
    rank_hi = np.searchsorted(np.sort(lo), hi, side="right") - 1
    rank_lo = np.searchsorted(np.sort(hi), lo, side="left")
    sure = rank_hi < k
    undecided = ~sure & (rank_lo < k)
    sure_pos = np.flatnonzero(sure)
    return sure_pos, np.flatnonzero(undecided), k - sure_pos.size


def _smallest(scores: np.ndarray, idx: np.ndarray, k: int) -> np.ndarray:
    """The k smallest scores, equal scores going to the lower index (reproducible)."""
    order = np.lexsort((idx, scores))
    return idx[order[:k]]


def _narrow(
    scores: np.ndarray, bound: np.ndarray, cand: np.ndarray, m: int, chosen: list[np.ndarray]
) -> tuple[np.ndarray, int]:
    """Record the surely pruned candidates; return the undecided ones and how many to pick."""
    sure, undecided, m = _split(scores, bound, m)
    chosen.append(cand[sure])
    return cand[undecided], m


def _select_exact(prep: _Prepared, k: int, p: int) -> np.ndarray:
    """Run the float32 -> float64 Gram -> float64 direct cascade described in the module doc."""
    dev = prep.x.device
    n = prep.x.shape[0]
    cand = np.arange(n, dtype=np.int64)
    chosen: list[np.ndarray] = []
    small = p == 2 and dev.type == "cpu" and n <= _SMALL_ROWS
    if small:
        s, b = _l2_small_stage(prep.x64, prep.sq64)
    else:
        with _ieee_matmul(dev):
            if p == 2:
                sq32 = _sq_norms64(prep.x32) if prep.cast_error else prep.sq64
                s, b = _l2_stage(prep.x32, sq32, None, cast_error=prep.cast_error)
            else:
                s, b = _l1_stage(prep.x32, None, cast_error=prep.cast_error)
    cand, m = _narrow(s, b, cand, k, chosen)
    if m == 0 or cand.size == 0:
        return np.unique(np.concatenate(chosen))
    # A float64 Gram stage only pays off when explicit differences would be costly.
    if p == 2 and not small and cand.size * prep.x.numel() > _DIRECT_MACS:
        rows = None if cand.size == n else torch.from_numpy(cand).to(dev)
        if prep.float64 is None and rows is not None:  # a big float32 layer: no float64 copy
            s, b = _l2_stage(prep.x, prep.sq64, rows, cast_error=False, to64=prep.scale)
        else:
            s, b = _l2_stage(prep.x64, prep.sq64, rows, cast_error=False)
        cand, m = _narrow(s, b, cand, m, chosen)
    if m > 0 and cand.size:
        logger.debug("FPGM: %d filter(s) rescored exactly at the cut", cand.size)
        rows = torch.from_numpy(cand).to(dev)
        exact = (_direct_scores(prep.x, rows, p, prep.scale) if prep.float64 is None else
                 _direct_scores(prep.x64, rows, p)).cpu().numpy()
        chosen.append(_smallest(exact, cand, m))
    return np.unique(np.concatenate(chosen))


@torch.no_grad()
def fpgm_select(
    filters: torch.Tensor | np.ndarray,
    sparsity: float,
    dist: DistSpec = 2,
    device: str | torch.device = "auto",
    min_channels: int = 1,
) -> np.ndarray:
    """Indices of the filters FPGM prunes at ``sparsity``.

    Args:
        filters: ``(N, ...)`` tensor or array; axis 0 indexes filters.
        sparsity: Fraction of filters to prune, in ``[0, 1]`` (see :func:`n_to_prune`).
        dist: 1, 2 or a callable ``(N, D) float64 tensor -> (N, N) tensor``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        min_channels: Filters that always survive.

    Returns:
        ``prune_idxs``: sorted unique int64 indices of the smallest-score filters. For ``dist``
        1 and 2 the set equals the one an exact float64 computation gives; equal scores are
        broken towards the lowest index.

    Raises:
        ConfigError: Bad option values or a callable returning the wrong shape.
        ScoringError: Non-finite weights or distances.
    """
    fn = _resolve_dist(dist)
    dev = _device_of(device)
    matrix = to_filter_matrix(filters)
    n = matrix.shape[0]
    k = n_to_prune(n, sparsity, min_channels)  # option errors before any work
    if k == 0:
        return np.empty(0, dtype=np.int64)
    with _threads_for(n * n * max(matrix.shape[1], 1), dev):
        prep = _prepare(matrix, dev)
        if callable(fn):
            scores = _callable_scores(prep.x, fn).cpu().numpy()
            return np.sort(_smallest(scores, np.arange(n, dtype=np.int64), k))
        if prep.x.shape[1] == 0:  # all filters empty: every score is 0
            return np.arange(k, dtype=np.int64)
        return _select_exact(prep, k, fn)


#: Below this many multiply-adds (``N * N * D``) a group is scored on one CPU thread.
SINGLE_THREAD_MACS = 1 << 28


@contextmanager
def _threads_for(macs: int, dev: torch.device):
    """One intra-op thread for a small problem on the CPU, torch's default otherwise.

    A small group's GEMMs take well under a millisecond, so a second thread gains little; on a
    busy machine (more runnable threads than cores) the threads of the pool wait for each other
    and scoring became 10-20x slower: PP-OCRv4 det, 37 groups of at most 384 x 409, scored in
    0.25 s on one thread and 3-4.7 s on two at load average 8 on 2 cores.

    Large groups too run on one thread while the machine is oversubscribed (load average above
    the core count): at load 5.6 on 2 cores a 512 x 4608 layer took 699 ms on two threads
    (4.4x its ``X @ X.T``, which two threads did not speed up either) and 176 ms on one (1.15x).
    The selection is exact either way; only the speed depends on it.
    """
    if dev.type != "cpu" or torch.get_num_threads() == 1 or (
            macs >= SINGLE_THREAD_MACS and not _oversubscribed()):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _oversubscribed() -> bool:
    """More runnable threads than cores, by the 1-minute load average (False where unknown)."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return False


def keep_from_prune(n: int, prune_idxs: np.ndarray | list[int]) -> np.ndarray:
    """Sorted complement of ``prune_idxs`` in ``range(n)``.

    Args:
        n: Number of filters.
        prune_idxs: Indices to drop.

    Returns:
        ``keep_idxs`` as a sorted int64 array.

    Raises:
        ConfigError: An index outside ``[0, n)``.
    """
    prune = np.asarray(prune_idxs, dtype=np.int64).reshape(-1)
    if prune.size and (prune.min() < 0 or prune.max() >= n):
        raise ConfigError(f"prune index out of range for {n} filters: {prune.tolist()}")
    mask = np.ones(n, dtype=bool)
    mask[prune] = False
    return np.flatnonzero(mask).astype(np.int64, copy=False)
