"""Small re-implementations of torchvision 0.28's Swin and ShuffleNetV2 code (issue 20).

The suite does not depend on torchvision (its wheels are built against other torch versions),
so the parts that shape the exported graph are written out here as torchvision writes them:

* ``swin_t_like``: ``shifted_window_attention`` with ``F.pad`` to window multiples (computed
  pads in a TorchScript export), the cyclic ``torch.roll`` and its attention mask on shifted
  blocks, the relative position bias table indexed per head, ``PatchMerging``; input 24x24 so
  the 6x6 tokens are really padded to 8x8 and the merged 3x3 to 4x4;
* ``shufflenet_v2_x1_0_like``: ``InvertedResidual`` (``chunk``/``cat`` and
  ``channel_shuffle``) with the x1.0 stage width 116, whose halves of 58 do not halve evenly
  down the stage (58, 29, 14.5): units of one stage own fewer and fewer of its channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_models import _build, _channel_shuffle


def _shifted_window_attention(x, qkv_weight, proj_weight, bias, window, heads, shift,
                              qkv_bias, proj_bias):
    """torchvision.models.swin_transformer.shifted_window_attention (no dropout, no V2)."""
    b, h, w, c = x.shape
    pad_r = (window[1] - w % window[1]) % window[1]
    pad_b = (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_h, pad_w, _ = x.shape
    shift = shift.copy()
    if window[0] >= pad_h:
        shift[0] = 0
    if window[1] >= pad_w:
        shift[1] = 0
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    num_windows = (pad_h // window[0]) * (pad_w // window[1])
    x = x.view(b, pad_h // window[0], window[0], pad_w // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * num_windows, window[0] * window[1], c)
    qkv = F.linear(x, qkv_weight, qkv_bias)
    qkv = qkv.reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q.matmul(k.transpose(-2, -1)) + bias
    if sum(shift) > 0:
        mask = x.new_zeros((pad_h, pad_w))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(pad_h // window[0], window[0], pad_w // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(num_windows, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)
        attn = attn.view(x.size(0) // num_windows, num_windows, heads, x.size(1), x.size(1))
        attn = attn + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    attn = F.softmax(attn, dim=-1)
    x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = F.linear(x, proj_weight, proj_bias)
    x = x.view(b, pad_h // window[0], pad_w // window[1], window[0], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, pad_h, pad_w, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class _ShiftedWindowAttention(nn.Module):
    def __init__(self, dim: int, window: list[int], shift: list[int], heads: int) -> None:
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads) * 0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window[0] - 1
        rel[:, :, 1] += window[1] - 1
        rel[:, :, 0] *= 2 * window[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index]
        bias = bias.view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return _shifted_window_attention(x, self.qkv.weight, self.proj.weight, bias, self.window,
                                         self.heads, self.shift, self.qkv.bias, self.proj.bias)


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: list[int], shift: list[int]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _ShiftedWindowAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :],
                       x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class _SwinT(nn.Module):
    """SwinTransformer(patch 4, embed 32, depths [2, 2], heads [2, 4], window 4)."""

    def __init__(self, dim: int = 32, depths=(2, 2), heads=(2, 4), window: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, dim, 4, 4)), nn.LayerNorm(dim)]
        for i, (depth, h) in enumerate(zip(depths, heads)):
            width = dim * 2 ** i
            layers.append(nn.Sequential(*(_SwinBlock(
                width, h, [window, window], [0 if k % 2 == 0 else window // 2] * 2)
                for k in range(depth))))
            if i < len(depths) - 1:
                layers.append(_PatchMerging(width))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        self.head = nn.Linear(dim * 2 ** (len(depths) - 1), 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[0](x).permute(0, 2, 3, 1)
        x = self.norm(self.features[1:](x)).permute(0, 3, 1, 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_swin_t_like(seed: int = 0):
    """torchvision's Swin, small: 24x24 input, so windows are padded and shifted."""
    return _build(_SwinT, (1, 3, 24, 24), seed)


def _conv_bn(cin: int, cout: int, k: int, s: int = 1, groups: int = 1, relu: bool = True):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if relu else []))


class _InvertedResidual(nn.Module):
    """torchvision.models.shufflenetv2.InvertedResidual."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_conv_bn(inp, inp, 3, stride, inp, relu=False),
                                         _conv_bn(inp, half, 1))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            _conv_bn(inp if stride > 1 else half, half, 1),
            _conv_bn(half, half, 3, stride, half, relu=False), _conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class _ShuffleNetV2(nn.Module):
    """ShuffleNetV2 x1.0's first stage width (116) and depth (4 units), then conv5 and fc."""

    def __init__(self, repeats=(4,), widths=(24, 116, 256)) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, widths[0], 3, 2)
        stages, cin = [], widths[0]
        for n, cout in zip(repeats, widths[1:-1]):
            stages.append(nn.Sequential(_InvertedResidual(cin, cout, 2),
                                        *(_InvertedResidual(cout, cout, 1) for _ in range(n - 1))))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv5 = _conv_bn(cin, widths[-1], 1)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.conv1(x)))
        return self.fc(x.mean([2, 3]))


def build_shufflenet_v2_x1_0_like(seed: int = 0):
    """torchvision's ShuffleNetV2 units at x1.0's stage width 116 (halves of 58)."""
    return _build(_ShuffleNetV2, (1, 3, 16, 16), seed)


TORCHVISION_LIKE = {
    "swin_t_like": build_swin_t_like,
    "shufflenet_v2_x1_0_like": build_shufflenet_v2_x1_0_like,
}
