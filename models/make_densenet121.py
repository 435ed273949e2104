"""Write a DenseNet-121 (torchvision layout, random seeded weights) to ONNX.

Growth 32, bn_size 4, blocks (6, 12, 24, 16), compression 0.5; 7.98 M params; input
1x3x224x224. As in torchvision, each dense layer concatenates *all* earlier features itself
(one Concat with k inputs per layer, plus one per block), and its pre-activation BN reads that
Concat, so those BNs stay BatchNormalization nodes even in BN-folded exports.

    python models/make_densenet121.py [out.onnx] [--dynamo] [--keep-bn]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from _common import MODELS_DIR, generate, parse_args
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(cin + i * growth, growth, bn_size) for i in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet121(nn.Module):
    def __init__(
        self,
        growth: int = 32,
        blocks: Sequence[int] = (6, 12, 24, 16),
        init_features: int = 64,
        bn_size: int = 4,
        classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, init_features, 7, 2, 3, bias=False),
            nn.BatchNorm2d(init_features),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        c = init_features
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                    nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2),
                ]  # fmt: skip
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(self.features(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        return self.classifier(torch.flatten(x, 1))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], MODELS_DIR / "densenet121_generated.onnx", argv)
    return generate(DenseNet121, INPUT_SHAPE, args)


if __name__ == "__main__":
    sys.exit(main())
