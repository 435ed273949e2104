"""Distance kernels of the FPGM core: blocked Gram passes with rigorous float32 error bounds.

Split out of ``fpgm.py`` (which keeps the public API and the exact selection cascade): these
helpers compute distance sums and a worst-case rounding bound per score, so that only filters
whose bound straddles the selection cut need an exact float64 rescore.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, ScoringError

_UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
# Smallest normal number: a flushed or subnormal product loses at most this much (absolute).
_TINY = {torch.float32: 2.0**-126, torch.float64: 2.0**-1022}
# Values are rescaled by a power of two (exact) when the largest row norm leaves
# [2**-40, 2**40], so squared norms can neither overflow nor sink into subnormals in float32.
_SAFE_EXP = 40
# Rows of the distance matrix handled per block on CPU: bounds memory to O(block * N) and
# keeps the elementwise passes that follow the GEMM close to cache.
_CPU_BLOCK_ELEMS = 1 << 20
_CUDA_BLOCK_ELEMS = 1 << 27
# Margin on top of the first-order error terms (second-order terms, the reduction of the
# bound itself); cheap insurance, it only widens the band of rescored filters.
_SAFETY = 1.25
# Depth of each float32 GEMM in the Gram accumulation (see _k_chunks).
_K_CHUNK = 256
# Symmetric passes: blocks per pass, and the row count from which blocking pays off.
_SYM_BLOCKS = 8
_SYM_MIN_ROWS = 384


def _gamma(k: int, u: float) -> float:
    ku = k * u
    return math.inf if ku >= 0.5 else ku / (1.0 - ku)


@contextlib.contextmanager
def _ieee_matmul(device: torch.device) -> Iterator[None]:
    """Force IEEE float32 GEMMs (no TF32/bf16) for the call: the error bounds assume them.

    Only touches the setting when it is not IEEE already, and restores it afterwards.
    """
    backend = getattr(torch.backends, "cuda" if device.type == "cuda" else "mkldnn", None)
    mm = getattr(backend, "matmul", None)
    prev = getattr(mm, "fp32_precision", None)
    setter: Callable[[str], None]
    if prev is None:  # torch without the per-backend API: the global legacy switch
        prev = torch.get_float32_matmul_precision()
        change = prev != "highest"
        target, setter = "highest", torch.set_float32_matmul_precision
    else:
        effective = prev if prev != "none" else getattr(torch.backends, "fp32_precision", "none")
        change = effective not in ("ieee", "none")

        def setter(value: str, backend_mm: Any = mm) -> None:
            backend_mm.fp32_precision = value

        target = "ieee"
    if change:
        setter(target)
    try:
        yield
    finally:
        if change:
            setter(prev)


def _block_rows(
    n_rows: int, n_cols: int, device: torch.device, *, symmetric: bool, n_chunks: int = 1
) -> int:
    """Rows per block: the block stays cache-sized, and symmetric passes get 4-8 blocks.

    With symmetry, block ``k`` of ``B`` spans ``N - k N / B`` columns, so the GEMM work is
    ``(1 + 1/B) / 2`` of the full product. Each block costs ``n_chunks`` GEMM calls plus a
    few passes, so long filters (many chunks) get fewer blocks, and small layers just one.
    """
    if device.type == "cuda":
        return max(1, min(n_rows, _CUDA_BLOCK_ELEMS // max(n_cols, 1)))
    rows = max(1, min(n_rows, _CPU_BLOCK_ELEMS // max(n_cols, 1)))
    if symmetric and n_rows >= _SYM_MIN_ROWS:
        blocks = _SYM_BLOCKS if n_chunks <= 4 else _SYM_BLOCKS // 2
        rows = min(rows, max(32, -(-n_rows // blocks)))
    return rows


def _k_chunks(d: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """Column ranges the Gram is accumulated over.

    A float32 dot product of length ``D`` can lose ``gamma_D`` in the worst case, whatever
    order the BLAS uses. Accumulating ``D / K`` GEMMs of depth ``K`` caps the summation depth
    at about ``K + D / K``, which makes the *rigorous* bound up to ~15x tighter for conv
    filters (``D`` = 576 ... 4608) at the same flop count, and so shrinks the band that needs
    rescoring. float64 does not need it.
    """
    step = _K_CHUNK if dtype == torch.float32 else max(d, 1)
    return [(lo, min(lo + step, d)) for lo in range(0, max(d, 1), step)]


def _sq_norms64(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms accumulated in float64 (relative error ~D * 1e-16).

    They also serve as the finiteness check (NaN/Inf propagate) and, for float32 data, are
    exact enough to be reused by the float64 rescoring pass. Float32 rows go by blocks of
    ``_CPU_BLOCK_ELEMS`` elements: a reduction in float64 converts its input first.
    """
    if x.dtype == torch.float64 or x.numel() <= _CPU_BLOCK_ELEMS:
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square_()
    rows = max(1, _CPU_BLOCK_ELEMS // max(x.shape[1], 1))
    # Into one preallocated result: a small result allocated after each block's float64
    # temporary would pin that freed block in glibc's heap (0.75 GiB held for a 4096 x 25088
    # classifier).
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], rows):
        torch.linalg.vector_norm(x[i:i + rows], dim=1, dtype=torch.float64, out=out[i:i + rows])
    return out.square_()


