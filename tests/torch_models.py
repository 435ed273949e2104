"""A zoo of small torch models that the pruning tests export to ONNX and prune.

Each ``build_<name>(seed)`` returns ``(module, input_shape)``: a module in eval mode with seeded
random weights and *non-identity* BatchNorm (affine params randomised and running stats calibrated
on a random batch, then perturbed), so that folding, slicing or mis-wiring a BN shows up in the
outputs. Widths are mostly multiples of 8 so ``--round-to 8`` is meaningful; inputs are small
(32x32 / 64x64, batch 1) so an export plus two onnxruntime runs stay well under a second.

Exporter facts measured with torch 2.13 / onnxscript 0.7 (the engine's handlers depend on them):

* TorchScript (``dynamo=False``) in eval mode folds a BatchNormalization into the Conv that
  feeds it when the Conv has no other consumer; other BNs (after Concat or pooling, or after a
  Conv whose output is also concatenated: DenseNet pre-activation) stay. Dynamo's optimizer
  behaves the same. ``fold_bn=False`` passes ``training=TrainingMode.PRESERVE`` (TorchScript),
  which keeps every BN and changes nothing else; ``do_constant_folding=False`` also keeps BN
  but leaves weight Transposes, PRelu-slope Unsqueezes and Shape/Concat-built Reshape targets.
* ``dynamo=True`` runs onnxscript's optimizer by default, which also folds Conv+BN;
  ``optimize=False`` keeps every BN but leaves Identity/Constant nodes, builds a zero bias for
  bias-less Convs (Shape -> Expand -> CastLike -> Expand) and writes ``torch.chunk`` as
  SplitToSequence + SequenceAt.
* The dynamo exporter has no opset-17 implementations: asked for 17 it builds 18 and runs the
  ONNX version converter, with a warning. ``export_onnx`` uses ``max(opset, 18)`` for dynamo.

===============  ==============================  ====================================
torch            TorchScript (opset 17)          dynamo (opset 18, optimized)
===============  ==============================  ====================================
chunk(2, 1)      Slice x2, ends from Shape/Div   Split(num_outputs=2, axis=1)
flatten(x, 1)    Flatten(axis=1)                 Reshape (constant shape)
GAP              GlobalAveragePool               ReduceMean(axes=[-1, -2], keepdims=1)
Upsample nearest Resize(scales=[1, 1, 2, 2])     Resize(scales=[1, 1, 2, 2])
SiLU             Sigmoid + Mul                   Sigmoid + Mul
Hardswish        HardSwish                       HardSwish
GELU (erf)       Div, Erf, Add, Mul, Mul         Div, Erf, Add, Mul, Mul
LayerNorm        LayerNormalization              LayerNormalization
Linear, 2-D      Gemm(transB=1)                  Gemm(transB=1)
Linear, no bias  MatMul, weight pre-transposed   Gemm(transB=1), no C
Linear, 3-D      MatMul (W^T) + Add              MatMul (W^T) + Add
PReLU(C)         PRelu, slope (C, 1, 1)          PRelu, slope (1, C, 1, 1)
Softplus         Softplus                        Softplus + Greater + Where (threshold)
===============  ==============================  ====================================
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import onnx
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = [
    "FIRST_SCOPE",
    "ZOO",
    "export_built",
    "export_onnx",
    "output_names_for",
]

Builder = Callable[[], tuple[nn.Module, tuple[int, ...]]]

_DYNAMO_MIN_OPSET = 18


# --------------------------------------------------------------------------------------------
# Export helper
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """Swallow the exporter's progress prints, warnings and log lines; yield what was printed.

    The dynamo exporter logs through ``torch.onnx`` loggers whose handlers hold the original
    ``sys.stderr``, so redirecting stderr alone does not silence them.
    """
    buf = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    old_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(buf),
            contextlib.redirect_stderr(buf),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        logger.setLevel(old_level)


def output_names_for(module: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """Return ``["output"]`` for single-output modules, else ``["output0", "output1", ...]``."""
    with torch.no_grad():
        out = module(torch.zeros(input_shape))
    if isinstance(out, torch.Tensor):
        return ["output"]
    return [f"output{i}" for i in range(len(out))]


def export_onnx(
    module: nn.Module,
    input_shape: tuple[int, ...],
    *,
    dynamo: bool = False,
    fold_bn: bool = True,
    opset: int = 17,
    path: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (in eval mode) to ONNX and load it back.

    Input is named ``"input"``; outputs ``"output"`` or ``"output0"``, ``"output1"``, ...
    The example input is zeros: the builders own all randomness.

    Args:
        module: Module to export; switched to eval mode.
        input_shape: Static input shape, batch included.
        dynamo: Use the ``torch.export`` exporter instead of TorchScript.
        fold_bn: Let the exporter fold BatchNormalization into the preceding Conv. False maps to
            ``training=TrainingMode.PRESERVE`` (TorchScript) or ``optimize=False`` (dynamo).
        opset: Requested opset; raised to 18 for dynamo, which has no opset-17 implementations.
        path: Where to write the file; a temporary file when None.

    Returns:
        The loaded model, weights embedded (never external data).
    """
    module.eval()
    names = output_names_for(module, input_shape)
    args = (torch.zeros(input_shape),)
    kwargs: dict[str, object]
    if dynamo:
        kwargs = {
            "dynamo": True,
            "opset_version": max(opset, _DYNAMO_MIN_OPSET),
            "optimize": fold_bn,
            "external_data": False,
            "verbose": False,
        }
    else:
        # PRESERVE on an eval-mode module exports eval semantics (training_mode=0, no Dropout)
        # but skips the Conv+BN fusion; constant folding stays on, so the graph is otherwise
        # identical to the folded export (do_constant_folding=False would also keep BN, but
        # leaves Transpose-of-weight, Unsqueeze and Concat-built Reshape shapes in the graph).
        kwargs = {"dynamo": False, "opset_version": opset, "do_constant_folding": True}
        if not fold_bn:
            kwargs["training"] = torch.onnx.TrainingMode.PRESERVE

    with contextlib.ExitStack() as stack:
        if path is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            path = os.path.join(tmp, "model.onnx")
        with _quiet_exporter() as chatter:
            try:
                torch.onnx.export(
                    module, args, os.fspath(path), input_names=["input"], output_names=names,
                    **kwargs,  # type: ignore[arg-type]
                )
            except Exception as err:
                if hasattr(err, "add_note"):  # Python >= 3.11
                    err.add_note(f"exporter output:\n{chatter.getvalue()}")
                raise
        return onnx.load(os.fspath(path))



