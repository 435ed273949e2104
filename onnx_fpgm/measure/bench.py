"""Size and speed: parameters, MACs from inferred shapes, and onnxruntime latency.

Latency compares two models in one process, interleaved run by run after a warm-up, with
onnxruntime's thread spinning off: two spinning sessions on a small machine steal each other's
cores and double the measured time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..deps.op_families import RECURRENT_OPS
from ..model.io import light_copy
from ..model.outer_scope import all_graphs
from ..model.runtime import make_session, random_inputs


@dataclass(frozen=True)
class ModelSize:
    """Parameters (stored constants), multiply-accumulates and serialized bytes."""

    params: int
    macs: int
    bytes: int


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every stored constant: initializers and Constant node values, of the graph
    and of its subgraphs (the layers in an If's branches). A packed weight of com.microsoft
    ``MatMulNBits`` counts its codes, ``8 // bits`` a byte (N x K weights when K is a multiple
    of the block size), so an int4 model counts like its float twin and the scales and zero
    points come on top."""
    total = 0
    for graph in all_graphs(model.graph):
        codes_per_byte = packed_weights(graph.node)
        total += sum(int(np.prod(t.dims, dtype=np.int64)) * codes_per_byte.get(t.name, 1)
                     for t in graph.initializer)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        total += int(np.prod(attr.t.dims, dtype=np.int64))
    return total


def packed_weights(nodes) -> dict[str, int]:
    """Name -> codes per byte (``8 // bits``) of every packed N-bit weight: input 1 of a
    ``MatMulNBits`` NodeProto."""
    found = {}
    for node in nodes:
        if node.op_type != "MatMulNBits" or len(node.input) < 2:
            continue
        bits = next((int(a.i) for a in node.attribute if a.name == "bits"), 4)
        if bits and 8 % bits == 0:
            found[node.input[1]] = 8 // bits
    return found


