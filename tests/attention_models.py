"""Transformer test models for head pruning (issue 10): each written the way the real code is.

* ``deit_like``: timm's ``Attention`` (fused qkv, Reshape (B, N, 3, h, d), permute, unbind),
  class token, GELU MLP: heads and MLP widths pruned together.
* ``mha_vit_like``: torchvision ViT's ``EncoderBlock`` with ``nn.MultiheadAttention`` (packed
  in-projection).
* ``transformer_encoder_like``: ``nn.TransformerEncoder`` on token ids (Embedding input).
* ``separate_qkv_like``: q, k, v as three Linears (BERT/HF style), an additive attention mask.
* ``swin_like``: window attention with a relative position bias table indexed per head.

Sizes are small (dim 32-48, 2-4 heads) so both exporters and the oracle stay fast.
"""
from __future__ import annotations

import torch
from torch import nn

from tests.torch_models import _build


class _TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (qkv_bias, fused, unbind)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int, attn: nn.Module | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn or _TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _DeiTLike(nn.Module):
    def __init__(self, dim: int = 48, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 8, 8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(*(_TimmBlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def build_deit_like(seed: int = 0):
    """timm-style DeiT: fused qkv, Reshape(B, N, 3, h, d) + permute + unbind, class token."""
    return _build(_DeiTLike, (1, 3, 32, 32), seed)


class _MHABlock(nn.Module):
    """torchvision.models.vision_transformer.EncoderBlock."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class _MHAViTLike(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, 8, 8)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
        self.layers = nn.Sequential(_MHABlock(dim, heads), _MHABlock(dim, heads))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.ln(self.layers(x)).mean(1))


def build_mha_vit_like(seed: int = 0):
    """torchvision-ViT-style blocks with nn.MultiheadAttention (packed in-projection)."""
    return _build(_MHAViTLike, (1, 3, 32, 32), seed)


class _TokenEncoder(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x.long().clamp(0, 49))).mean(1))


def build_transformer_encoder_like(seed: int = 0):
    """nn.TransformerEncoder (post-norm, ReLU) on token ids; the input is a float id tensor."""
    return _build(_TokenEncoder, (1, 8), seed)


class _SeparateQKV(nn.Module):
    """BERT-style self-attention: three Linears, heads via view/permute, an additive mask."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.register_buffer("mask", torch.triu(torch.full((16, 16), -1e4), 1)[None, None])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.h, self.d).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / (self.d ** 0.5) + self.mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        return self.out(ctx.view(x.shape[0], x.shape[1], self.h * self.d))


class _SeparateQKVNet(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.Sequential(_TimmBlock(dim, heads, _SeparateQKV(dim, heads)),
                                    _TimmBlock(dim, heads, _SeparateQKV(dim, heads)))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x).flatten(2).transpose(1, 2)).mean(1))


def build_separate_qkv_like(seed: int = 0):
    """Separate q/k/v Linears (BERT style) with an additive causal mask."""
    return _build(_SeparateQKVNet, (1, 3, 32, 32), seed)


class _WindowAttention(nn.Module):
    """Swin's WindowAttention: relative position bias gathered from a table, one per head."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.h, self.window = heads, window
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class _SwinLike(nn.Module):
    """Patch embed, windows of 4x4 tokens (window partition / reverse), two blocks."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 4) -> None:
        super().__init__()
        self.window = window
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.ModuleList(
            _TimmBlock(dim, heads, _WindowAttention(dim, heads, window)) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)  # B, H, W, C
        b, hh, ww, c = x.shape
        w = self.window
        x = x.view(b, hh // w, w, ww // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1).mean(0, keepdim=True))


def build_swin_like(seed: int = 0):
    """Swin-style window attention with a per-head relative position bias."""
    return _build(_SwinLike, (1, 3, 32, 32), seed)


ATTENTION_ZOO = {
    "deit_like": build_deit_like,
    "mha_vit_like": build_mha_vit_like,
    "transformer_encoder_like": build_transformer_encoder_like,
    "separate_qkv_like": build_separate_qkv_like,
    "swin_like": build_swin_like,
}
