"""Attention on tokens whose count no exporter names (issue 21: MobileViT, Swin via optimum).

MobileViT unfolds patches into ``(batch * patch_area, patches, C)`` and Swin into windows:
onnx names neither dim, so the batch of the attention's ``view(x.size(0), -1, heads, d)``
(read by ``Shape`` from the LayerNorm's output) and dim 0 of the query projection were tokens of
their own and looked unequal: the heads stayed whole ("cannot resolve the target shape").
``deps/same_dims.py`` traces such a dim back through the ops that copy it. Both forms of the
target (heads constant, or ``-1`` in their place as Swin writes it), both exporters, checked by
the oracle at the batch prune() chose and at batch 3.
"""
from __future__ import annotations

import io

import onnx
import pytest

from tests.conftest import check_pruned
from tests.test_computed_shapes import _check_at_batch

import onnx_fpgm

FORMS = [(form, dynamo) for form in ("heads", "minus_one_heads") for dynamo in (False, True)]


def _net(form: str):
    import torch
    from torch import nn

    class PatchAttention(nn.Module):
        """conv -> (batch * 2, tokens, 16) -> pre-norm attention (4 heads of 4) -> head."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 1)
            self.norm = nn.LayerNorm(16)
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            y = self.conv(x)
            b, c, h, w = y.shape
            tokens = y.permute(0, 2, 3, 1).reshape(b * 2, h * w // 2, c)
            tokens = tokens + self.attend(self.norm(tokens))
            return self.fc(tokens.mean(1))

        def attend(self, t):
            rows, count = t.size(0), t.size(1)
            shape = (rows, -1, 4, 4) if form == "heads" else (rows, count, -1, 4)
            q, k, v = (p(t).view(shape).transpose(1, 2) for p in (self.q, self.k, self.v))
            scores = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)
            context = (scores @ v).transpose(1, 2)
            return self.o(context.reshape(context.size()[:-2] + (16,)))

    return PatchAttention()


def _export(form: str, dynamo: bool) -> onnx.ModelProto:
    import torch

    torch.manual_seed(0)
    module = _net(form).eval()
    example = torch.randn(2, 3, 4, 4)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        return torch.onnx.export(module, (example,), dynamo=True, input_names=["input"],
                                 output_names=["output"], dynamic_shapes={"x": {0: batch}},
                                 verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=["input"],
                      output_names=["output"], opset_version=17,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.mark.torch_export
@pytest.mark.parametrize("form,dynamo", FORMS,
                         ids=[f"{f}-{'dynamo' if d else 'torchscript'}" for f, d in FORMS])
def test_heads_prune_on_tokens_of_an_unnamed_count(form: str, dynamo: bool) -> None:
    model = _export(form, dynamo)
    result = onnx_fpgm.prune(model, 0.5)
    check_pruned(model, result)
    _check_at_batch(model, result, 3)
    heads = [g for g in result.report.groups if g.heads]
    assert heads and all(g.channels_after < g.channels_before for g in heads), \
        [g.frozen for g in result.report.groups if g.frozen]