def _gram_pass(
    x: torch.Tensor, sq: torch.Tensor, rows: torch.Tensor | None, *, with_bound: bool, clamp: bool,
    to64: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean scores of ``rows`` (all when ``None``) and the sums the error bound needs.

    Per row block, ``n_i - 2 g_ij`` accumulates in one buffer over the column chunks (the
    first GEMM takes ``n_i`` as its broadcast input; ``alpha = -2`` is exact), then ``+ n_j``,
    ``sqrt``, the row sums and, for the bound, ``1/d`` times ``[1, n]``: no ``N x N``
    temporaries, and the block stays in cache between passes. For all rows only the upper
    block triangle is formed (distances are symmetric): block ``[s, e)`` covers columns
    ``[s, N)``, its row sums go to rows ``[s, e)`` and the column sums right of its diagonal
    square to rows ``[e, N)``, which is about half the GEMM work.

    Args:
        x: ``(N, D)`` float32 or float64 filters, rescaled to a safe range.
        sq: Squared row norms of ``x`` in ``x.dtype``.
        rows: Indices of the filters to score, or ``None`` for all of them.
        with_bound: Also return ``[sum_j 1/d_ij, sum_j n_j/d_ij]`` per row (diagonal excluded).
        clamp: Clamp negative squared distances (rounding) to zero. Off by default to save a
            pass: a negative shows up as a NaN score and the caller retries with it on.
        to64: ``x`` is float32 data to be used in float64 times this (power of two) scale,
            converted a column block at a time (``rows`` given): a big layer then never needs
            a whole float64 copy.

    Returns:
        ``(scores, rsum)`` on ``x.device`` in ``x.dtype``; ``rsum`` stays zero without bound.
    """
    n, d = x.shape
    dev, dt = x.device, torch.float64 if to64 is not None else x.dtype
    if to64 is not None and rows is None:
        raise ValueError("to64 needs rows (the symmetric pass reads every row as a block)")
    chunks = _k_chunks(d, dt)
    col = sq.unsqueeze(1)
    m = n if rows is None else rows.numel()
    scores = torch.zeros(m, dtype=dt, device=dev)
    rsum = torch.zeros(m, 2, dtype=dt, device=dev)
    weights = torch.cat([torch.ones_like(col), col], dim=1)
    b = _block_rows(m, n, dev, symmetric=rows is None, n_chunks=len(chunks))
    buf = torch.empty(b * n, dtype=dt, device=dev)
    for start in range(0, m, b):
        stop = min(start + b, m)
        if rows is None:  # symmetric: columns [start, N) only
            c0, xs, acc0, flat = start, x[start:stop], col[start:stop], None
        else:
            idx = rows[start:stop]
            c0, xs, acc0 = 0, x[idx], col[idx]
            flat = torch.arange(stop - start, device=dev) * n + idx
        blk = buf[: (stop - start) * (n - c0)].view(stop - start, n - c0)
        if to64 is not None:  # one chunk (float64), the columns converted block by block
            xs = _as64(xs, to64)
            step = max(1, _CPU_BLOCK_ELEMS // max(d, 1))
            for a in range(0, n, step):
                blk[:, a:a + step] = torch.addmm(acc0, xs, _as64(x[a:a + step], to64).T,
                                                 alpha=-2.0)
        xc = x[c0:]
        for t, (lo, hi) in enumerate(chunks if to64 is None else ()):
            acc = acc0 if t == 0 else blk
            torch.addmm(acc, xs[:, lo:hi], xc[:, lo:hi].T, alpha=-2.0, out=blk)
        blk.add_(sq[c0:])
        _zero_diag(blk, flat)
        if clamp:
            blk.clamp_(min=0.0)
        blk.sqrt_()
        right = blk[:, stop - start :] if rows is None and stop < n else None
        scores[start:stop] += _row_sums(blk)
        if right is not None:
            scores[stop:].addmv_(right.T, weights[start:stop, 0])
        if with_bound:
            blk.reciprocal_()
            _zero_diag(blk, flat)
            rsum[start:stop].addmm_(blk, weights[c0:])
            if right is not None:
                rsum[stop:].addmm_(right.T, weights[start:stop])
    return scores, rsum


def _as64(t: torch.Tensor, scale: float) -> torch.Tensor:
    t = t.to(torch.float64)
    return t * scale if scale != 1.0 else t


def _row_sums(blk: torch.Tensor) -> torch.Tensor:
    """Row sums with summation depth <= K + w / K + 1 instead of w.

    A plain sum over ``w`` columns has a worst-case error of ``gamma_w`` (3e-4 relative for
    ``w = 3072``), which would dominate the error bound and widen the rescored band; summing
    ``K``-column groups first keeps it at ``gamma_{K + w/K + 1}``, in float32, at ~the same
    speed.
    """
    w = blk.shape[1]
    if w <= 2 * _K_CHUNK:
        return blk.sum(dim=1)
    main = w - w % _K_CHUNK
    total = blk[:, :main].unflatten(1, (main // _K_CHUNK, _K_CHUNK)).sum(dim=2).sum(dim=1)
    if main < w:
        total += blk[:, main:].sum(dim=1)
    return total


def _sum_depth(n: int, block_rows: int) -> int:
    """Summation depth of a score: grouped row sum, column sums, one add per block."""
    # A block narrower than 2K columns is summed plainly, a wider one in K-column groups.
    row = n if n <= 2 * _K_CHUNK else max(2 * _K_CHUNK, _K_CHUNK + n // _K_CHUNK + 2)
    return max(row, block_rows + 1) + -(-n // block_rows) + 2


def _zero_diag(blk: torch.Tensor, flat: torch.Tensor | None) -> None:
    """Set d(x_i, x_i) to exactly 0; the Gram formula leaves rounding noise there."""
    if flat is None:
        blk.diagonal().zero_()  # symmetric blocks start at their own diagonal
    else:
        blk.view(-1)[flat] = 0.0


def _np(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy().astype(np.float64, copy=False)


def _l2_stage(
    x: torch.Tensor, sq64: torch.Tensor, rows: torch.Tensor | None, *, cast_error: bool,
    to64: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean scores of ``rows`` with a rigorous bound on their error (float64, on CPU).

    Error analysis (``u`` unit roundoff of ``x.dtype``, ``gamma_k = k u / (1 - k u)``): every
    term of ``s_ij = n_i + n_j - 2 g_ij`` is summed with depth at most ``h = K + T + 4`` (chunk
    width ``K``, ``T`` chunks), and ``2 |g_ij| <= n_i + n_j``, so ``|s^ - s| <= E_ij =
    c (n_i + n_j)`` with ``c ~ 2 gamma_h + 5 u`` (the norms are accurate to ``u``). As
    ``|sqrt(a) - sqrt(b)| <= |a - b| / sqrt(a)``, each distance is off by at most ``E_ij / d_ij``
    (+ ``u d_ij`` for the sqrt), which sums to ``c (n_i sum_j 1/d_ij + sum_j n_j/d_ij)``; the
    score's own summation adds ``gamma_{depth}`` relative (see ``_sum_depth``). A zero distance
    gives an infinite bound: that filter is simply rescored exactly.

    Args:
        x: ``(N, D)`` float32 or float64 filters, rescaled to a safe range.
        sq64: Squared row norms of ``x`` in float64.
        rows: Indices of the filters to score, or ``None`` for all of them.
        cast_error: ``x`` was rounded from float64 to float32; add that perturbation.
        to64: computed in float64 from float32 ``x`` (see ``_gram_pass``).

    Returns:
        ``(scores, bound)``, float64 NumPy arrays.
    """
    n, d = x.shape
    dtype = torch.float64 if to64 is not None else x.dtype
    sq = sq64.to(dtype)
    scores_t, rsum_t = _gram_pass(x, sq, rows, with_bound=True, clamp=False, to64=to64)
    scores = _np(scores_t)
    if np.isnan(scores).any():  # a near-duplicate pair rounded below zero
        scores_t, rsum_t = _gram_pass(x, sq, rows, with_bound=True, clamp=True, to64=to64)
        scores = _np(scores_t)
    sq_all = _np(sq64)
    sq_rows = sq_all if rows is None else sq_all[rows.cpu().numpy()]
    chunks = _k_chunks(d, dtype)
    m = n if rows is None else rows.numel()
    b = _block_rows(m, n, x.device, symmetric=rows is None, n_chunks=len(chunks))
    return scores, _l2_bound(
        scores,
        _np(rsum_t),
        sq_rows,
        sq_all,
        d=d,
        dtype=dtype,
        # Summation depth of n_i - 2 g_ij: one chunk, the chunk count, the n_i input, margin.
        gemm_depth=(chunks[0][1] - chunks[0][0]) + len(chunks) + 4,
        sum_depth=_sum_depth(n, b),
        cast_error=cast_error,
    )


def _l2_bound(
    scores: np.ndarray,
    rsum: np.ndarray,
    sq_rows: np.ndarray,
    sq_all: np.ndarray,
    *,
    d: int,
    dtype: torch.dtype,
    gemm_depth: int,
    sum_depth: int,
    cast_error: bool,
) -> np.ndarray:
    """Error bound of Euclidean scores from the row sums of ``1/d_ij`` and ``n_j/d_ij``.

    See ``_l2_stage`` for the derivation; ``gemm_depth`` and ``sum_depth`` are the longest
    summation chains of a squared distance and of a score.
    """
    n = sq_all.shape[0]
    u = _UNIT_ROUNDOFF[dtype]
    # abs: sqrt(-0.0) = -0.0 and 1/-0.0 = -inf on exact duplicates; the bound must be +inf.
    rsum = np.abs(rsum)
    gh = _gamma(gemm_depth, u)
    # Norms: float64 accumulation (gamma_{D+3} there), then rounded to ``dtype``.
    norm_err = 1.01 * u + _gamma(d + 3, _UNIT_ROUNDOFF[torch.float64])
    c = (2.0 * gh + 3.0 * u + 2.0 * norm_err) * (1.0 + 4.0 * gh)
    # The bound's own sums come from GEMMs (depth <= N + blocks): cover their rounding too.
    gb = _gamma(2 * n + 4, u)
    with np.errstate(invalid="ignore"):  # inf * 0 -> NaN, mapped to "undecided" by _split
        err = c * (sq_rows * rsum[:, 0] + rsum[:, 1]) + u * scores
        bound = (1.0 + gb) * err + _gamma(sum_depth, u) * scores
    if cast_error:  # |d(x~_i, x~_j) - d(x_i, x_j)| <= u32 (|x_i| + |x_j|)
        bound += (
            _UNIT_ROUNDOFF[torch.float32] * 1.01 * (n * np.sqrt(sq_rows) + np.sqrt(sq_all).sum())
        )
    return _SAFETY * bound + n * math.sqrt(max(d, 1)) * 4.0 * _TINY[dtype]


def _l2_small_stage(x64: torch.Tensor, sq64: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Small layers on CPU: one float64 Gram pass, elementwise work in NumPy.

    Below ~128 filters the cost is per-op overhead, not flops: NumPy ufuncs cost ~1 us where
    a torch op costs ~5, and the float64 bound is so tight that rescoring is all but never
    needed, so this one pass beats the float32 cascade (and the seed's per-row loop).
    """
    n, d = x64.shape
    sq = sq64.numpy()
    dist = torch.mm(x64, x64.T).numpy()
    dist *= -2.0
    dist += sq
    dist += sq[:, None]
    np.maximum(dist, 0.0, out=dist)
    np.sqrt(dist, out=dist)
    dist.flat[:: n + 1] = 0.0  # d(x_i, x_i) = 0 exactly
    scores = dist.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # duplicates: inf, then NaN = undecided
        np.reciprocal(dist, out=dist)
        dist.flat[:: n + 1] = 0.0
        rsum = dist @ np.stack([np.ones(n), sq], axis=1)
    return scores, _l2_bound(
        scores,
        rsum,
        sq,
        sq,
        d=d,
        dtype=torch.float64,
        gemm_depth=d + 4,
        sum_depth=n + 2,
        cast_error=False,
    )


def _l1_stage(
    x: torch.Tensor, rows: torch.Tensor | None, *, cast_error: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Manhattan scores with a bound: each distance has relative error <= gamma_{D+1}."""
    n, d = x.shape
    u = _UNIT_ROUNDOFF[x.dtype]
    scores = _np(_l1_pass(x, rows))
    bound = (_gamma(d + 1, u) * (1.0 + 2.0 * u) + 2.0 * _gamma(n + 1, u)) * scores
    if cast_error:
        l1 = _np(x.abs().sum(dim=1, dtype=torch.float64))
        l1_rows = l1 if rows is None else l1[rows.cpu().numpy()]
        bound += _UNIT_ROUNDOFF[torch.float32] * 1.01 * (n * l1_rows + l1.sum())
    return scores, _SAFETY * bound + n * d * 4.0 * _TINY[x.dtype]


def _l1_pass(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    xr = x if rows is None else x[rows]
    scores = torch.empty(xr.shape[0], dtype=x.dtype, device=x.device)
    b = _block_rows(xr.shape[0], x.shape[0], x.device, symmetric=False)
    for start in range(0, xr.shape[0], b):
        dist = torch.cdist(xr[start : start + b], x, p=1.0)
        torch.sum(dist, dim=1, out=scores[start : start + b])
    return scores


def _direct_scores(x: torch.Tensor, rows: torch.Tensor, p: int, scale: float = 1.0
                   ) -> torch.Tensor:
    """Float64 scores from explicit differences: the arbiter for the last undecided rows.

    ``x`` is the float64 data, or float32 data (times ``scale``) converted to float64 a column
    block at a time, so that a big layer never needs a whole float64 copy.
    """
    mode = "donot_use_mm_for_euclid_dist"
    n = x.shape[0]
    cols = n if x.dtype == torch.float64 else max(1, _CPU_BLOCK_ELEMS // max(x.shape[1], 1))
    out = torch.zeros(rows.numel(), dtype=torch.float64, device=x.device)
    b = _block_rows(rows.numel(), min(n, cols), x.device, symmetric=False)
    for c in range(0, n, cols):
        xc = _as64(x[c:c + cols], scale)
        for start in range(0, rows.numel(), b):
            dist = torch.cdist(_as64(x[rows[start : start + b]], scale), xc, p=float(p),
                               compute_mode=mode)
            out[start : start + b] += dist.sum(dim=1)
    return out


def _callable_scores(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    n = x.shape[0]
    # float64 on purpose: a user distance has no error bound we could check a cut against.
    dist = fn(x.to(torch.float64))
    if not isinstance(dist, torch.Tensor) or tuple(dist.shape) != (n, n):
        got = tuple(dist.shape) if isinstance(dist, torch.Tensor) else type(dist).__name__
        raise ConfigError(f"dist callable must return a ({n}, {n}) tensor, got {got}")
    scores = dist.to(torch.float64).abs().sum(dim=1)
    if not bool(torch.isfinite(scores).all()):
        raise ScoringError("dist callable returned NaN or Inf distances")
    return scores
