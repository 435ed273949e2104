"""The ONNX-native peer (onnxsim's structured pruning) on one model, judged by our oracle.

``run_peer(model, sparsity, sizes)`` runs onnxsim's three structured passes, each at
``sparsity`` with its own defaults (L2 importance, per-layer), in this order on the result of
the last: ``apply_attention_head_pruning`` (whole heads / KV groups of fused attention ops and of
the decomposed pattern it matches), ``apply_structured_pruning`` (MatMul/Gemm widths) and
``apply_structured_pruning_matmul_nbits`` (int4 ``MatMulNBits`` widths). It returns the params
ratio, what the peer touched (heads by node, widths by consumer), whether onnxruntime loads and
runs its file (the error line if not, after each pass), and, where it runs, whether it is exact
against the masked original.

The peer keeps node and initializer names, and verifies nothing itself, so our oracle is
rebuilt from its weights: for every node whose weight (MatMul/Gemm/Conv B, MatMulNBits B,
Attention's packed weight) lost entries along its reduction axis, the kept indices are found by
matching the pruned weight's slices, bit for bit, against the original's (``kept_slices``: one
axis or two at once); the masked original multiplies that node's data input by a 0/1 mask over
the reduction axis (``mask_consumers``: so a weight shared with a Gather stays as it is); the
two are compared by ``onnx_fpgm.oracle.validate.compare`` on seeded random inputs at each size
set (max relative error <= 1e-4); the error against the unmasked original is reported beside it
(the masks must matter). A model no pass changed is "untouched" and not judged.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # onnx_fpgm from this tree without an install


def _sibling(name: str):
    """A module of this folder by path (the folder itself is not put on sys.path: its
    ``transformers.py`` would shadow the package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # peers.py puts this folder on sys.path for its own imports
    return module


_peers = _sibling("peers")
NotReconstructible, ValuesChanged, _attr = (_peers.NotReconstructible, _peers.ValuesChanged,
                                             _peers._attr)

#: onnxsim's structured passes, in the order they are applied.
PASSES = ("apply_attention_head_pruning", "apply_structured_pruning",
          "apply_structured_pruning_matmul_nbits")
#: ops whose ``num_heads`` / ``kv_num_heads`` the head pass rewrites.
ATTENTION_OPS = {"Attention", "GroupQueryAttention", "MultiHeadAttention", "PagedAttention",
                 "SparseAttention"}


def peer_version() -> str | None:
    """onnxsim's version, or None where it is not installed."""
    try:
        import onnxsim
    except ImportError:
        return None
    return getattr(onnxsim, "__version__", "?")


@dataclass
class PassRecord:
    """One onnxsim pass: how many weights it changed, the params ratio after it, and why its
    file does not run in onnxruntime (None: it runs; ``error``: the pass itself raised)."""

    name: str
    changed: int = 0
    params_ratio: float = 1.0
    refused: str | None = None
    error: str | None = None


@dataclass
class PeerResult:
    """What the peer did to one model and what our oracle says of it."""

    model: onnx.ModelProto | None = None
    params_ratio: float = 1.0
    heads: list[str] = field(default_factory=list)   # "node: num_heads 4->2"
    widths: list[str] = field(default_factory=list)  # "node: 344->172" by consumer
    runs: bool = False
    refused: str | None = None   # onnxruntime's first error line where it does not run
    exact: bool | None = None    # None: not judged (does not run, or not reconstructible)
    max_rel_error: float | None = None
    detail: str = ""
    wall_s: float = 0.0
    passes: list[PassRecord] = field(default_factory=list)

    def heads_text(self) -> str:
        return _summary(self.heads) or "none"

    def widths_text(self) -> str:
        return _summary(self.widths) or "none"

    def verdict(self) -> str:
        """``runs, exact`` as one cell: "yes, yes (3.1e-07)", "no: <error>", "yes, n/a"
        (not reconstructible), "yes, untouched"."""
        if not self.runs:
            return f"no: {self.refused}"[:90]
        if not any(p.changed for p in self.passes):
            return "yes, untouched"
        if self.exact is None:
            return "yes, n/a"
        return f"yes, {'yes' if self.exact else 'NO'} ({self.max_rel_error:.1e})"


def _summary(items: list[str]) -> str:
    """``["a: 344->172", "b: 344->172"]`` -> ``"344->172 x2"``, first-seen order."""
    counts = Counter(i.split(": ", 1)[-1] for i in items)
    return ", ".join(f"{k} x{n}" if n > 1 else k for k, n in counts.items())


# --------------------------------------------------------------------------- reconstruction


def kept_slices(original: np.ndarray, pruned: np.ndarray) -> dict[int, np.ndarray]:
    """Kept indices per shrunk axis of ``pruned``, a slice of ``original`` on one or two axes.

    Slices are matched bit for bit; an original with two equal slices on a shrunk axis is
    ambiguous (``NotReconstructible``), a pruned slice found nowhere means the values changed
    (``ValuesChanged``).
    """
    if original.ndim != pruned.ndim or original.dtype != pruned.dtype:
        raise NotReconstructible(f"shape {original.shape} -> {pruned.shape}, "
                                 f"dtype {original.dtype} -> {pruned.dtype}")
    axes = [a for a in range(original.ndim) if original.shape[a] != pruned.shape[a]]
    if any(original.shape[a] < pruned.shape[a] for a in axes):
        raise NotReconstructible(f"grew: {original.shape} -> {pruned.shape}")
    if not axes:
        if not np.array_equal(original, pruned):
            raise ValuesChanged("same shape, other values")
        return {}
    if len(axes) > 2:
        raise NotReconstructible(f"{len(axes)} axes shrunk")
    o = np.moveaxis(original, axes, list(range(len(axes))))
    p = np.moveaxis(pruned, axes, list(range(len(axes))))
    if len(axes) == 1:
        return {axes[0]: _match(o, p)}
    for r in range(o.shape[0]):  # the first pruned row: which original row, which columns
        try:
            cols = _match(o[r], p[0])
        except ValuesChanged:
            continue
        rows = _match(np.ascontiguousarray(o[:, cols]), p)
        return {axes[0]: rows, axes[1]: cols}
    raise ValuesChanged("the first pruned row is no original row restricted to some columns")


def _match(original: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """Index into axis 0 of ``original`` of each slice of ``pruned`` (bit-exact, unique)."""
    index: dict[bytes, int] = {}
    for i in range(original.shape[0]):
        key = np.ascontiguousarray(original[i]).tobytes()
        if key in index:
            raise NotReconstructible(f"slices {index[key]} and {i} are equal: ambiguous")
        index[key] = i
    try:
        rows = [index[np.ascontiguousarray(pruned[j]).tobytes()] for j in range(pruned.shape[0])]
    except KeyError as err:
        raise ValuesChanged("a kept slice is not an original slice") from err
    if len(set(rows)) != len(rows):
        raise NotReconstructible("one original slice kept twice")
    return np.asarray(rows, dtype=np.int64)


def _reduction_axis(node: onnx.NodeProto, rank: int) -> int | None:
    """The axis of ``node``'s weight (input 1) that its data input's channels contract with."""
    op = node.op_type
    if op == "MatMul":
        return rank - 2
    if op == "Gemm":
        return 1 if _attr(node, "transB", 0) else 0
    if op == "Conv":
        return 1
    if op == "MatMulNBits":
        return 1  # B is [N, K blocks, blob]
    if op == "Attention":
        return 0  # the packed [hidden, 3 x hidden] q|k|v weight
    return None


def removed_inputs(original: onnx.ModelProto,
                   pruned: onnx.ModelProto) -> dict[str, tuple[np.ndarray, int]]:
    """Kept reduction indices (and the original count) of every node whose weight lost some."""
    ow = {t.name: t for t in original.graph.initializer}
    pw = {t.name: t for t in pruned.graph.initializer}
    out: dict[str, tuple[np.ndarray, int]] = {}
    for node in original.graph.node:
        if len(node.input) < 2 or node.input[1] not in ow or node.input[1] not in pw:
            continue
        w_o, w_p = ow[node.input[1]], pw[node.input[1]]
        if list(w_o.dims) == list(w_p.dims):
            continue
        axis = _reduction_axis(node, len(w_o.dims))
        if axis is None or w_o.dims[axis] == w_p.dims[axis]:
            continue
        if node.op_type == "MatMulNBits":
            raise NotReconstructible(f"{node.name}: MatMulNBits K repacked")
        if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
            raise NotReconstructible(f"{node.name}: grouped Conv")
        kept = kept_slices(numpy_helper.to_array(w_o), numpy_helper.to_array(w_p))
        out[node.name] = (kept[axis], int(w_o.dims[axis]))
    return out


def mask_consumers(original: onnx.ModelProto,
                   removed: dict[str, tuple[np.ndarray, int]]) -> onnx.ModelProto:
    """Copy of ``original`` whose listed nodes read their data input through a 0/1 mask over
    the reduction axis (last axis; axis 1 for Conv): the removed channels are ignored."""
    masked = onnx.ModelProto()
    masked.CopyFrom(original)
    dtypes = {t.name: helper.tensor_dtype_to_np_dtype(t.data_type)
              for t in original.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    for node in masked.graph.node:
        if node.name in removed:
            kept, count = removed[node.name]
            mask = np.zeros(count, dtype=dtypes.get(node.input[1], np.float32))
            mask[kept] = 1
            if node.op_type == "Conv":
                rank = len(next(t for t in original.graph.initializer
                                if t.name == node.input[1]).dims)
                mask = mask.reshape(count, *([1] * (rank - 2)))
            name = f"{node.name}/peer_mask"
            masked.graph.initializer.append(numpy_helper.from_array(mask, name))
            nodes.append(helper.make_node("Mul", [node.input[0], name], [f"{name}:out"],
                                          name=name))
            node.input[0] = f"{name}:out"
        nodes.append(node)
    del masked.graph.node[:]
    masked.graph.node.extend(nodes)
    return masked


def touched(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(heads, widths): attention ops whose head counts changed, and the widths that went,
    by the node that contracts over them (the peer prunes a producer only with its one
    consumer; a fused attention's output projection counts as heads, not a width)."""
    o_nodes = {n.name: n for n in original.graph.node}
    heads, attention_outputs = [], set()
    for node in pruned.graph.node:
        old = o_nodes.get(node.name)
        if old is None or node.op_type not in ATTENTION_OPS:
            continue
        for key in ("num_heads", "kv_num_heads", "q_num_heads"):
            a, b = _attr(old, key), _attr(node, key)
            if a is not None and a != b:
                heads.append(f"{node.name}: {key} {a}->{b}")
                attention_outputs.update(node.output)
    producers = {o: n for n in original.graph.node for o in n.output}
    ow = {t.name: list(t.dims) for t in original.graph.initializer}
    pw = {t.name: list(t.dims) for t in pruned.graph.initializer}
    widths = []
    for node in original.graph.node:
        w = node.input[1] if len(node.input) > 1 else ""
        if w not in ow or w not in pw or ow[w] == pw[w]:
            continue
        axis = _reduction_axis(node, len(ow[w]))
        if axis is not None and ow[w][axis] != pw[w][axis]:
            if _reads(node.input[0], attention_outputs, producers):
                continue
            widths.append(f"{node.name}: {ow[w][axis]}->{pw[w][axis]}")
    return heads, widths


def _reads(name: str, sources: set[str], producers: dict[str, onnx.NodeProto]) -> bool:
    """Does ``name`` come from ``sources`` through layout ops (Reshape, Transpose, ...)?"""
    while name not in sources:
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Transpose", "Identity", "Flatten"):
            return False
        name = node.input[0]
    return True


# --------------------------------------------------------------------------- running it


def refusal(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str | None:
    """onnxruntime's first error line on loading and running ``model`` (None: it runs), with
    its graph optimizations on, as a user's session has them."""
    from onnx_fpgm.model.runtime import make_session

    try:
        make_session(model, optimize=True, quiet=True).run(None, feeds)
    except Exception as err:  # noqa: BLE001  (any refusal is the finding)
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


def judge(original: onnx.ModelProto, pruned: onnx.ModelProto,
          feed_sets: list[dict[str, np.ndarray]]) -> tuple[bool | None, float | None, str]:
    """(exact, max rel err, detail) of ``pruned`` against the masked original."""
    from onnx_fpgm.oracle.validate import compare

    try:
        masked = mask_consumers(original, removed_inputs(original, pruned))
    except NotReconstructible as err:
        return None, None, f"cannot reconstruct: {err}"
    except ValuesChanged as err:
        return False, None, f"values changed: {err}"
    worst, texts = 0.0, []
    for feeds in feed_sets:
        result = compare(masked, pruned, feeds)
        if result.reference_failed:
            return None, None, result.summary()
        if not result:
            return False, result.max_rel_error, result.summary()
        worst = max(worst, result.max_rel_error)
        texts.append(result.summary())
    unmasked = compare(original, pruned, feed_sets[0]).max_rel_error  # the masks matter
    return True, worst, (f"{len(feed_sets)} input set(s): {texts[-1]}; against the unmasked "
                         f"original {unmasked:.2e}")


def run_peer(model: onnx.ModelProto, sparsity: float = 0.5,
             sizes: list[dict[str, tuple[int, ...]]] | None = None) -> PeerResult:
    """onnxsim's structured passes on ``model`` and our oracle's verdict (see the module).

    ``sizes``: input shapes for symbolic dims, one dict per size set checked (default: one
    set, every symbolic dim 1 where the model allows it).
    """
    from onnxsim import pruning

    from onnx_fpgm.measure.bench import count_params
    from onnx_fpgm.model.runtime import random_inputs

    feed_sets = [random_inputs(model, seed, s) for seed, s in enumerate(sizes or [{}])]
    before = count_params(model)
    result, current = PeerResult(), model
    for name in PASSES:
        record = PassRecord(name)
        start = time.perf_counter()
        try:
            after = getattr(pruning, name)(current, sparsity)
        except Exception as err:  # noqa: BLE001  (a pass that declines the model is a finding)
            record.error = f"{type(err).__name__}: {str(err).strip()[:120]}"
            result.passes.append(record)
            continue
        finally:
            result.wall_s += time.perf_counter() - start
        old = {t.name: list(t.dims) for t in current.graph.initializer}
        record.changed = sum(old.get(t.name) != list(t.dims) for t in after.graph.initializer)
        record.params_ratio = count_params(after) / before
        if record.changed:
            record.refused = refusal(after, feed_sets[0])
        result.passes.append(record)
        current = after
    result.model = current
    result.params_ratio = count_params(current) / before
    result.heads, result.widths = touched(model, current)
    result.refused = refusal(current, feed_sets[0])
    result.runs = result.refused is None
    if result.runs and any(p.changed for p in result.passes):
        result.exact, result.max_rel_error, result.detail = judge(model, current, feed_sets)
    parts = [result.detail, "passes: " + ", ".join(_pass_text(p) for p in result.passes),
             "by layer: " + (", ".join(result.heads + result.widths) or "nothing")]
    result.detail = "; ".join(p for p in parts if p)
    return result


def _pass_text(record: PassRecord) -> str:
    short = record.name.removeprefix("apply_").removesuffix("_pruning")
    if record.error:
        return f"{short} raised {record.error}"
    if not record.changed:
        return f"{short} none"
    runs = "runs" if record.refused is None else f"refused: {record.refused[:80]}"
    return f"{short} {record.changed} weights, params {record.params_ratio:.3f} ({runs})"
