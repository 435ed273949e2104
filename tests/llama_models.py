"""Llama-like decoder blocks written as Hugging Face's modeling_llama writes them (issue 21).

* RMSNorm: ``w * x * rsqrt(mean(x^2) + eps)`` (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul).
* Attention: q/k/v/o projections without bias, ``num_heads`` query heads sharing
  ``num_kv_heads`` key/value heads (grouped-query attention); rotary position embedding with
  ``rotate_half`` (``cat(-x2, x1)``); ``repeat_kv`` as ``x[:, :, None].expand(...).reshape(...)``;
  a causal mask; eager ``softmax(q k^T * scale + mask) v``, or ``scaled_dot_product_attention``.
* MLP: SwiGLU ``down(silu(gate(x)) * up(x))``.
* ``qk_norm``: Qwen3's per-head RMSNorm over head_dim on q and k (before the transpose).
* ``rotary_pass``: Phi-3's rotary, ``cat(rotary(x[..., :d]), x[..., d:])`` with ``d`` read as
  ``cos.shape[-1]``: the pass-through part is empty when the rotary spans the head.

The input is token ids (int64, vocabulary >= 8 so random ids are valid); ``with_positions`` adds
``position_ids`` as a second input (then cos/sin are computed at run time, as in the exports of
HF models; without it they are constants folded by the exporter).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_models import _quiet_exporter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, seq, head_dim = x.shape
    if n_rep == 1:
        return x
    x = x[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, head_dim)
    return x.reshape(batch, kv_heads * n_rep, seq, head_dim)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1)
        freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, sdpa: bool = False,
                 qk_norm: bool = False, rotary_pass: bool = False) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.rotary_pass = rotary_pass
        self.groups = heads // kv_heads
        self.sdpa = sdpa
        # Qwen3/OLMo2: an RMSNorm over head_dim on q and k, per head
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.q_proj = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.project(x, cos, sin), mask)

    def project(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (batch, heads, seq, head_dim), rotary applied to q and k."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.rotary_pass:
            d = cos.shape[-1]
            return (torch.cat((q[..., :d] * cos + rotate_half(q[..., :d]) * sin, q[..., d:]), -1),
                    torch.cat((k[..., :d] * cos + rotate_half(k[..., :d]) * sin, k[..., d:]), -1),
                    v)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def attend(self, x, q, k, v, mask) -> torch.Tensor:
        """repeat_kv, attention and the output projection (``x``: the block input)."""
        k, v = repeat_kv(k, self.groups), repeat_kv(v, self.groups)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim ** -0.5 + mask
            out = torch.matmul(scores.softmax(-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:-1], -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int, sdpa: bool,
                 qk_norm: bool, rotary_pass: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim)
        self.self_attn = LlamaAttention(dim, heads, kv_heads, sdpa, qk_norm, rotary_pass)
        self.post_attention_layernorm = RMSNorm(dim)
        self.mlp = LlamaMLP(dim, hidden)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """Embedding, decoder blocks, final RMSNorm, untied LM head."""

    def __init__(self, vocab: int = 16, dim: int = 32, heads: int = 4, kv_heads: int = 2,
                 hidden: int = 64, layers: int = 2, seq: int = 8, sdpa: bool = False,
                 with_positions: bool = False, qk_norm: bool = False,
                 rotary_pass: bool = False) -> None:
        super().__init__()
        self.with_positions = with_positions
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.rotary = Rotary(dim // heads)
        self.layers = nn.ModuleList(LlamaBlock(dim, heads, kv_heads, hidden, sdpa, qk_norm,
                                               rotary_pass) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), -1e4), 1)[None, None],
                             persistent=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        x = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1])[None]
        cos, sin = self.rotary(position_ids)
        mask = self.mask[..., : input_ids.shape[1], : input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))


def build_llama_like(seed: int = 0, **kwargs) -> LlamaLike:
    """A seeded LlamaLike (linear weights ~ 1/sqrt(fan_in), so activations stay O(1))."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = LlamaLike(**kwargs)
        for m in module.modules():
            if isinstance(m, nn.Linear):
                with torch.no_grad():
                    m.weight.normal_(0, m.weight.shape[1] ** -0.5)
    return module.eval()


