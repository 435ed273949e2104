"""FPGM core: selection parity with a float64 NumPy brute-force reference.

The reference below is deliberately naive and independent of ``onnx_fpgm``: float64 pairwise
distances by broadcasting, ``abs``, row sums, then the ``k`` smallest with ties going to the
lowest index, ``k = round(sparsity * n)`` (Python's half-to-even ``round``, as PyTorch's
``FPGMPruner``) capped so that ``min_channels`` filters survive.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_fpgm.errors import ConfigError, ScoringError
from onnx_fpgm.importance import fpgm as fpgm_mod
from onnx_fpgm.importance.fpgm import (
    fpgm_scores,
    fpgm_select,
    keep_from_prune,
    n_to_prune,
    resolve_device,
)
from onnx_fpgm.importance.norms import l1_scores, l2_scores

CUDA = torch.cuda.is_available()

# --------------------------------------------------------------------------- reference


def _ref_pairwise(x: np.ndarray, metric: str) -> np.ndarray:
    diff = x[:, None, :] - x[None, :, :]
    if metric == "l1":
        return np.abs(diff).sum(axis=-1)
    if metric == "l2":
        return np.sqrt((diff * diff).sum(axis=-1))
    if metric == "linf":
        return np.abs(diff).max(axis=-1)
    if metric == "cosine":
        norms = np.sqrt((x * x).sum(axis=1))
        return 1.0 - (x @ x.T) / np.outer(norms, norms)
    raise ValueError(metric)


def ref_scores(w: np.ndarray, metric: str) -> np.ndarray:
    x = np.asarray(w, dtype=np.float64).reshape(w.shape[0], -1)
    return np.abs(_ref_pairwise(x, metric)).sum(axis=1)


def ref_pick(scores: np.ndarray, sparsity: float, min_channels: int = 1) -> np.ndarray:
    n = scores.shape[0]
    k = min(round(sparsity * n), n - min(min_channels, n))
    order = sorted(range(n), key=lambda i: (scores[i], i))  # ties -> lowest index
    return np.array(sorted(order[:k]), dtype=np.int64)


def ref_select(w: np.ndarray, sparsity: float, metric: str, min_channels: int = 1) -> np.ndarray:
    return ref_pick(ref_scores(w, metric), sparsity, min_channels)


# Callables handed to fpgm_* receive an (N, D) float tensor and return (N, N).
def _linf(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x, p=math.inf)


def _cosine(x: torch.Tensor) -> torch.Tensor:
    xn = x / x.norm(dim=1, keepdim=True)
    return 1.0 - xn @ xn.T


DISTS: dict[str, tuple[int | Callable[[torch.Tensor], torch.Tensor], str]] = {
    "l1": (1, "l1"),
    "l2": (2, "l2"),
    "linf_callable": (_linf, "linf"),
    "cosine_callable": (_cosine, "cosine"),
}

SHAPES = [(16, 8, 3, 3), (64, 3, 7, 7), (5, 2, 1, 1), (32, 20), (128, 768), (400, 3, 3, 3)]
SPARSITIES = [0.0, 0.25, 0.5, 0.7, 1.0]
DTYPES = ["float32", "float16", "bfloat16", "float64"]


def make_weights(rng: np.random.Generator, shape: tuple[int, ...], dtype: str):
    """(weights to pass in, the exact float64 values the reference must see)."""
    base = rng.standard_normal(shape).astype(np.float32)
    if dtype == "bfloat16":
        t = torch.from_numpy(base).to(torch.bfloat16)
        return t, t.to(torch.float64).numpy()
    arr = base.astype(dtype)
    return arr, arr.astype(np.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@contextlib.contextmanager
def code_path(path: str) -> Iterator[None]:
    """Select the implementation on shapes small enough for a brute-force reference.

    By default small layers take a float64 NumPy pass (``_SMALL_ROWS``) and few undecided
    filters go straight to explicit differences (``_DIRECT_MACS``). ``"cascade"`` forces the
    full float32 Gram -> float64 Gram -> explicit differences path that large layers take;
    ``"lazy"`` the same as big float32 layers take it, without a whole float64 copy (columns
    converted block by block).
    """
    saved = fpgm_mod._SMALL_ROWS, fpgm_mod._DIRECT_MACS, fpgm_mod._LAZY_FLOAT64_BYTES
    if path in ("cascade", "lazy"):
        fpgm_mod._SMALL_ROWS, fpgm_mod._DIRECT_MACS = -1, -1
    if path == "lazy":
        fpgm_mod._LAZY_FLOAT64_BYTES = 0
    try:
        yield
    finally:
        fpgm_mod._SMALL_ROWS, fpgm_mod._DIRECT_MACS, fpgm_mod._LAZY_FLOAT64_BYTES = saved


PATHS = ["default", "cascade", "lazy"]


# --------------------------------------------------------------------------- parity


def _case_id(shape: tuple[int, ...], *rest: str) -> str:
    return "-".join(("x".join(map(str, shape)), *rest))


PARITY_CASES = [
    pytest.param(shape, dist_name, dtype, path, id=_case_id(shape, dist_name, dtype, path))
    for shape in SHAPES
    for dist_name in DISTS
    for dtype in DTYPES
    for path in PATHS
    if path != "cascade" or dist_name == "l2"  # only L2 has a small-layer path
]


@pytest.mark.parametrize(("shape", "dist_name", "dtype", "path"), PARITY_CASES)
def test_select_matches_reference(shape, dist_name, dtype, path):
    seed = zlib.crc32(repr((shape, dist_name, dtype)).encode())  # stable across runs
    w, ref_w = make_weights(np.random.default_rng(seed), shape, dtype)
    dist, metric = DISTS[dist_name]
    scores = ref_scores(ref_w, metric)
    with code_path(path):
        for sparsity in SPARSITIES:
            got = fpgm_select(w, sparsity, dist=dist, device="cpu")
            want = ref_pick(scores, sparsity)
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want, err_msg=f"sparsity={sparsity}")


@pytest.mark.parametrize("dist_name", ["l1", "l2"])
def test_scores_close_to_reference(rng, dist_name):
    dist, metric = DISTS[dist_name]
    w = rng.standard_normal((40, 6, 3, 3)).astype(np.float32)
    got = fpgm_scores(w, dist=dist, device="cpu")
    assert got.device.type == "cpu"
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref_scores(w, metric), rtol=1e-5)
    got64 = fpgm_scores(w.astype(np.float64), dist=dist, device="cpu")
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), ref_scores(w, metric), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_scored_in_float32_or_better(rng, dtype):
    w = torch.from_numpy(rng.standard_normal((12, 4, 3, 3)).astype(np.float32)).to(dtype)
    got = fpgm_scores(w, device="cpu")
    assert got.dtype in (torch.float32, torch.float64)
    np.testing.assert_allclose(got.numpy(), ref_scores(w.double().numpy(), "l2"), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", PATHS)
def test_near_ties_resolved_like_float64(rng, path, dtype):
    # Twins 1e-6 apart (relative): float32 Gram distances cannot order them, float64 can.
    base = rng.standard_normal((24, 300))
    twins = base + 1e-6 * rng.standard_normal(base.shape)
    w = np.concatenate([base, twins])[rng.permutation(48)].astype(dtype)
    for dist, metric in [(2, "l2"), (1, "l1")]:
        for sparsity in (0.25, 0.5, 0.75):
            with code_path(path):
                got = fpgm_select(w, sparsity, dist=dist, device="cpu")
            np.testing.assert_array_equal(got, ref_select(w, sparsity, metric))


def test_extreme_magnitudes_keep_selection(rng):
    w = rng.standard_normal((20, 9))
    want = ref_select(w, 0.5, "l2")
    # 1e300 / 1e-170: squares overflow / underflow even float64
    for scale in (1e-30, 1e30, 1e150, 1e300, 1e-170):
        np.testing.assert_array_equal(fpgm_select(w * scale, 0.5, device="cpu"), want)
    w32 = (w * 1e20).astype(np.float32)  # squares overflow float32 without rescaling
    np.testing.assert_array_equal(
        fpgm_select(w32, 0.5, device="cpu"), ref_select(w32.astype(np.float64), 0.5, "l2")
    )


def test_reduced_precision_matmul_setting_is_ignored_and_restored(rng):
    mm = torch.backends.mkldnn.matmul
    if not hasattr(mm, "fp32_precision"):
        pytest.skip("torch without per-backend fp32_precision")
    w = rng.standard_normal((200, 150)).astype(np.float32)  # > _SMALL_ROWS: float32 GEMMs
    prev = mm.fp32_precision
    try:
        mm.fp32_precision = "bf16"
        got = fpgm_select(w, 0.5, device="cpu")
        assert mm.fp32_precision == "bf16"
    finally:
        mm.fp32_precision = prev
    np.testing.assert_array_equal(got, ref_select(w, 0.5, "l2"))


# Hypothesis: shapes, sparsities, dtypes; plus duplicated rows and small integers, which make
# exact ties (lowest index wins) and cancellation in the Gram formula.
@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 24),
    sparsity=st.floats(0.0, 1.0),
    dist=st.sampled_from([1, 2]),
    kind=st.sampled_from(["normal", "duplicates", "ints"]),
    dtype=st.sampled_from(["float32", "float64"]),
    min_channels=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    path=st.sampled_from(PATHS),
)
def test_property_parity(n, d, sparsity, dist, kind, dtype, min_channels, seed, path):
    rng = np.random.default_rng(seed)
    if kind == "ints" and dist == 1:
        # L1 distances of integers are exact, so equal scores are exactly equal everywhere.
        w = rng.integers(-2, 3, size=(n, d)).astype(dtype)
    else:
        w = rng.standard_normal((n, d)).astype(dtype)
    if kind == "duplicates" and n > 1:
        w[rng.integers(0, n, size=n // 2)] = w[rng.integers(0, n, size=n // 2)]
    with code_path(path):
        got = fpgm_select(w, sparsity, dist=dist, device="cpu", min_channels=min_channels)
    want = ref_select(w.astype(np.float64), sparsity, "l1" if dist == 1 else "l2", min_channels)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- ties, counts


@pytest.mark.parametrize("path", PATHS)
def test_ties_go_to_lowest_index(path):
    with code_path(path):
        _check_ties()


def _check_ties() -> None:
    w = np.ones((6, 3, 3, 3), dtype=np.float32)
    np.testing.assert_array_equal(fpgm_select(w, 0.5, device="cpu"), [0, 1, 2])
    # Two groups of identical filters: within the tied group the lowest indices go first.
    w = np.zeros((6, 4))
    w[[1, 3, 5]] = 1.0
    w[[0, 2, 4]] = -1.0
    w[4] = 5.0  # far away: largest score
    # Rows 1, 3, 5 tie for the smallest score and the cut (2 of 6) falls inside the tie.
    for dist in (1, 2):
        for _ in range(2):  # and again: reproducible
            np.testing.assert_array_equal(fpgm_select(w, 1 / 3, dist=dist, device="cpu"), [1, 3])


@pytest.mark.parametrize(
    ("n", "sparsity", "expected"),
    [
        (5, 0.5, 2),  # round(2.5) -> 2 (half to even)
        (7, 0.5, 4),  # round(3.5) -> 4
        (10, 0.25, 2),  # round(2.5) -> 2
        (6, 0.25, 2),  # round(1.5) -> 2
        (1, 0.5, 0),  # round(0.5) -> 0
        (4, 1.0, 3),  # keeps min_channels = 1
        (4, 0.0, 0),
        (0, 0.5, 0),
    ],
)
def test_n_to_prune_bankers_rounding(n, sparsity, expected):
    assert n_to_prune(n, sparsity) == expected == min(round(sparsity * n), max(n - 1, 0))


def test_sparsity_one_keeps_min_channels(rng):
    w = rng.standard_normal((10, 4, 3, 3)).astype(np.float32)
    assert fpgm_select(w, 1.0, device="cpu").size == 9
    assert keep_from_prune(10, fpgm_select(w, 1.0, device="cpu", min_channels=3)).size == 3
    assert n_to_prune(4, 1.0, min_channels=10) == 0
    np.testing.assert_array_equal(
        fpgm_select(w, 1.0, device="cpu", min_channels=3), ref_select(w, 1.0, "l2", 3)
    )


def test_keep_from_prune_is_sorted_complement():
    keep = keep_from_prune(8, np.array([6, 1, 3]))
    assert keep.dtype == np.int64
    np.testing.assert_array_equal(keep, [0, 2, 4, 5, 7])
    with pytest.raises(ConfigError):
        keep_from_prune(3, [3])


def test_degenerate_sizes():
    assert fpgm_select(np.ones((1, 3)), 0.9, device="cpu").size == 0
    assert fpgm_select(np.ones((0, 3)), 0.5, device="cpu").size == 0
    np.testing.assert_array_equal(fpgm_select(np.arange(6.0), 0.5, device="cpu"), [1, 2, 3])


def test_accepts_tensors_needing_grad_and_readonly_arrays(rng):
    w = rng.standard_normal((8, 5)).astype(np.float32)
    t = torch.from_numpy(w.copy()).requires_grad_()
    ro = w.copy()
    ro.setflags(write=False)
    want = ref_select(w, 0.5, "l2")
    np.testing.assert_array_equal(fpgm_select(t, 0.5, device="cpu"), want)
    np.testing.assert_array_equal(fpgm_select(ro, 0.5, device="cpu"), want)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sparsity", [-0.1, 1.1, float("nan")])
def test_bad_sparsity_raises_config_error(rng, sparsity):
    with pytest.raises(ConfigError):
        n_to_prune(10, sparsity)
    with pytest.raises(ConfigError):
        fpgm_select(rng.standard_normal((4, 3)), sparsity, device="cpu")


def test_bad_options_raise_config_error(rng):
    w = rng.standard_normal((4, 3))
    with pytest.raises(ConfigError):
        n_to_prune(10, 0.5, min_channels=0)
    with pytest.raises(ConfigError):
        fpgm_select(w, 0.5, dist=3, device="cpu")
    with pytest.raises(ConfigError):
        resolve_device("tpu")


@pytest.mark.skipif(CUDA, reason="a CUDA device is present")
def test_cuda_without_gpu_raises_config_error(rng):
    with pytest.raises(ConfigError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(ConfigError):
        fpgm_select(rng.standard_normal((4, 3)), 0.5, device="cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_callable_with_wrong_shape_raises_config_error(rng):
    w = rng.standard_normal((6, 3))
    with pytest.raises(ConfigError, match=r"\(6, 6\)"):
        fpgm_select(w, 0.5, dist=lambda x: x, device="cpu")
    with pytest.raises(ConfigError):
        fpgm_scores(w, dist=lambda x: x.sum(), device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_raise_scoring_error(rng, bad):
    w = rng.standard_normal((6, 3)).astype(np.float32)
    w[2, 1] = bad
    with pytest.raises(ScoringError):
        fpgm_select(w, 0.5, device="cpu")
    with pytest.raises(ScoringError):
        fpgm_scores(w, dist=1, device="cpu")


# --------------------------------------------------------------------------- norms, GPU


def test_norm_scores(rng):
    w = rng.standard_normal((7, 2, 3, 3)).astype(np.float32)
    flat = w.reshape(7, -1).astype(np.float64)
    np.testing.assert_allclose(l1_scores(w).numpy(), np.abs(flat).sum(1), rtol=1e-12)
    np.testing.assert_allclose(l2_scores(w).numpy(), np.sqrt((flat**2).sum(1)), rtol=1e-12)
    w[0, 0, 0, 0] = np.nan
    with pytest.raises(ScoringError):
        l2_scores(w)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dist", [1, 2, _cosine])
def test_cuda_selection_matches_cpu(rng, dist):
    for shape in [(64, 64, 3, 3), (256, 128, 1, 1), (512, 300)]:
        w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        for sparsity in (0.3, 0.5):
            cpu = fpgm_select(w, sparsity, dist=dist, device="cpu")
            gpu = fpgm_select(w.cuda(), sparsity, dist=dist, device="cuda")
            np.testing.assert_array_equal(gpu, cpu)
        np.testing.assert_allclose(
            fpgm_scores(w, dist=dist, device="cuda").numpy(),
            fpgm_scores(w, dist=dist, device="cpu").numpy(),
            rtol=1e-5,
        )


@pytest.mark.parametrize("scale", [1.0, 2.0**-45])
@pytest.mark.parametrize("p", [1, 2])
def test_float64_stages_from_float32_blocks_equal_the_float64_copy(rng, p, scale, monkeypatch):
    """Big float32 layers get no whole float64 copy: the float64 Gram stage and the explicit
    differences convert column blocks on the fly; their scores equal those from the copy."""
    from onnx_fpgm.importance import _distances

    monkeypatch.setattr(_distances, "_CPU_BLOCK_ELEMS", 300 * 7)  # 7-row column blocks
    x32 = torch.from_numpy(rng.standard_normal((50, 300)).astype(np.float32))
    x64 = x32.to(torch.float64) * scale
    rows = torch.tensor([3, 17, 18, 40, 49])
    direct = _distances._direct_scores(x32, rows, p, scale)
    np.testing.assert_allclose(direct, _distances._direct_scores(x64, rows, p), rtol=1e-13)
    if p == 2:
        sq = _distances._sq_norms64(x64)
        with_copy = _distances._l2_stage(x64, sq, rows, cast_error=False)
        blocked = _distances._l2_stage(x32, sq, rows, cast_error=False, to64=scale)
        np.testing.assert_allclose(blocked[0], with_copy[0], rtol=1e-13)
        np.testing.assert_allclose(blocked[1], with_copy[1], rtol=1e-6)
