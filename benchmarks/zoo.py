"""The architecture zoo at sparsity 0.5: groups, coverage, params and MACs, oracle error.

    python benchmarks/zoo.py [--peers]

Uses the test zoo (tests/torch_models.py) and the transformer models of tests/attention_models.py,
exported by TorchScript (BN folded) and by torch.export (BN kept). With --peers, also the params
after onnxsim's structured pruning. ``--only NAME`` runs the named models only (and skips the
dynamic forms). Heads (attention layers' whole heads) are counted in "groups" like channel groups;
"heads kept" sums them over the attention layers. Then the shipped forms with dynamic input dims
(tests/shipped_forms.py), pruned with no option but the sparsity: the sizes chosen and verified,
and the time of the whole prune.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_fpgm  # noqa: E402
from onnx_fpgm.measure.bench import count_params  # noqa: E402
from tests import shipped_forms  # noqa: E402
from tests.attention_models import ATTENTION_ZOO  # noqa: E402
from tests.torch_models import ZOO, export_onnx  # noqa: E402

MODELS = {**ZOO, **ATTENTION_ZOO}

#: Shipped forms (issue 9): dynamic input dims, computed shape parameters, quantized graphs.
DYNAMIC_FORMS = {
    **shipped_forms.DYNAMIC_DIM_FORMS,
    # partly computed shape parameters and quantized graphs (issue 9, items 4-5)
    "tf2onnx computed Flatten": shipped_forms.tf2onnx_computed_flatten,
    "paddle reshape [0, -1]": shipped_forms.paddle_reshape_zero_minus_one,
    "resize with computed sizes": shipped_forms.resize_computed_sizes,
    "slice bounds partly computed": shipped_forms.slice_bounds_partly_computed,
    **{f"torch x.{form}(batch, ...) ({exporter})":
       (lambda form=form, dynamo=dynamo: shipped_forms.torch_view_batch(form, dynamo))
       for form in ("view", "flatten", "se", "chunk")
       for exporter, dynamo in (("torchscript", False), ("dynamo", True))},
    "ORT quantize_dynamic, IR 6 (nothing to prune)": shipped_forms.quantized_dynamic_by_hand,
}

EXPORTERS = {"torchscript": dict(dynamo=False, fold_bn=True),
             "dynamo": dict(dynamo=True, fold_bn=False)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="model names to run")
    args = parser.parse_args()
    peer = None
    if args.peers:
        from onnxsim import pruning as peer
    print("| model | exporter | groups (prunable) | coverage | heads kept | params before -> after "
          "| MACs before -> after | oracle max rel. error |" + (" peer params |" if peer else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if peer else ""))
    for name, build in MODELS.items():
        if args.only and name not in args.only:
            continue
        for exporter, kwargs in EXPORTERS.items():
            module, shape = build()
            model = export_onnx(module, shape, **kwargs)
            r = onnx_fpgm.prune(model, 0.5).report
            open_groups = sum(1 for g in r.groups if not g.frozen)
            heads = [g for g in r.groups if getattr(g, "heads", False)]
            kept = (f"{sum(g.channels_after for g in heads)}/"
                    f"{sum(g.channels_before for g in heads)}") if heads else "-"
            row = (f"| {name} | {exporter} | {len(r.groups)} ({open_groups}) | "
                   f"{r.prunable_channels}/{r.total_channels} ({100 * r.coverage:.0f}%) | {kept} | "
                   f"{r.before.params:,} -> {r.after.params:,} "
                   f"({r.after.params / r.before.params:.2f}; {r.before.params / r.after.params:.2f}x)"
                   f" | {r.before.macs:,} -> {r.after.macs:,} "
                   f"({r.after.macs / r.before.macs:.2f}; {r.before.macs / r.after.macs:.2f}x) "
                   f"| {r.verification['max_rel_error']:.1e} |")
            if peer:
                try:
                    row += f" {count_params(peer.apply_structured_pruning(model, 0.5)):,} |"
                except Exception as err:  # the peer refusing a model
                    row += f" failed: {type(err).__name__} |"
            print(row, flush=True)
    if not args.only:
        dynamic_rows()


def dynamic_rows() -> None:
    """Shipped forms with symbolic input dims, no option but the sparsity."""
    import time

    print("\n| form | verified at | coverage | params before -> after | MACs before -> after | "
          "oracle max rel. error | prune s |")
    print("|---|---|---|---|---|---|---|")
    for name, build in DYNAMIC_FORMS.items():
        model = build()
        start = time.perf_counter()
        r = onnx_fpgm.prune(model, 0.5).report
        seconds = time.perf_counter() - start
        print(f"| {name} | {' & '.join(r.verification['checked_at'])} | "
              f"{r.prunable_channels}/{r.total_channels} ({100 * r.coverage:.0f}%) | "
              f"{r.before.params:,} -> {r.after.params:,} "
              f"({r.before.params / r.after.params:.2f}x) | "
              f"{r.before.macs:,} -> {r.after.macs:,} ({r.before.macs / r.after.macs:.2f}x) | "
              f"{r.verification['max_rel_error']:.1e} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