def count_macs(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
               inferred: onnx.ModelProto | None = None) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul and their quantized forms (``MAC_OPS``), of
    fused attention (``attention_macs``) and of LSTM/GRU/RNN, from inferred shapes (unknown
    dims = 1)."""
    return sum(macs_by_node(model, input_shapes, inferred).values())


def macs_by_node(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None,
                 inferred: onnx.ModelProto | None = None) -> dict[str, int]:
    """MACs of every op in ``MAC_OPS`` and of recurrent layers, keyed by the node's first named
    output (``first_output``)."""
    if inferred is None:
        inferred = _with_input_shapes(model, input_shapes or {})
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    _fill_unknown_shapes(model, inferred, shapes, input_shapes or {})
    result: dict[str, int] = {}
    for node in inferred.graph.node:
        kind, w_index = MAC_OPS.get(node.op_type, (None, 0))
        get = [shapes.get(n) for n in node.input]
        out = shapes.get(node.output[0]) if node.output else None
        w = get[w_index] if len(get) > w_index else None
        macs = None
        if kind == "conv" and out and w:
            macs = int(np.prod(out)) * int(np.prod(w[1:]))
        elif kind == "convtranspose" and get[0] and w:
            macs = int(np.prod(get[0])) * int(np.prod(w[1:]))
        elif kind in ("gemm", "matmul") and out and get[0]:
            k = get[0][-1] if kind == "matmul" or not _attr(node, "transA") else get[0][0]
            macs = int(np.prod(out)) * int(k)
        elif kind == "attention":
            macs = attention_macs(node, get, out)
        if node.op_type in RECURRENT_OPS and get[0] and len(get) > 2 and get[1] and get[2]:
            # every step of every sequence runs X_t @ W^T and H_t-1 @ R^T for each direction
            # and gate: (seq * batch) * (|W| + |R|), in either layout
            macs = int(np.prod(get[0][:2])) * (int(np.prod(get[1])) + int(np.prod(get[2])))
        key = first_output(node.output)
        if macs is not None and key:
            result[key] = macs
    return result


def first_output(names) -> str:
    """The name MACs are keyed by: a node's first non-empty output (a recurrent layer may
    leave ``Y`` unnamed and give only ``Y_h``)."""
    return next((name for name in names if name), "")


#: Ops whose multiply-accumulates are counted: op -> (kind, index of the weight input). The
#: quantized ones (QOperator, com.microsoft QGemm and MatMulNBits, integer ops) count like their
#: float forms (MatMulNBits: A's last axis is K).
MAC_OPS: dict[str, tuple[str, int]] = {
    "Conv": ("conv", 1), "ConvInteger": ("conv", 1), "QLinearConv": ("conv", 3),
    "ConvTranspose": ("convtranspose", 1), "Gemm": ("gemm", 1), "QGemm": ("gemm", 3),
    "MatMul": ("matmul", 1), "MatMulInteger": ("matmul", 1), "QLinearMatMul": ("matmul", 3),
    "Attention": ("attention", 1), "MultiHeadAttention": ("attention", 1),
    "GroupQueryAttention": ("attention", 1),
    "MatMulNBits": ("matmul", 1),
}


def attention_macs(node: onnx.NodeProto, get: list, out: list | None) -> int | None:
    """A fused attention op's MACs: ``B * S * T * (Hq + Hv)`` for the score (QK^T) and context
    (AV) products, where Hq and Hv are the query and value widths over all query heads (a
    grouped-query KV head counts once per query head it serves), plus com.microsoft
    Attention's packed QKV projection ``B * S * H_in * (Hq + Hk + Hv)``. T is the key length
    of this call (a past cache's length is not counted); None when the shapes are not there."""
    q = get[0] if get else None
    if not q or len(q) not in (3, 4):
        return None
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        w = get[1] if len(get) > 1 else None
        if not w or len(w) != 2 or len(q) != 3:
            return None
        sizes = _attr(node, "qkv_hidden_sizes", None) or [w[1] // 3] * 3
        rows = int(np.prod(q[:2]))
        return rows * int(q[2]) * int(w[1]) + rows * int(q[1]) * (int(sizes[0]) + int(sizes[2]))
    k = get[1] if len(get) > 1 else None
    v = get[2] if len(get) > 2 else None
    if len(q) == 4:  # ONNX Attention (B, h, S, d) with k/v (B, h_kv, T, d)
        if not k or not v or len(k) != 4 or len(v) != 4:
            return None
        return int(np.prod(q[:3])) * int(k[2]) * (int(q[3]) + int(v[3]))
    heads = _attr(node, "q_num_heads") or _attr(node, "num_heads")
    kv_heads = _attr(node, "kv_num_heads") or heads
    if not k and node.op_type == "GroupQueryAttention" and heads and kv_heads:
        head_dim = int(q[2]) // (heads + 2 * kv_heads)  # q|k|v packed on query's last axis
        return int(np.prod(q[:2])) * int(q[1]) * 2 * heads * head_dim
    if not k or len(k) != 3:
        return None
    share = heads // kv_heads if heads and kv_heads else 1
    width_v = int(v[2]) * share if v and len(v) == 3 else int(q[2])
    return int(np.prod(q[:2])) * int(k[1]) * (int(q[2]) + width_v)


def _fill_unknown_shapes(model, inferred, shapes, input_shapes) -> None:
    """Where static inference gave up around a MAC op, read the shapes off one onnxruntime run."""
    static = {v.name: v for v in inferred.graph.value_info}
    missing = []
    for node in inferred.graph.node:
        if node.op_type in MAC_OPS or node.op_type in RECURRENT_OPS:
            names = [*node.input[:3]] if MAC_OPS.get(node.op_type, ("",))[0] == "attention" \
                else [node.input[0]]
            for name in (*names, first_output(node.output)):
                if not name:
                    continue
                info = static.get(name)
                dims = info.type.tensor_type.shape.dim if info is not None else []
                known = name in shapes and (len(dims) or name not in static) and all(
                    d.HasField("dim_value") for d in dims)
                if (not known or not shapes.get(name)) and name not in missing:
                    missing.append(name)
    graph_io = {v.name for v in (*model.graph.input, *model.graph.output)}
    missing = [m for m in missing if m not in graph_io]
    if not missing:
        return

    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    for name in missing:
        exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        values = make_session(exposed).run(missing, random_inputs(model, 0, input_shapes))
    except Exception:  # shapes stay unknown (counted as 1)
        return
    for name, value in zip(missing, values):
        shapes[name] = list(np.asarray(value).shape)


def _attr(node, name, default=0):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _with_input_shapes(model: onnx.ModelProto, input_shapes) -> onnx.ModelProto:
    """A weight-free copy with concrete input dims, shapes inferred by onnx.

    No symbolic-engine fallback: with concrete inputs onnx resolves nearly everything, and
    ``_fill_unknown_shapes`` reads what it leaves around a MAC op off one onnxruntime run.
    """
    light = light_copy(model)
    for value in light.graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for d, size in zip(dims, input_shapes[value.name]):
                d.ClearField("dim_param")
                d.dim_value = int(size)
    del light.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:  # inconsistent graph: every MAC op's shapes come from the run instead
        return light


def model_size(model: onnx.ModelProto, input_shapes=None) -> ModelSize:
    return ModelSize(count_params(model), count_macs(model, input_shapes), model.ByteSize())


@dataclass(frozen=True)
class LatencyResult:
    """Median and spread (interquartile range) of both models, in milliseconds."""

    provider: str
    original_ms: float
    original_iqr_ms: float
    pruned_ms: float
    pruned_iqr_ms: float
    runs: int

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms if self.pruned_ms > 0 else float("nan")


def best_provider() -> str:
    """CUDA only where it really loads (a GPU is present), else CPU, without log spam."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "CPUExecutionProvider"
    try:
        import torch

        if torch.cuda.is_available():
            return "CUDAExecutionProvider"
    except Exception:  # torch missing or broken: fall back to the CPU
        pass
    return "CPUExecutionProvider"


def benchmark(original: onnx.ModelProto, pruned: onnx.ModelProto, *, runs: int = 30,
              warmup: int = 5, provider: str | None = None, seed: int = 0,
              input_shapes: dict[str, tuple[int, ...]] | None = None,
              progress=None) -> LatencyResult:
    """Latency of both models measured side by side, interleaved, after warm-up."""
    provider = provider or best_provider()
    feeds = random_inputs(original, seed, input_shapes)
    sessions = [make_session(m, optimize=True, provider=provider) for m in (original, pruned)]
    runners = [_runner(s, f, provider)
               for s, f in zip(sessions, (feeds, _fitted(feeds, pruned)))]
    for _ in range(warmup):
        for run in runners:
            run()
    times: list[list[float]] = [[], []]
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for k in order:
            start = time.perf_counter()
            runners[k]()
            times[k].append((time.perf_counter() - start) * 1e3)
        if progress is not None:
            progress(1)
    stats = [(statistics.median(t), _iqr(t)) for t in times]
    return LatencyResult(provider, stats[0][0], stats[0][1], stats[1][0], stats[1][1], runs)


def _fitted(feeds: dict[str, np.ndarray], model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``feeds`` cut to ``model``'s fixed input dims where they are smaller (a KV cache shrunk
    with its heads under ``--allow-interface-change``): the first entries, for timing only."""
    fitted = dict(feeds)
    for value in model.graph.input:
        if value.name not in fitted:
            continue
        array = fitted[value.name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != array.ndim:
            continue
        index = tuple(slice(0, d.dim_value) if d.HasField("dim_value") and
                      d.dim_value < array.shape[k] else slice(None) for k, d in enumerate(dims))
        fitted[value.name] = np.ascontiguousarray(array[index])
    return fitted


def _runner(session, feeds, provider):
    if provider == "CPUExecutionProvider":
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda")

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def _iqr(values: list[float]) -> float:
    if len(values) < 4:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]