@functools.cache
def _built_export_bytes(builder: Callable[[], tuple[nn.Module, tuple[int, ...]]], dynamo: bool,
                        fold_bn: bool, opset: int) -> bytes:
    module, shape = builder()
    return export_onnx(module, shape, dynamo=dynamo, fold_bn=fold_bn,
                       opset=opset).SerializeToString()


def export_built(builder: Callable[[], tuple[nn.Module, tuple[int, ...]]], *,
                 dynamo: bool = False, fold_bn: bool = True, opset: int = 17) -> onnx.ModelProto:
    """Export ``builder()``'s module once per test process and return a fresh copy.

    The builders are seeded, so the zoo, exporter, executor and cost-model tests that export the
    same model in the same mode share one export (a dynamo export costs seconds).
    """
    return onnx.load_from_string(_built_export_bytes(builder, dynamo, fold_bn, opset))

# --------------------------------------------------------------------------------------------
# Initialisation: seeded, well-scaled, BN not identity
# --------------------------------------------------------------------------------------------


def _init_weights(module: nn.Module, gen: torch.Generator) -> None:
    """He-normal convs, 1/sqrt(fan_in) linears, small random biases, random affine norms.

    PyTorch's default init shrinks activations ~3x per layer; keeping them O(1) makes the
    ``atol`` of the equivalence tests meaningful.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            w = m.weight
            fan_in = w[0].numel() if isinstance(m, nn.Conv2d | nn.Linear) else w[:, 0].numel()
            gain = 1.0 if isinstance(m, nn.Linear) else math.sqrt(2.0)
            with torch.no_grad():
                w.copy_(torch.randn(w.shape, generator=gen) * gain / math.sqrt(fan_in))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
        elif isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.5)


def _calibrate_bn(module: nn.Module, input_shape: tuple[int, ...], gen: torch.Generator) -> None:
    """Set BN running stats from a random batch, then perturb them.

    Calibrated stats keep activations normalised; the perturbation makes sure no BN is the
    identity on its actual input (so a dropped or mis-sliced BN changes the outputs).
    """
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch -> exactly its statistics
    module.train()
    with torch.no_grad():
        module(torch.randn((4, *input_shape[1:]), generator=gen))
        for bn in bns:
            assert bn.running_mean is not None and bn.running_var is not None
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=gen) * 0.2 * std)
            bn.running_var.mul_(torch.exp(torch.randn(bn.running_var.shape, generator=gen) * 0.2))
            bn.momentum = 0.1
    module.eval()


def _build(
    factory: Callable[[], nn.Module], input_shape: tuple[int, ...], seed: int
) -> tuple[nn.Module, tuple[int, ...]]:
    """Construct under a forked, seeded RNG so builders never disturb the caller's RNG.

    The fork also covers calibration, whose train-mode Dropout draws from the global RNG.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = factory()
        gen = torch.Generator().manual_seed(seed)
        _init_weights(module, gen)
        _calibrate_bn(module, input_shape, gen)
    return module.eval(), input_shape


