"""Quantized models at sparsity 0.5: onnx-fpgm against onnxsim's QDQ/QOperator pruning.

    python benchmarks/quantized.py [--zoo]

Models: the zoo's ResNet-like and MobileNetV2-like (tests/torch_models.py), exported by TorchScript
(BN folded) and quantized by ``onnxruntime.quantization.quantize_static`` over 4 seeded random
batches (tests/quantized_models.py): QDQ per-tensor, QDQ per-channel and QOperator per-channel;
then the hand-built QDQ forms. Per model: params after/before for each tool, our oracle (max
relative error with activation Q/DQ pairs bypassed; the real quantized models' largest
difference in quantization steps) and wall time. The peer (onnxsim's
``apply_structured_pruning_qdq`` / ``apply_structured_pruning_qoperator``, when the installed
onnxsim has them) is not verified by our oracle here: its removed channels are not reported by it.
``--zoo`` adds every zoo model, QDQ and QOperator per-channel, with our coverage and the first
blocking reasons (ours only).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_fpgm  # noqa: E402
from onnx_fpgm.measure.bench import count_params  # noqa: E402
from tests.quantized_models import HAND_BUILT, STATIC_MODELS, hand_built, static  # noqa: E402

FORMS = {"QDQ per-tensor": ("qdq", False), "QDQ per-channel": ("qdq", True),
         "QOperator per-channel": ("qoperator", True)}


def _peer(fmt: str):
    try:
        from onnxsim import pruning
    except ImportError:
        return None
    return getattr(pruning, f"apply_structured_pruning_{fmt}", None)


def _row(label: str, model, fmt: str) -> str:
    start = time.perf_counter()
    r = onnx_fpgm.prune(model, 0.5).report
    ours_s = time.perf_counter() - start
    summary = r.verification["summary"]
    steps = summary.split("differ by at most ")[1].split(" ")[0] if "differ by" in summary else \
        "bit for bit" if "bit for bit" in summary else "-"
    row = (f"| {label} | {r.before.params:,} | {r.after.params / r.before.params:.2f} | "
           f"{r.verification['max_rel_error']:.1e} | {steps} | {ours_s:.1f} |")
    peer = _peer(fmt)
    if peer is None:
        return row + " not available | - |"
    start = time.perf_counter()
    try:
        pruned = peer(model, 0.5)
        return row + (f" {count_params(pruned) / r.before.params:.2f} | "
                      f"{time.perf_counter() - start:.1f} |")
    except Exception as err:  # the peer refusing a model
        return row + f" failed: {type(err).__name__} | - |"


def main() -> None:
    logging.disable(logging.WARNING)  # quantize_static's pre-processing advice
    print("| model | params before | ours: after/before | ours: oracle max rel. error "
          "(Q/DQ bypassed) | ours: quantized models, max steps | ours s | peer: after/before "
          "| peer s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in STATIC_MODELS:
        for form, (fmt, per_channel) in FORMS.items():
            print(_row(f"{name} {form}", static(name, fmt, per_channel), fmt), flush=True)
    for form in HAND_BUILT:
        print(_row(f"hand-built {form}", hand_built(form), "qdq"), flush=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", action="store_true")
    if parser.parse_args().zoo:
        zoo_rows()


def zoo_rows() -> None:
    """Every zoo model quantized per channel (QDQ, QOperator): ours at 0.5."""
    from tests.torch_models import ZOO

    print("\n| model | format | ours: after/before | prunable channels | verification | "
          "blocked by (first reasons, graph outputs aside) |")
    print("|---|---|---|---|---|---|")
    for name in ZOO:
        for fmt in ("qdq", "qoperator"):
            r = onnx_fpgm.prune(static(name, fmt, True), 0.5).report
            reasons = sorted({g.frozen for g in r.groups
                              if g.frozen and "graph output" not in g.frozen})
            check = "bit for bit" if "bit for bit" in r.verification["summary"] else \
                f"{r.verification['max_rel_error']:.1e}"
            print(f"| {name} | {fmt} | {r.after.params / r.before.params:.2f} | "
                  f"{r.prunable_channels}/{r.total_channels} | {check} | "
                  f"{'; '.join(x[:70] for x in reasons[:2]) or '-'} |", flush=True)


if __name__ == "__main__":
    main()