def export_llama(module: LlamaLike, dynamo: bool, seq: int = 8,
                 dynamic: bool = False) -> onnx.ModelProto:
    """Export with ``input_ids`` (and ``position_ids``) of shape (1, seq); output ``logits``.

    ``dynamic``: batch and sequence are symbolic (``batch``, ``sequence``), as optimum exports.
    """
    ids = torch.zeros((1, seq), dtype=torch.int64)
    args: tuple = (ids, torch.arange(seq)[None]) if module.with_positions else (ids,)
    names = ["input_ids", "position_ids"][:len(args)]
    kwargs: dict = ({"dynamo": True, "opset_version": 18, "external_data": False,
                     "verbose": False} if dynamo else
                    {"dynamo": False, "opset_version": 17, "do_constant_folding": True})
    if dynamic and dynamo:
        dims = {0: torch.export.Dim("batch", max=8), 1: torch.export.Dim("sequence", max=seq)}
        kwargs["dynamic_shapes"] = [dims] * len(args)
    elif dynamic:
        kwargs["dynamic_axes"] = {n: {0: "batch", 1: "sequence"} for n in names}
    with contextlib.ExitStack() as stack:
        path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "m.onnx")
        with _quiet_exporter():
            torch.onnx.export(module, args, path, input_names=names, output_names=["logits"],
                              **kwargs)
        return onnx.load(path)


class LlamaWithPast(nn.Module):
    """LlamaLike with a KV cache, as optimum's ``text-generation-with-past`` exports it.

    Inputs ``input_ids`` (batch, seq), ``attention_mask`` (batch, past + seq), ``position_ids``
    (batch, seq) and, per layer, ``past_key_values.{i}.key``/``.value`` (batch, kv_heads, past,
    head_dim); outputs ``logits`` and ``present.{i}.key``/``.value``: the past concatenated with
    the new keys/values on the sequence axis (before repeat_kv). The mask is causal over the
    past and the new tokens, with the attention mask's padding added.
    """

    def __init__(self, base: LlamaLike) -> None:
        super().__init__()
        self.base = base

    def forward(self, input_ids, attention_mask, position_ids, *past):
        base = self.base
        x = base.embed_tokens(input_ids)
        cos, sin = base.rotary(position_ids)
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        query_pos = torch.arange(seq)[:, None] + (total - seq)
        causal = (torch.arange(total)[None, :] > query_pos).float() * -1e4
        padding = (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        mask = causal[None, None] + padding
        presents = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = attn.project(h, cos, sin)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            x = x + attn.attend(h, q, k, v, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return (base.lm_head(base.norm(x)), *presents)


def export_llama_with_past(module: LlamaLike, dynamo: bool, seq: int = 4,
                           past: int = 3) -> onnx.ModelProto:
    """Export :class:`LlamaWithPast` with symbolic ``batch``, ``sequence``, ``past_sequence``
    (and the mask's ``past_sequence + sequence``), as optimum does."""
    attn = module.layers[0].self_attn
    kv_heads = attn.k_proj.out_features // attn.head_dim
    n_layers = len(module.layers)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(n_layers)
                  for kind in ("key", "value")]
    present_names = [f"present.{i}.{kind}" for i in range(n_layers) for kind in ("key", "value")]
    names = ["input_ids", "attention_mask", "position_ids", *past_names]
    args = (torch.zeros((1, seq), dtype=torch.int64), torch.ones((1, past + seq), dtype=torch.int64),
            torch.arange(past, past + seq)[None],
            *(torch.randn(1, kv_heads, past, attn.head_dim) for _ in past_names))
    axes = {"input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            **{n: {0: "batch", 2: "past_sequence"} for n in past_names}}
    kwargs: dict = ({"dynamo": True, "opset_version": 18, "external_data": False,
                     "verbose": False} if dynamo else
                    {"dynamo": False, "opset_version": 17, "do_constant_folding": True})
    if dynamo:
        auto = torch.export.Dim.AUTO
        kwargs["dynamic_shapes"] = (*({a: auto for a in axes[n]} for n in names[:3]),
                                    tuple({a: auto for a in axes[n]} for n in past_names))
    else:
        kwargs["dynamic_axes"] = {**axes, "logits": {0: "batch", 1: "sequence"},
                                  **{n: {0: "batch", 2: "total_sequence"}
                                     for n in present_names}}
    with contextlib.ExitStack() as stack:
        path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "m.onnx")
        with _quiet_exporter():
            torch.onnx.export(LlamaWithPast(module).eval(), args, path, input_names=names,
                              output_names=["logits", *present_names], **kwargs)
        return onnx.load(path)