# --------------------------------------------------------------------------------------------
# Shared blocks
# --------------------------------------------------------------------------------------------


def _cbr(
    cin: int, cout: int, k: int = 3, s: int = 1, *, groups: int = 1, act: nn.Module | None = None
) -> nn.Sequential:
    """Conv (no bias) -> BN -> activation (ReLU by default)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        act if act is not None else nn.ReLU(inplace=True),
    )


class _Classifier(nn.Module):
    """GAP -> flatten -> Linear."""

    def __init__(self, cin: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# --- 1. ResNet-18-like ------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class _ResNet18Like(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [_BasicBlock(cin, w, stride), _BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.head = _Classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def build_resnet18_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """BasicBlock ResNet with 1x1 conv+BN downsample shortcuts (coupled residual groups)."""
    return _build(_ResNet18Like, (1, 3, 64, 64), seed)


# --- 2. ResNet-50-like ------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class _ResNet50Like(nn.Module):
    def __init__(
        self,
        widths: tuple[int, ...] = (8, 16, 32, 64),
        blocks: tuple[int, ...] = (1, 2, 2, 1),
        stem: int = 16,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem, 7, 2, 3, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        layers: list[nn.Module] = []
        cin = stem
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(n):
                layers.append(_Bottleneck(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w * _Bottleneck.expansion
        self.layers = nn.Sequential(*layers)
        self.head = _Classifier(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def build_resnet50_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Bottleneck (expansion 4) ResNet, outputs 32/64/128/256, blocks (1, 2, 2, 1)."""
    return _build(_ResNet50Like, (1, 3, 64, 64), seed)


# --- 3. VGG-like ------------------------------------------------------------------------------


def build_vgg_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Plain conv stack; Flatten of a 64x4x4 map into a Linear (stride-16 column blocks)."""

    def factory() -> nn.Module:
        return nn.Sequential(
            _cbr(3, 16), _cbr(16, 16), nn.MaxPool2d(2),
            _cbr(16, 32), _cbr(32, 32), nn.MaxPool2d(2),
            _cbr(32, 64), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(64, 10),
        )  # fmt: skip

    return _build(factory, (1, 3, 32, 32), seed)


# --- 4. MobileNetV2-like ----------------------------------------------------------------------


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.ReLU6(inplace=True)))
        layers += [
            _cbr(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6(inplace=True)),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class _MobileNetV2Like(nn.Module):
    # (expand t, out c, repeats n, first stride s), as in torchvision's inverted_residual_setting
    setting: tuple[tuple[int, int, int, int], ...] = (
        (1, 16, 1, 1),
        (4, 24, 2, 2),
        (4, 32, 2, 2),
        (4, 64, 1, 2),
    )

    def __init__(self, stem: int = 16, last: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(3, stem, 3, 2, act=nn.ReLU6(inplace=True))]
        cin = stem
        for t, c, n, s in self.setting:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_cbr(cin, last, 1, act=nn.ReLU6(inplace=True)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


def build_mobilenetv2_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Inverted residuals: expand, depthwise (ReLU6), linear projection, residual adds."""
    return _build(_MobileNetV2Like, (1, 3, 64, 64), seed)


# --- 5. MobileNetV3-small-like ----------------------------------------------------------------


