"""Shared plumbing for the ``models/make_*.py`` generator scripts.

The generators write real-architecture ONNX files with random weights, for pruning and
benchmarking without downloading checkpoints (torchvision is deliberately not a dependency, so
each script writes its architecture out by hand). Weights are seeded; BatchNorm running stats
are calibrated on a random batch and then perturbed, so activations stay O(1) through 50+
layers and no BN is the identity (a BN that is dropped or mis-sliced changes the outputs).

Run the scripts from anywhere, e.g. ``python models/make_resnet50.py --keep-bn out.onnx``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

MODELS_DIR = Path(__file__).resolve().parent

# The dynamo exporter has no opset-17 implementations; asked for 17 it builds 18 and runs the
# ONNX version converter (with a warning), so it is asked for 18 directly.
DYNAMO_OPSET = 18
TORCHSCRIPT_OPSET = 17


def init_weights(module: nn.Module, gen: torch.Generator) -> None:
    """He-normal convs, 1/sqrt(fan_in) linears, small random biases, random BN affine params."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            w = m.weight
            gain = 1.0 if isinstance(m, nn.Linear) else math.sqrt(2.0)
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=gen) * gain / math.sqrt(w[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)


def calibrate_bn(
    module: nn.Module, input_shape: Sequence[int], gen: torch.Generator, batch: int = 2
) -> None:
    """Set BN running stats from one random batch, then perturb them (see module docstring)."""
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> exactly its statistics
    module.train()
    with torch.no_grad():
        module(torch.randn((batch, *input_shape[1:]), generator=gen))
        for bn in bns:
            assert bn.running_mean is not None and bn.running_var is not None
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen) * 0.2 * std)
            bn.running_var.mul_(torch.exp(torch.randn(bn.running_var.shape, generator=gen) * 0.2))
            bn.momentum = 0.1
    module.eval()


def build_seeded(
    factory: Callable[[], nn.Module], input_shape: Sequence[int], seed: int
) -> nn.Module:
    """Construct, initialise and calibrate under a forked RNG; return the module in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
        gen = torch.Generator().manual_seed(seed)
        init_weights(module, gen)
        calibrate_bn(module, input_shape, gen)
    return module.eval()


def export(
    module: nn.Module,
    input_shape: Sequence[int],
    path: Path,
    *,
    output_name: str = "output",
    dynamo: bool = False,
    keep_bn: bool = False,
) -> None:
    """Export with input ``"input"`` and one named output, weights embedded in the file.

    ``keep_bn`` stops the exporter fusing Conv+BN: TorchScript via ``TrainingMode.PRESERVE``
    (eval semantics, nothing else changes), dynamo via ``optimize=False``.
    """
    module.eval()
    args = (torch.zeros(tuple(input_shape)),)
    kwargs: dict[str, object]
    if dynamo:
        kwargs = {"opset_version": DYNAMO_OPSET, "optimize": not keep_bn,
                  "external_data": False, "verbose": False}  # fmt: skip
    else:
        kwargs = {"opset_version": TORCHSCRIPT_OPSET, "do_constant_folding": True}
        if keep_bn:
            kwargs["training"] = torch.onnx.TrainingMode.PRESERVE
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("torch.onnx")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, args, os.fspath(path), dynamo=dynamo, input_names=["input"],
                output_names=[output_name], **kwargs,  # type: ignore[arg-type]
            )
    finally:
        logger.setLevel(old_level)


def check(
    module: nn.Module, input_shape: Sequence[int], path: Path, seed: int
) -> tuple[float, bool]:
    """Run onnx.checker, then compare ORT with torch on a random input.

    Returns:
        Max absolute difference, and whether it is within ``rtol=1e-3, atol=1e-4``.
    """
    onnx.checker.check_model(os.fspath(path), full_check=True)
    x = np.random.default_rng(seed).standard_normal(tuple(input_shape)).astype(np.float32)
    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x})
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    return float(np.abs(got - want).max()), bool(np.allclose(got, want, rtol=1e-3, atol=1e-4))


def parse_args(
    description: str, default_output: Path, argv: Sequence[str] | None
) -> argparse.Namespace:
    """The generators' shared command line: ``[output] [--dynamo] [--keep-bn] [--seed N]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "output", nargs="?", type=Path, default=default_output,
        help=f"where to write the model (default: {default_output})",
    )  # fmt: skip
    parser.add_argument("--dynamo", action="store_true", help="use the torch.export exporter")
    parser.add_argument(
        "--keep-bn", action="store_true",
        help="keep BatchNormalization nodes instead of letting the exporter fold them into Conv",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def generate(
    factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    args: argparse.Namespace,
    *,
    output_name: str = "output",
) -> int:
    """Build, export, check and summarise one model; the scripts' whole ``main``."""
    t0 = time.perf_counter()
    module = build_seeded(factory, input_shape, args.seed)
    params = sum(p.numel() for p in module.parameters())
    export(module, input_shape, args.output, output_name=output_name,
           dynamo=args.dynamo, keep_bn=args.keep_bn)  # fmt: skip
    err, ok = check(module, input_shape, args.output, args.seed)
    model = onnx.load(os.fspath(args.output), load_external_data=False)
    n_bn = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    print(
        f"{args.output}: {params / 1e6:.3f} M params, "
        f"{args.output.stat().st_size / 2**20:.1f} MiB, opset {model.opset_import[0].version}, "
        f"{len(model.graph.node)} nodes ({n_bn} BatchNormalization), "
        f"max |ort - torch| = {err:.2e}, {time.perf_counter() - t0:.1f} s"
    )
    if not ok:
        print("error: onnxruntime output differs from torch beyond rtol=1e-3, atol=1e-4")
        return 1
    return 0
