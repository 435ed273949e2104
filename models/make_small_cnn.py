"""Write ``models/small_cnn.onnx``: a small seeded VGG/ResNet-ish CNN, the repo's demo model.

3x64x64 input ``"input"``, 10-class output ``"logits"``; conv-BN-ReLU stages, two residual
blocks, max pools, GAP and a Linear (~0.47 M params, ~1.8 MiB). Exported with TorchScript at
opset 17, so BatchNorm is folded into the convs unless ``--keep-bn`` is given.

    python models/make_small_cnn.py            # regenerates models/small_cnn.onnx
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import MODELS_DIR, generate, parse_args
from torch import nn

INPUT_SHAPE = (1, 3, 64, 64)


def _cbr(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity: both convs' output channels are tied by the Add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = _cbr(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(self.conv1(x))))


class SmallCNN(nn.Module):
    """64x64 -> 32 (stem) -> 16 (64 ch, residual) -> 8 (128 ch, residual) -> GAP -> 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _cbr(3, 32), _cbr(32, 32), nn.MaxPool2d(2),
            _cbr(32, 64), nn.MaxPool2d(2), _ResidualBlock(64),
            _cbr(64, 128), nn.MaxPool2d(2), _ResidualBlock(128),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], MODELS_DIR / "small_cnn.onnx", argv)
    return generate(SmallCNN, INPUT_SHAPE, args, output_name="logits")


if __name__ == "__main__":
    sys.exit(main())
