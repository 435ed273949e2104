"""Tiny text models as exporters write them: integer inputs that index tables.

``TinyBert``: ``input_ids`` into a word table, ``token_type_ids`` into a 2-row table, learned
positions read from a buffer sliced to the sequence length, ``attention_mask`` as the additive
``(1 - m) * -10000`` mask, ``layers`` post-norm encoder layers (one by default, 2 heads), a pooler
and a classifier: the pattern onnxruntime's transformer optimizer fuses. Exported with dynamic
batch and sequence by TorchScript (opset 17) and by dynamo (opset 18).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import warnings

import onnx
import torch
from torch import nn

TEXT_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


class _EncoderLayer(nn.Module):
    """BertLayer: q/k/v Linears, heads by view/transpose, the additive mask, post-norm, GELU."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v, self.o = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x, additive):
        b, t, _ = x.shape
        h, d = self.heads, x.shape[-1] // self.heads

        def split(y):
            return y.view(b, t, h, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + additive, -1)
        context = (attention @ v).transpose(1, 2).reshape(b, t, h * d)
        x = self.ln1(x + self.o(context))
        return self.ln2(x + self.down(nn.functional.gelu(self.up(x))))


class TinyBert(nn.Module):
    """A BERT (vocab 30, hidden 16, one layer by default) whose weights are seeded."""

    def __init__(self, vocab: int = 30, hidden: int = 16, heads: int = 2, positions: int = 32,
                 types: int = 2, ffn: int = 32, seed: int = 0, layers: int = 1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.word, self.pos = nn.Embedding(vocab, hidden), nn.Embedding(positions, hidden)
        self.types, self.ln0 = nn.Embedding(types, hidden), nn.LayerNorm(hidden)
        self.register_buffer("position_ids", torch.arange(positions)[None])
        self.layers = nn.ModuleList(_EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler, self.cls = nn.Linear(hidden, hidden), nn.Linear(hidden, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, input_ids, token_type_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.word(input_ids) + self.pos(self.position_ids[:, :t]) + self.types(token_type_ids)
        x = self.ln0(x)
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, additive)
        return self.cls(torch.tanh(self.pooler(x[:, 0])))


def export_bert(dynamo: bool, **sizes) -> onnx.ModelProto:
    """``TinyBert(**sizes)`` exported with symbolic ``batch`` and ``sequence``."""
    module = TinyBert(**sizes).eval()
    positions = sizes.get("positions", 32)
    seq = min(8, positions)
    args = (torch.randint(0, 30, (2, seq)), torch.randint(0, 2, (2, seq)),
            torch.ones(2, seq, dtype=torch.int64))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        path = os.path.join(tmp, "bert.onnx")
        if dynamo:
            batch = torch.export.Dim("batch", max=64)
            length = torch.export.Dim("sequence", max=positions)
            torch.onnx.export(module, args, path, input_names=list(TEXT_INPUTS),
                              output_names=["logits"], dynamo=True, external_data=False,
                              dynamic_shapes={n: {0: batch, 1: length} for n in TEXT_INPUTS})
        else:
            torch.onnx.export(module, args, path, input_names=list(TEXT_INPUTS),
                              output_names=["logits"], dynamo=False, opset_version=17,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in TEXT_INPUTS})
        return onnx.load(path)
