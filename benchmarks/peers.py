"""onnx-fpgm against two peer structured pruners, at the same sparsity, on the same models.

Usage: ``python benchmarks/peers.py [--sparsity 0.5] [--runs 20] [--warmup 3]
[--models resnet50 mobilenetv2]``

For each model (the torch module from ``models/make_*.py``, seeded exactly as the generators
seed it) the module is exported once (eval, TorchScript ``dynamo=False``, opset 17,
1x3x224x224; the exporter folds BatchNorm into Conv), then:

- **onnx-fpgm**: ``onnx_fpgm.prune(model, sparsity, verify=True)`` on that ONNX
  ``ModelProto``; the wall time includes its own verification; the oracle column is that
  verification.
- **onnxsim**: ``onnxsim.pruning.apply_structured_pruning(model, sparsity)`` (L2-norm filter
  criterion) on the same ``ModelProto``; the wall time excludes importing
  ``onnxsim.pruning`` (printed separately). There is no verification of its own, so
  *our* oracle is applied: which output channels it removed is reconstructed from the weights
  (see ``reconstruct``), the masked original is built (every group=1 Conv / Gemm of the
  original gets the input columns of removed channels zeroed) and
  ``onnx_fpgm.oracle.validate.compare(masked, peer, random_inputs(original, 0))`` must pass
  (max relative error <= 1e-4).
- **Torch-Pruning**: ``tp.pruner.BasePruner`` (``MetaPruner`` on older versions) with
  ``FPGMImportance`` (GroupNormImportance if missing), ``pruning_ratio=sparsity``, the final
  Linear ignored, ``example_inputs=torch.randn(1, 3, 224, 224)``, on a copy of the torch module
  before export; the wall time is the pruner's construction (which builds the DependencyGraph)
  plus ``step()``. ``step(interactive=True)`` is used to record, per group, which input
  channels each Conv/Linear loses; the oracle zeroes exactly those input columns in a copy of
  the *original torch module*, exports it the same way and compares it with the pruned export.
  The ONNX-side reconstruction is also run on the Torch-Pruning export as a cross-check.

Params and MACs are counted with ``onnx_fpgm.measure.bench`` on the ONNX files (ratios are
before/after). Latency is ``onnx_fpgm.measure.bench.benchmark(original, pruned, runs, warmup)``
(onnxruntime CPU, both sessions interleaved in this process), once per tool, all in this run.
As negative control, ``unmasked err`` is the relative error of each pruned model against the
*unmasked* original: far above 1e-4, so the oracle is not passing trivially. ``shapes = fpgm``
says whether the Conv/Gemm weight shapes equal onnx-fpgm's; ``kept inputs vs fpgm`` counts the
Conv/Gemm layers whose kept input channels are exactly onnx-fpgm's, and the mean overlap of the
kept sets over the layers where both keep equally many (about 50 % is what chance gives at
sparsity 0.5).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))  # the generators import ``_common`` as a top module
sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import format_table  # noqa: E402  (one table format for every benchmark)

MODELS = {
    "resnet50": ("ResNet-50 224", "make_resnet50", "ResNet50", lambda m: m.fc),
    "mobilenetv2": ("MobileNetV2 224", "make_mobilenetv2", "MobileNetV2",
                    lambda m: m.classifier[1]),
}

#: ops that keep the channel axis (axis 1) as it is, one data input
CHANNEL_PRESERVING = {"Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
                      "GlobalMaxPool", "Identity", "Dropout", "Sigmoid", "HardSigmoid",
                      "HardSwish", "LeakyRelu"}
#: binary elementwise ops; both operands must keep the same channels
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


# --------------------------------------------------------------------------- reconstruction


class NotReconstructible(Exception):
    """The peer's output cannot be mapped back onto the original's channels (oracle n/a)."""


class ValuesChanged(Exception):
    """A kept filter row is not an exact row of the original: the oracle fails by definition."""


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _rows(node: onnx.NodeProto, w: np.ndarray) -> np.ndarray:
    """Weight as [out, in, ...] (Gemm without transB stores [in, out])."""
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0):
            raise NotReconstructible(f"{node.name}: Gemm with transA")
        return w if _attr(node, "transB", 0) else w.T
    return w


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Kept input channels (original indices) of every Conv/Gemm of ``original``, by name.

    Walks the pruned graph in order, carrying for each tensor which original channels (axis 1)
    it still holds. A Conv/Gemm's kept output channels are found by matching each pruned filter
    row, exactly, against the original's rows restricted to the kept input channels; its bias
    must be the original bias at those rows. Conv/Gemm nodes are paired by position.
    """
    ow, pw = _weights(original), _weights(pruned)
    o_mac = [n for n in original.graph.node if n.op_type in ("Conv", "Gemm")]
    p_mac = [n for n in pruned.graph.node if n.op_type in ("Conv", "Gemm")]
    if [n.op_type for n in o_mac] != [n.op_type for n in p_mac]:
        raise NotReconstructible("the Conv/Gemm sequence differs from the original's")
    pair = {id(p): o for p, o in zip(p_mac, o_mac)}
    inits = {t.name for t in pruned.graph.initializer}
    kept: dict[str, np.ndarray | None] = {}
    for value in pruned.graph.input:
        if value.name not in inits:
            dims = value.type.tensor_type.shape.dim
            kept[value.name] = np.arange(dims[1].dim_value) if len(dims) > 1 else None
    consumers: dict[str, np.ndarray] = {}
    for node in pruned.graph.node:
        op = node.op_type
        if op == "Constant":
            continue
        data = [i for i in node.input if i and i not in pw]
        if op in ("Conv", "Gemm"):
            o = pair[id(node)]
            s = kept.get(node.input[0])
            if s is None:
                raise NotReconstructible(f"{node.name}: unknown input channels")
            w_o, w_p = _rows(o, ow[o.input[1]]), _rows(node, pw[node.input[1]])
            g_o, g_p = int(_attr(o, "group", 1)), int(_attr(node, "group", 1))
            if op == "Conv" and g_o > 1:
                if not (g_o == w_o.shape[0] and w_o.shape[1] == 1):
                    raise NotReconstructible(f"{node.name}: grouped (not depthwise) Conv")
                if g_p != len(s) or w_p.shape[0] != len(s):
                    raise NotReconstructible(f"{node.name}: depthwise group {g_p} vs "
                                             f"{len(s)} kept channels")
                rows = s
                if not np.array_equal(w_p, w_o[s]):
                    raise ValuesChanged(f"{node.name}: depthwise filters differ")
            else:
                if g_p != 1 or w_p.shape[1] != len(s):
                    raise NotReconstructible(f"{node.name}: {w_p.shape[1]} input channels, "
                                             f"{len(s)} expected")
                consumers[o.name] = s
                sub = np.ascontiguousarray(w_o[:, s])
                index = {sub[r].tobytes(): r for r in range(sub.shape[0])}
                rows = []
                for j in range(w_p.shape[0]):
                    r = index.get(np.ascontiguousarray(w_p[j]).tobytes())
                    if r is None:
                        raise ValuesChanged(f"{node.name}: filter {j} is not an original "
                                            "filter restricted to the kept inputs")
                    rows.append(r)
                rows = np.asarray(rows)
                if len(set(rows.tolist())) != len(rows):
                    raise NotReconstructible(f"{node.name}: duplicate filters")
            if len(node.input) > 2 and node.input[2]:
                b_o, b_p = ow[o.input[2]], pw[node.input[2]]
                if not np.array_equal(b_p, b_o[rows]):
                    raise ValuesChanged(f"{node.name}: bias differs")
            kept[node.output[0]] = rows
        elif op in CHANNEL_PRESERVING or (op == "Flatten" and _attr(node, "axis", 1) == 1):
            kept[node.output[0]] = kept.get(data[0]) if data else None
        elif op in ELEMENTWISE:
            sets = [kept.get(i) for i in data]
            if any(x is None for x in sets) or any(not np.array_equal(sets[0], x)
                                                   for x in sets[1:]):
                raise NotReconstructible(f"{node.name}: {op} of different channel sets")
            consts = [pw[i] for i in node.input if i in pw]
            if any(c.size > 1 for c in consts):
                raise NotReconstructible(f"{node.name}: per-channel constant operand")
            kept[node.output[0]] = sets[0]
        else:
            raise NotReconstructible(f"{node.name}: op {op} not handled by the reconstruction")
    return consumers


