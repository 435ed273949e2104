"""The torch zoo exports faithfully, so pruning tests can trust the ONNX they start from.

Every model is exported three ways (TorchScript with BN folded / kept, dynamo with BN folded),
and the models in ``DYNAMO_KEEPBN`` a fourth (dynamo, ``optimize=False``); each is checked with
``onnx.checker`` (full check), and run through onnxruntime with graph optimisations disabled,
so that ORT fusions cannot mask an exporter bug, against the torch module's own output.
Deselect the slower dynamo exports with ``-k "not dynamo"``.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.torch_models import (
    FIRST_SCOPE,
    ZOO,
    build_conv_bn_relu_conv,
    export_built,
    output_names_for,
)

pytestmark = pytest.mark.torch_export


@dataclass(frozen=True)
class Mode:
    """One exporter configuration."""

    dynamo: bool
    fold_bn: bool


MODES: dict[str, Mode] = {
    "torchscript": Mode(dynamo=False, fold_bn=True),
    "torchscript-keepbn": Mode(dynamo=False, fold_bn=False),
    "dynamo": Mode(dynamo=True, fold_bn=True),
    "dynamo-keepbn": Mode(dynamo=True, fold_bn=False),
}

# Unoptimised dynamo exports cost ~1 s each; run them only where they show something the other
# three modes do not: BN next to residual/concat/split/upsample wiring, and the first-scope nets.
DYNAMO_KEEPBN = {
    *FIRST_SCOPE,
    "resnet18_like",
    "mobilenetv3_small_like",
    "densenet_like",
    "unet_like",
    "yolov8_like",
    "shufflenet_like",
}

CASES = [
    pytest.param(name, mode, id=f"{name}-{mode}")
    for name in ZOO
    for mode in MODES
    if mode != "dynamo-keepbn" or name in DYNAMO_KEEPBN
]


@functools.cache
def _built(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    return ZOO[name]()


@functools.cache
def _exported(name: str, mode: str) -> onnx.ModelProto:
    """Export once per (model, mode): the faithfulness and structure tests share the file."""
    m = MODES[mode]
    return export_built(ZOO[name], dynamo=m.dynamo, fold_bn=m.fold_bn)


def _run_ort(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    return sess.run(None, {"input": x})


def _num_bn_modules(module: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_export_matches_torch(name: str, mode: str, rng: np.random.Generator) -> None:
    module, shape = _built(name)
    model = _exported(name, mode)
    onnx.checker.check_model(model, full_check=True)

    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == output_names_for(module, shape)

    x = rng.standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    actual = _run_ort(model, x)
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_batchnorm_folding(name: str, mode: str) -> None:
    """Keep-BN exports hold one BatchNormalization per nn.BatchNorm2d; folded ones none after Conv.

    Folding only fuses Conv -> BN where the BN is the Conv's sole consumer, so BNs that read a
    Concat, a pool, or a Conv output that is also concatenated (densenet_like's pre-activation
    layers) survive in folded exports too.
    """
    module, _ = _built(name)
    model = _exported(name, mode)
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    uses = Counter(i for node in model.graph.node for i in node.input)
    uses.update(o.name for o in model.graph.output)
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    if MODES[mode].fold_bn:
        foldable = [
            n.name for n in bns if producer.get(n.input[0]) == "Conv" and uses[n.input[0]] == 1
        ]
        assert foldable == []
    else:
        assert len(bns) == _num_bn_modules(module)


def test_first_scope_is_in_zoo() -> None:
    assert set(FIRST_SCOPE) <= set(ZOO)
    assert "vgg_like" in FIRST_SCOPE


@pytest.mark.parametrize("name", list(ZOO))
def test_builder_is_seeded_and_bn_is_not_identity(name: str) -> None:
    torch.manual_seed(123)
    before = torch.rand(4)
    torch.manual_seed(123)
    a, shape = ZOO[name]()
    after = torch.rand(4)
    assert torch.equal(before, after), "builders must not disturb the global RNG"

    b, _ = _built(name)  # an earlier seed-0 build, made under a different global RNG state
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), f"{name}: {ka} differs between two seed-0 builds"
    assert not a.training
    assert len(shape) == 4 and shape[0] == 1

    for bn in (m for m in a.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.running_mean is not None and bn.running_var is not None
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_different_seeds_give_different_weights() -> None:
    a, _ = build_conv_bn_relu_conv(seed=0)
    b, _ = build_conv_bn_relu_conv(seed=1)
    assert not torch.equal(a.state_dict()["0.weight"], b.state_dict()["0.weight"])


def _ops(name: str, mode: str) -> Counter[str]:
    return Counter(n.op_type for n in _exported(name, mode).graph.node)


def test_torchscript_ops() -> None:
    """Pin the exporter facts the engine's handlers rely on (table in tests/torch_models.py)."""
    for mode in ("torchscript", "torchscript-keepbn"):
        assert _ops("yolov8_like", mode)["Slice"] == 8  # chunk(2) -> two Slices per C2f
        assert _ops("yolov8_like", mode)["Split"] == 0
        assert _ops("vgg_like", mode)["Flatten"] == 1
        assert _ops("conv_bn_relu_conv", mode)["GlobalAveragePool"] == 1
        assert _ops("conv_matmul", mode)["MatMul"] == 1
        _check_common_ops(mode)


def test_dynamo_ops() -> None:
    """As test_torchscript_ops, for the torch.export-based exporter."""
    assert _ops("yolov8_like", "dynamo")["Split"] == 4
    assert _ops("yolov8_like", "dynamo-keepbn")["SplitToSequence"] == 4
    for mode in ("dynamo", "dynamo-keepbn"):
        assert _ops("vgg_like", mode)["Flatten"] == 0
        assert _ops("vgg_like", mode)["Reshape"] >= 1
        assert _ops("conv_bn_relu_conv", mode)["ReduceMean"] == 1
        assert _ops("conv_matmul", mode)["MatMul"] == 1
        assert _ops("unet_like", mode)["Resize"] == 1
    _check_common_ops("dynamo")


def _check_common_ops(mode: str) -> None:
    # SiLU is Sigmoid + Mul at opsets 17/18; nearest upsample -> Resize; LayerNorm ->
    # LayerNormalization; erf-GELU -> Div/Erf/Add/Mul (Gelu is opset 20); Hardswish -> HardSwish.
    assert _ops("efficientnet_like", mode)["Sigmoid"] == 21
    assert _ops("unet_like", mode)["Resize"] == 1
    assert _ops("unet_like", mode)["ConvTranspose"] == 1
    assert _ops("vit_like", mode)["LayerNormalization"] == 5
    assert _ops("vit_like", mode)["Erf"] == 2
    assert _ops("mobilenetv3_small_like", mode)["HardSwish"] == 7