class _SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> act -> 1x1 conv -> gate -> channel-wise Mul with the input."""

    def __init__(self, c: int, squeeze: int, act: nn.Module, gate: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.act = act
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class _MBv3Block(nn.Module):
    def __init__(
        self, cin: int, k: int, exp: int, cout: int, se: bool, hs: bool, stride: int
    ) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if hs else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_cbr(cin, exp, 1, act=act()))
        layers.append(_cbr(exp, exp, k, stride, groups=exp, act=act()))
        if se:
            squeeze = _make_divisible(exp // 4)
            layers.append(_SqueezeExcite(exp, squeeze, nn.ReLU(), nn.Hardsigmoid()))
        layers += [nn.Conv2d(exp, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's rounding: nearest multiple of ``divisor``, never below 90 % of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class _MobileNetV3SmallLike(nn.Module):
    # (kernel, expanded, out, SE, hardswish, stride)
    setting: tuple[tuple[int, int, int, bool, bool, int], ...] = (
        (3, 16, 16, True, False, 2),
        (3, 64, 24, False, False, 2),
        (3, 96, 24, False, False, 1),
        (5, 96, 40, True, True, 2),
        (5, 128, 40, True, True, 1),
    )

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(3, 16, 3, 2, act=nn.Hardswish())]
        cin = 16
        for k, exp, c, se, hs, s in self.setting:
            layers.append(_MBv3Block(cin, k, exp, c, se, hs, s))
            cin = c
        layers.append(_cbr(cin, 128, 1, act=nn.Hardswish()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(128, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


def build_mobilenetv3_small_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Hardswish/ReLU, depthwise convs, SE with Hardsigmoid gates (Mul couples SE and trunk)."""
    return _build(_MobileNetV3SmallLike, (1, 3, 64, 64), seed)


