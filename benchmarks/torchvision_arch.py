"""torchvision architectures at sparsity 0.5, both torch exporters: params, MACs, heads, oracle.

    python benchmarks/torchvision_arch.py [--wheel-dir DIR] [--only NAME ...]

Runs torchvision 0.28.0's own model code: the wheel is fetched with ``pip download --no-deps``
into ``DIR`` (default: a cache folder under the system temp directory, never the repo), and its
``swin_transformer.py`` / ``shufflenetv2.py`` are imported with the package's other modules
(weights enums, ``torchvision.ops``, the C extension) replaced by small stand-ins, since the
wheel is built for another torch. Small configurations, random weights (seed 0). Then the suite's
re-implementations (tests/torchvision_like.py), which the tests hold to the same targets.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_fpgm
from tests.torch_models import export_onnx
from tests.torchvision_like import TORCHVISION_LIKE

WHEEL = "torchvision==0.28.0"
SOURCES = ("torchvision/models/swin_transformer.py", "torchvision/models/shufflenetv2.py")
EXPORTERS = {"torchscript": {"dynamo": False, "fold_bn": True},
             "dynamo": {"dynamo": True, "fold_bn": False}}


def _stub_package() -> None:
    """Stand-ins for what the two model files import from the rest of torchvision."""
    def module(name: str, **attrs) -> None:
        mod = types.ModuleType(name)
        mod.__path__ = []
        mod.__dict__.update(attrs)
        sys.modules[name] = mod

    class Permute(nn.Module):
        def __init__(self, dims) -> None:
            super().__init__()
            self.dims = dims

        def forward(self, x):
            return torch.permute(x, self.dims)

    class MLP(nn.Sequential):  # torchvision.ops.misc.MLP as Swin uses it
        def __init__(self, cin, hidden, norm_layer=None, activation_layer=nn.ReLU, inplace=None,
                     bias=True, dropout=0.0) -> None:
            kwargs = {} if inplace is None else {"inplace": inplace}
            layers, width = [], cin
            for h in hidden[:-1]:
                layers += [nn.Linear(width, h, bias=bias), activation_layer(**kwargs),
                           nn.Dropout(dropout, **kwargs)]
                width = h
            super().__init__(*layers, nn.Linear(width, hidden[-1], bias=bias),
                             nn.Dropout(dropout, **kwargs))

    class StochasticDepth(nn.Module):
        def __init__(self, p, mode) -> None:
            super().__init__()

        def forward(self, x):
            return x

    def passthrough(*args, **kwargs):
        return lambda f: f

    module("torchvision")
    module("torchvision.models")
    module("torchvision.transforms")
    module("torchvision.transforms._presets", ImageClassification=object,
           InterpolationMode=types.SimpleNamespace(BICUBIC=3, BILINEAR=2))
    module("torchvision.utils", _log_api_usage_once=lambda *a: None)
    module("torchvision.models._api", register_model=passthrough, Weights=lambda *a, **k: None,
           WeightsEnum=object)
    module("torchvision.models._meta", _IMAGENET_CATEGORIES=[])
    module("torchvision.models._utils", _ovewrite_named_param=lambda *a: None,
           handle_legacy_interface=passthrough)
    module("torchvision.ops")
    module("torchvision.ops.misc", MLP=MLP, Permute=Permute)
    module("torchvision.ops.stochastic_depth", StochasticDepth=StochasticDepth)


def load_torchvision(wheel_dir: Path) -> dict[str, types.ModuleType]:
    """torchvision's model files from the wheel (downloaded once into ``wheel_dir``)."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("torchvision-0.28.0-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d",
                        str(wheel_dir)], check=True)
        wheels = sorted(wheel_dir.glob("torchvision-0.28.0-*.whl"))
    _stub_package()
    modules = {}
    with zipfile.ZipFile(wheels[0]) as wheel:
        for source in SOURCES:
            path = wheel_dir / Path(source).name
            path.write_bytes(wheel.read(source))
            name = "torchvision.models." + path.stem
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            modules[path.stem] = mod
    return modules


def torchvision_models(tv: dict[str, types.ModuleType]) -> dict:
    """name -> builder of (module, input shape); random weights, seed 0."""
    swin, shuffle = tv["swin_transformer"], tv["shufflenetv2"]
    return {
        "SwinTransformer(patch 4, 32, depths [2, 2], heads [2, 4], window 4), 32x32":
            lambda: (swin.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10),
                     (1, 3, 32, 32)),
        "SwinTransformer(same), 24x24 (padded windows)":
            lambda: (swin.SwinTransformer([4, 4], 32, [2, 2], [2, 4], [4, 4], num_classes=10),
                     (1, 3, 24, 24)),
        "shufflenet_v2_x0_5 (10 classes), 64x64":
            lambda: (shuffle.ShuffleNetV2([4, 8, 4], [24, 48, 96, 192, 1024], num_classes=10),
                     (1, 3, 64, 64)),
        "shufflenet_v2_x1_0 (10 classes), 64x64":
            lambda: (shuffle.ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024], num_classes=10),
                     (1, 3, 64, 64)),
        "shufflenet_v2_x1_0 (1000 classes), 224x224":
            lambda: (shuffle.ShuffleNetV2([4, 8, 4], [24, 116, 232, 464, 1024]),
                     (1, 3, 224, 224)),
    }


def row(name: str, build, exporter: str) -> str:
    torch.manual_seed(0)
    module, shape = build()
    module.eval()
    model = export_onnx(module, shape, **EXPORTERS[exporter])
    start = time.perf_counter()
    report = onnx_fpgm.prune(model, 0.5).report
    seconds = time.perf_counter() - start
    heads = [(g.channels_before, g.channels_after) for g in report.groups if g.heads]
    whole = sum(1 for layer in report.layers if layer.op == "Conv"
                and layer.channels_after == layer.channels_before)
    return (f"| {name} | {exporter} | {100 * report.coverage:.0f}% | {heads or '-'} | "
            f"{whole} | {report.after.params / report.before.params:.3f} | "
            f"{report.after.macs / report.before.macs:.3f} | "
            f"{report.verification['max_rel_error']:.2e} | {seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wheel-dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "onnx-fpgm-torchvision")
    parser.add_argument("--only", nargs="*", default=None, help="substrings of model names")
    parser.add_argument("--no-wheel", action="store_true", help="the re-implementations only")
    args = parser.parse_args()
    models = {} if args.no_wheel else torchvision_models(load_torchvision(args.wheel_dir))
    models.update({f"tests/torchvision_like.py {k}": v for k, v in TORCHVISION_LIKE.items()})
    print("| model | exporter | coverage | heads before -> after | Convs kept whole "
          "| params ratio | MACs ratio | oracle | prune s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, build in models.items():
        if args.only and not any(s in name for s in args.only):
            continue
        for exporter in EXPORTERS:
            print(row(name, build, exporter), flush=True)


if __name__ == "__main__":
    main()
