"""Write a ViT-B/16 (torchvision's ``vit_b_16`` layout, random seeded weights) to ONNX.

Patch embedding by a 16x16 stride-16 conv (768 channels), a class token and learned position
embeddings, 12 encoder blocks (pre-LayerNorm, eps 1e-6; ``nn.MultiheadAttention`` with 12
heads; MLP 768 -> 3072 -> GELU -> 768), a final LayerNorm, and a 768 -> 1000 head on the class
token: 86.6 M params, 346 MB; input 1x3x224x224. Module names follow torchvision's
(``encoder.layers.encoder_layer_0.self_attention`` ...), so the export is what torchvision's
model gives; torchvision is not a dependency, so the architecture is written out here.

    python models/make_vit_b16.py [out.onnx] [--dynamo]
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Sequence

import torch
from _common import MODELS_DIR, generate, parse_args
from torch import nn

INPUT_SHAPE = (1, 3, 224, 224)


class MLPBlock(nn.Sequential):
    def __init__(self, hidden: int, mlp: int) -> None:
        super().__init__(nn.Linear(hidden, mlp), nn.GELU(), nn.Dropout(0.0),
                         nn.Linear(mlp, hidden), nn.Dropout(0.0))


class EncoderBlock(nn.Module):
    def __init__(self, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden, eps=1e-6)
        self.mlp = MLPBlock(hidden, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = self.dropout(y) + x
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    def __init__(self, seq: int, layers: int, heads: int, hidden: int, mlp: int) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, hidden).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(heads, hidden, mlp)) for i in range(layers)))
        self.ln = nn.LayerNorm(hidden, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    def __init__(self, image: int = 224, patch: int = 16, layers: int = 12, heads: int = 12,
                 hidden: int = 768, mlp: int = 3072, classes: int = 1000) -> None:
        super().__init__()
        self.patch, self.hidden = patch, hidden
        self.conv_proj = nn.Conv2d(3, hidden, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.encoder = Encoder((image // patch) ** 2 + 1, layers, heads, hidden, mlp)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden, classes)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        x = self.conv_proj(x).reshape(n, self.hidden, (h // self.patch) * (w // self.patch))
        x = x.permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(__doc__.splitlines()[0], MODELS_DIR / "vit_b16_generated.onnx", argv)
    return generate(VisionTransformer, INPUT_SHAPE, args)


if __name__ == "__main__":
    sys.exit(main())