def mask_original(original: onnx.ModelProto, consumers: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Copy of ``original`` with every Conv/Gemm's input columns outside its kept set zeroed."""
    masked = onnx.ModelProto()
    masked.CopyFrom(original)
    inits = {t.name: t for t in masked.graph.initializer}
    uses: dict[str, int] = {}
    for node in masked.graph.node:
        for i in node.input:
            uses[i] = uses.get(i, 0) + 1
    for node in masked.graph.node:
        if node.name not in consumers:
            continue
        name = node.input[1]
        if name not in inits or uses[name] != 1:
            raise NotReconstructible(f"{node.name}: weight is not a private initializer")
        w = numpy_helper.to_array(inits[name]).copy()
        gone = np.setdiff1d(np.arange(_rows(node, w).shape[1]), consumers[node.name])
        if node.op_type == "Gemm" and not _attr(node, "transB", 0):
            w[gone, :] = 0
        else:
            w[:, gone] = 0
        inits[name].CopyFrom(numpy_helper.from_array(w, name))
    return masked


def onnx_oracle(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[str, str]:
    """(short verdict, detail) of our oracle on a peer's pruned ONNX."""
    from onnx_fpgm.oracle.validate import compare
    from onnx_fpgm.model.runtime import random_inputs

    try:
        masked = mask_original(original, reconstruct(original, pruned))
    except NotReconstructible as err:
        return "n/a", f"cannot reconstruct: {err}"
    except ValuesChanged as err:
        return "FAILED", f"values changed: {err}"
    result = compare(masked, pruned, random_inputs(original, 0))
    return ("passed" if result else "FAILED"), result.summary()


def unmasked_error(original: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    from onnx_fpgm.oracle.validate import compare
    from onnx_fpgm.model.runtime import random_inputs

    return compare(original, pruned, random_inputs(original, 0)).max_rel_error


# --------------------------------------------------------------------------- the tools


def export_module(module, path: Path) -> onnx.ModelProto:
    from _common import TORCHSCRIPT_OPSET, export

    assert TORCHSCRIPT_OPSET == 17
    export(module, (1, 3, 224, 224), path, dynamo=False)
    return onnx.load(os.fspath(path))


def run_fpgm(original, sparsity):
    import onnx_fpgm

    t0 = time.perf_counter()
    result = onnx_fpgm.prune(original, sparsity, verify=True)
    wall = time.perf_counter() - t0
    v = result.report.verification
    verdict = "passed" if v and v["passed"] else "FAILED"
    cross, cross_detail = onnx_oracle(original, result.model)
    verify_s = result.report.timings_s.get("verify", 0.0)
    return result.model, wall, verdict, (f"own verification ({verify_s:.2f} s of the wall "
                                         f"time): {v['summary'] if v else '-'}; "
                                         f"this script's ONNX-side oracle (cross-check of "
                                         f"the reconstruction): {cross} ({cross_detail})")


def run_onnxsim(original, sparsity):
    from onnxsim.pruning import apply_structured_pruning

    t0 = time.perf_counter()
    pruned = apply_structured_pruning(original, sparsity)
    wall = time.perf_counter() - t0
    verdict, detail = onnx_oracle(original, pruned)
    return pruned, wall, verdict, detail


def run_torch_pruning(module, last_layer, sparsity, tmp: Path, original):
    import torch
    import torch_pruning as tp

    from onnx_fpgm.oracle.validate import compare
    from onnx_fpgm.model.runtime import random_inputs

    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    if hasattr(tp.importance, "FPGMImportance"):
        importance, imp_name = tp.importance.FPGMImportance(), "FPGMImportance"
    else:
        importance, imp_name = tp.importance.GroupNormImportance(p=2), "GroupNormImportance"
    model = copy.deepcopy(module).eval()
    names = {m: n for n, m in model.named_modules()}
    example = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    pruner = pruner_cls(model, example, importance=importance, pruning_ratio=sparsity,
                        ignored_layers=[last_layer(model)])
    removed_in: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            layer = dep.target.module
            handler = getattr(dep.handler, "__name__", str(dep.handler))
            if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear) and "in_channels" in handler:
                removed_in.setdefault(names[layer], set()).update(int(i) for i in idxs)
        group.prune()
    wall = time.perf_counter() - t0
    pruned = export_module(model, tmp / "tp.onnx")
    # oracle on the torch side: the original module with the removed input columns zeroed
    masked = copy.deepcopy(module).eval()
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for name, idxs in removed_in.items():
            layer = modules[name]
            if isinstance(layer, torch.nn.Conv2d) and layer.groups != 1:
                continue  # depthwise: not a contraction over channels
            layer.weight[:, sorted(idxs)] = 0
    masked_onnx = export_module(masked, tmp / "tp_masked.onnx")
    result = compare(masked_onnx, pruned, random_inputs(original, 0))
    verdict = "passed" if result else "FAILED"
    cross, cross_detail = onnx_oracle(original, pruned)
    detail = (f"torch-side masked original: {result.summary()}; ONNX-side reconstruction "
              f"cross-check: {cross} ({cross_detail}); {pruner_cls.__name__} + {imp_name}")
    return pruned, wall, verdict, detail


def _mac_shapes(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    w = _weights(model)
    return [tuple(w[n.input[1]].shape) for n in model.graph.node
            if n.op_type in ("Conv", "Gemm") and n.input[1] in w]


def same_as(original, ours, pruned) -> dict[str, str]:
    """Does ``pruned`` have onnx-fpgm's layer shapes, and keep the same channels per layer?"""
    if ours is None:
        return {"shapes = fpgm": "-", "kept inputs vs fpgm": "-"}
    shapes = "yes" if _mac_shapes(ours) == _mac_shapes(pruned) else "no"
    try:
        a, b = reconstruct(original, ours), reconstruct(original, pruned)
    except (NotReconstructible, ValuesChanged):
        return {"shapes = fpgm": shapes, "kept inputs vs fpgm": "n/a"}
    same = sum(k in b and np.array_equal(a[k], b[k]) for k in a)
    # overlap of the kept input-channel sets, over layers where both keep as many channels
    both = [k for k in a if k in b and len(a[k]) == len(b[k])]
    overlap = np.mean([len(np.intersect1d(a[k], b[k])) / len(a[k]) for k in both])
    return {"shapes = fpgm": shapes,
            "kept inputs vs fpgm": f"{same}/{len(a)} identical, {overlap:.0%} overlap "
                                   f"({len(both)} layers)"}


# --------------------------------------------------------------------------- driver


def header() -> str:
    import onnxruntime
    import torch

    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}",
                f"onnxruntime {onnxruntime.__version__}", f"onnx {onnx.__version__}"]
    for mod in ("onnxsim", "torch_pruning"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception as err:  # noqa: BLE001
            versions.append(f"{mod} unavailable ({type(err).__name__})")
    return (f"date: {_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}\n"
            f"{', '.join(versions)}\n"
            f"cpus {os.cpu_count()}, load avg (1/5/15 min) "
            + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)

    import importlib

    import torch

    from _common import build_seeded
    from onnx_fpgm.measure.bench import benchmark, count_macs, count_params

    started = time.perf_counter()
    import onnxsim.pruning  # noqa: F401  (a 2.6 MB module: its import is kept out of the timing)
    import_s = time.perf_counter() - started
    print(header(), flush=True)
    print(f"import onnxsim + onnxsim.pruning: {import_s:.2f} s (not in 'wall s')")
    print(f"sparsity {args.sparsity}, latency runs {args.runs}, warmup {args.warmup}, "
          f"torch threads {torch.get_num_threads()}\n", flush=True)

    rows: list[dict[str, object]] = []
    details: list[dict[str, object]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="peers-") as tmpdir:
        tmp = Path(tmpdir)
        for key in args.models:
            label, module_name, class_name, last_layer = MODELS[key]
            gen = importlib.import_module(module_name)
            module = build_seeded(getattr(gen, class_name), gen.INPUT_SHAPE, 0)
            original = export_module(module, tmp / f"{key}.onnx")
            p0, m0 = count_params(original), count_macs(original)
            ours = None
            tools = (
                ("onnx-fpgm", lambda: run_fpgm(original, args.sparsity)),
                ("onnxsim", lambda: run_onnxsim(original, args.sparsity)),
                ("Torch-Pruning", lambda: run_torch_pruning(module, last_layer, args.sparsity,
                                                            tmp, original)),
            )
            for tool, run in tools:
                row: dict[str, object] = {"tool": tool, "model": label}
                try:
                    pruned, wall, verdict, detail = run()
                    p1, m1 = count_params(pruned), count_macs(pruned)
                    lat = benchmark(original, pruned, runs=args.runs, warmup=args.warmup)
                except Exception as err:  # report one tool's failure, keep the other rows
                    traceback.print_exc()
                    row.update({"wall s": None, "params ratio": None, "MACs ratio": None,
                                "latency speedup": None, "oracle": f"error: {type(err).__name__}"})
                    rows.append(row)
                    notes.append(f"{tool} / {label}: {type(err).__name__}: {err}")
                    continue
                row.update({"wall s": wall, "params ratio": p0 / p1, "MACs ratio": m0 / m1,
                            "latency speedup": lat.speedup, "oracle": verdict})
                rows.append(row)
                details.append({"tool": tool, "model": label, "params": f"{p0:,} -> {p1:,}",
                                "MACs": f"{m0:,} -> {m1:,}", "orig ms": lat.original_ms,
                                "orig IQR": lat.original_iqr_ms, "pruned ms": lat.pruned_ms,
                                "pruned IQR": lat.pruned_iqr_ms,
                                "unmasked err": f"{unmasked_error(original, pruned):.2e}"})
                if tool == "onnx-fpgm":
                    ours = pruned
                details[-1].update(same_as(original, ours, pruned))
                notes.append(f"{tool} / {label}: {detail}")
                print(f"  done {tool} {label}", flush=True)

    print()
    print(format_table(rows))
    print()
    print(format_table(details))
    print()
    for note in notes:
        print(f"- {note}")
    print(f"\nload avg after: {os.getloadavg()[0]:.2f}; wall {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