# --- 6. EfficientNet-like ---------------------------------------------------------------------


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_cbr(cin, hidden, 1, act=nn.SiLU()))
        layers += [
            _cbr(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU()),
            # EfficientNet squeezes relative to the block *input* width, not the expanded one.
            _SqueezeExcite(hidden, max(1, cin // 4), nn.SiLU(), nn.Sigmoid()),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class _EfficientNetLike(nn.Module):
    # (expand, kernel, out, stride)
    setting: tuple[tuple[int, int, int, int], ...] = (
        (1, 3, 16, 1),
        (4, 3, 24, 2),
        (4, 3, 24, 1),
        (4, 5, 40, 2),
        (4, 5, 40, 1),
    )

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_cbr(3, 32, 3, 2, act=nn.SiLU())]
        cin = 32
        for t, k, c, s in self.setting:
            layers.append(_MBConv(cin, c, k, s, t))
            cin = c
        layers.append(_cbr(cin, 128, 1, act=nn.SiLU()))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return self.classifier(x)


def build_efficientnet_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """MBConv with SiLU, depthwise kxk, SE (Sigmoid gate) and residual adds."""
    return _build(_EfficientNetLike, (1, 3, 64, 64), seed)


# --- 7. DenseNet-like -------------------------------------------------------------------------


class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
            nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
            nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class _DenseNetLike(nn.Module):
    def __init__(self, stem: int = 16, growth: int = 8, blocks: tuple[int, ...] = (4, 3)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, 1, 1, bias=False)]
        c = stem
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                    nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2),
                ]  # fmt: skip
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = _Classifier(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_densenet_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Pre-activation dense layers chained by Concat; BNs that read a Concat cannot be folded."""
    return _build(_DenseNetLike, (1, 3, 32, 32), seed)


# --- 8. U-Net-like ----------------------------------------------------------------------------


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(_cbr(cin, cout), _cbr(cout, cout))


class _UNetLike(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.enc1 = _double_conv(3, 16)
        self.enc2 = _double_conv(16, 32)
        self.bottom = _double_conv(32, 64)
        self.pool = nn.MaxPool2d(2)
        self.up1 = nn.ConvTranspose2d(64, 32, 2, stride=2)
        self.dec1 = _double_conv(32 + 32, 32)
        self.up2 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = _double_conv(32 + 16, 16)
        self.out = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d1 = self.dec1(torch.cat([self.up1(b), e2], 1))
        d2 = self.dec2(torch.cat([self.up2(d1), e1], 1))
        return self.out(d2)


def build_unet_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """ConvTranspose and nearest-Upsample up-paths with Concat skips; output is a seg map."""
    return _build(_UNetLike, (1, 3, 32, 32), seed)


# --- 9. YOLOv8-like ---------------------------------------------------------------------------


def _yconv(cin: int, cout: int, k: int = 1, s: int = 1) -> nn.Sequential:
    """Ultralytics ``Conv``: conv (no bias) -> BN -> SiLU."""
    return _cbr(cin, cout, k, s, act=nn.SiLU())


class _YBottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1 = _yconv(c, c, 3)
        self.cv2 = _yconv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class _C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = _yconv(c1, 2 * self.c, 1)
        self.cv2 = _yconv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(_YBottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class _SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = _yconv(c1, c_, 1)
        self.cv2 = _yconv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class _DetectLike(nn.Module):
    """Per scale: a box branch (4 * reg_max) and a class branch, concatenated."""

    def __init__(self, chs: tuple[int, ...], reg_max: int = 4, classes: int = 8) -> None:
        super().__init__()
        c = 32
        self.box = nn.ModuleList(
            nn.Sequential(_yconv(ch, c, 3), _yconv(c, c, 3), nn.Conv2d(c, 4 * reg_max, 1))
            for ch in chs
        )
        self.cls = nn.ModuleList(
            nn.Sequential(_yconv(ch, c, 3), _yconv(c, c, 3), nn.Conv2d(c, classes, 1))
            for ch in chs
        )

    def forward(self, xs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.cat([b(x), c(x)], 1) for x, b, c in zip(xs, self.box, self.cls, strict=True)
        )


class _YOLOv8Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b0 = _yconv(3, 16, 3, 2)  # 32x32
        self.b1 = _yconv(16, 32, 3, 2)  # 16x16
        self.b2 = _C2f(32, 32, 1, True)
        self.b3 = _yconv(32, 64, 3, 2)  # 8x8
        self.b4 = _C2f(64, 64, 1, True)  # P4
        self.b5 = _yconv(64, 128, 3, 2)  # 4x4
        self.b6 = _C2f(128, 128, 1, True)
        self.b7 = _SPPF(128, 128)  # P5
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n0 = _C2f(128 + 64, 64, 1, False)
        self.detect = _DetectLike((64, 128))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        p4 = self.b4(self.b3(self.b2(self.b1(self.b0(x)))))
        p5 = self.b7(self.b6(self.b5(p4)))
        n4 = self.n0(torch.cat([self.up(p5), p4], 1))
        return self.detect([n4, p5])


def build_yolov8_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """C2f (chunk -> Split), SPPF, upsample+concat neck, two outputs (output0 8x8, output1 4x4)."""
    return _build(_YOLOv8Like, (1, 3, 64, 64), seed)


# --- 10. ViT-like -----------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _ViTLike(nn.Module):
    def __init__(
        self, img: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (img // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*(_TransformerBlock(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def build_vit_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Patch-embed conv, 2 hand-written pre-norm transformer blocks (3-D MatMul/Add, LayerNorm)."""
    return _build(_ViTLike, (1, 3, 32, 32), seed)


# --- 11. ResNeXt-like -------------------------------------------------------------------------


class _ResNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 32, 3, 1)
        self.blocks = nn.Sequential(
            _Bottleneck(32, 16, 1, groups=4),  # -> 64, conv downsample (channels change)
            _Bottleneck(64, 16, 1, groups=4),  # identity residual
            _Bottleneck(64, 32, 2, groups=8),  # -> 128, strided downsample
        )
        self.head = _Classifier(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def build_resnext_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Bottlenecks whose 3x3 is a grouped conv (groups 4 and 8): pruning must respect groups."""
    return _build(_ResNeXtLike, (1, 3, 32, 32), seed)


# --- 12. ShuffleNetV2-like --------------------------------------------------------------------


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


class _ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1: nn.Module = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                _cbr(cin, half, 1),
            )  # fmt: skip
        else:
            self.branch1 = nn.Identity()
        b2_in = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            _cbr(b2_in, half, 1),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            _cbr(half, half, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return _channel_shuffle(out, 2)


class _ShuffleNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 24, 3, 1)
        self.units = nn.Sequential(
            _ShuffleUnit(24, 48, 2), _ShuffleUnit(48, 48, 1), _ShuffleUnit(48, 48, 1),
            _ShuffleUnit(48, 96, 2), _ShuffleUnit(96, 96, 1),
        )  # fmt: skip
        self.conv5 = _cbr(96, 128, 1)
        self.head = _Classifier(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv5(self.units(self.stem(x))))


def build_shufflenet_like(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """ShuffleNetV2 units: chunk/cat plus channel_shuffle (Reshape-Transpose-Reshape permutes)."""
    return _build(_ShuffleNetLike, (1, 3, 32, 32), seed)


# --- 13-18. First-scope patterns --------------------------------------------------------------


def build_conv_bn_relu_conv(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Two conv-BN-ReLU stages, GAP, flatten, Linear."""

    def factory() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
        )  # fmt: skip

    return _build(factory, (1, 3, 32, 32), seed)


def build_conv_flatten_gemm(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Convs, then Flatten of a 32x4x4 map into Linear(512, 10): Gemm columns in 16-wide blocks."""

    def factory() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        )  # fmt: skip

    return _build(factory, (1, 3, 32, 32), seed)


class _ConvMatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU()
        )
        self.weight = nn.Parameter(torch.randn(32, 10) / math.sqrt(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)
        return torch.matmul(x, self.weight)


def build_conv_matmul(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """GAP features times a (C, K) parameter: MatMul with a constant weight (rows = channels)."""
    return _build(_ConvMatMul, (1, 3, 32, 32), seed)


def build_biasless_convs(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """Conv(bias=False) chain: Conv nodes with only two inputs."""

    def factory() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.ReLU(),
            nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.ReLU(),
            nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10, bias=False),
        )  # fmt: skip

    return _build(factory, (1, 3, 32, 32), seed)


class _HandSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x)


def build_prelu_net(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """One conv per activation flavour, incl. per-channel PReLU (slope sliced with filters)."""

    def factory() -> nn.Module:
        c = 16
        return nn.Sequential(
            nn.Conv2d(3, c, 3, 1, 1), nn.PReLU(num_parameters=c),
            nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(c, c, 3, 1, 1), nn.Tanh(),
            nn.Conv2d(c, c, 3, 1, 1), nn.ELU(),
            nn.Conv2d(c, c, 3, 1, 1), nn.Softplus(),
            nn.Conv2d(c, c, 3, 1, 1), nn.Hardsigmoid(),
            nn.Conv2d(c, c, 3, 1, 1), nn.Hardswish(),
            nn.Conv2d(c, c, 3, 1, 1), _HandSiLU(), nn.Dropout(0.1),
            nn.AvgPool2d(2),
            nn.Conv2d(c, 2 * c, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 10),
        )  # fmt: skip

    return _build(factory, (1, 3, 32, 32), seed)


class _ConvToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1)
        self.rest = nn.Sequential(
            nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.head = _Classifier(32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.conv1(x)
        return self.head(self.rest(feat)), feat


def build_conv_to_output(seed: int = 0) -> tuple[nn.Module, tuple[int, ...]]:
    """conv1's output is graph output ``output1`` as well as the trunk: its filters must stay."""
    return _build(_ConvToOutput, (1, 3, 32, 32), seed)


ZOO: dict[str, Builder] = {
    "resnet18_like": build_resnet18_like,
    "resnet50_like": build_resnet50_like,
    "vgg_like": build_vgg_like,
    "mobilenetv2_like": build_mobilenetv2_like,
    "mobilenetv3_small_like": build_mobilenetv3_small_like,
    "efficientnet_like": build_efficientnet_like,
    "densenet_like": build_densenet_like,
    "unet_like": build_unet_like,
    "yolov8_like": build_yolov8_like,
    "vit_like": build_vit_like,
    "resnext_like": build_resnext_like,
    "shufflenet_like": build_shufflenet_like,
    "conv_bn_relu_conv": build_conv_bn_relu_conv,
    "conv_flatten_gemm": build_conv_flatten_gemm,
    "conv_matmul": build_conv_matmul,
    "biasless_convs": build_biasless_convs,
    "prelu_net": build_prelu_net,
    "conv_to_output": build_conv_to_output,
}

FIRST_SCOPE: list[str] = [
    "conv_bn_relu_conv",
    "conv_flatten_gemm",
    "conv_matmul",
    "biasless_convs",
    "prelu_net",
    "vgg_like",
]
