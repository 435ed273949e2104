"""Transformer graphs as the torch exporters write them, pruned at defaults (issue 21).

Usage: ``python benchmarks/transformers.py [--sparsity 0.5] [--runs 50] [--warmup 5]
[--models llama bert vit bert-hf] [--exporters torchscript dynamo optimized int4]
[--allow-interface-change]``

Four tiny random-weight models built with torch (transformers/optimum are not needed):

- **llama**: ``tests/llama_models.LlamaLike`` (no KV cache): vocabulary 512, width 128, 8 query
  heads sharing 2 KV heads (grouped-query attention), rotary with rotate_half, repeat_kv,
  SwiGLU MLP 344 wide, decomposed RMSNorm, 2 layers, untied LM head, sequence 32;
- **llama-cache**: the same llama exported with a KV cache as optimum's
  ``text-generation-with-past`` writes it (``tests/llama_models.LlamaWithPast``: input_ids,
  attention_mask, position_ids, past_key_values.* in; logits, present.* out; symbolic batch,
  sequence and past length): the KV heads stay (the cache interface), the query heads within each
  KV group and the MLP prune; verified at an empty and a non-empty past (with
  ``--allow-interface-change``, passed to every prune, whole KV groups prune and the caches
  shrink with them; the pruned model is timed on caches of its own head count);
- **bert**: word + position embeddings, LayerNorm, 2 post-norm encoder layers with separate
  q/k/v Linears (``tests/attention_models._SeparateQKV``, 4 heads, width 64), GELU FFN 256 wide,
  a Tanh pooler, sequence 16;
- **vit**: ``tests/attention_models`` DeiT-like (fused qkv, class token, 4 heads, width 48);
- **bert-hf**: ``tests/text_models.TinyBert`` laid out as Hugging Face's BertModel (word,
  position and token-type tables, ``attention_mask`` as an additive mask), vocabulary 512,
  2 layers, 4 heads, width 64, FFN 256, symbolic batch and sequence: the pattern onnxruntime's
  transformer optimizer fuses. Exporter ``optimized``: TorchScript, then
  ``onnxruntime.transformers.optimizer.optimize_model(model_type='bert')`` (EmbedLayerNormalization,
  Attention with packed QKV, SkipLayerNormalization, BiasGelu); only this model takes it.

Each is exported with TorchScript (``dynamo=False``) and dynamo (and, for ``int4``, the
TorchScript export with every constant-weight MatMul made a com.microsoft ``MatMulNBits`` by
onnxruntime's ``MatMulNBitsQuantizer``: 4 bits, blocks of 32 as the onnxruntime-genai builder
writes them, with zero points; params count a packed weight's codes), pruned with
``onnx_fpgm.prune(model, sparsity)`` (no other option; verification on), and reported:
params after/before (all weights; without the embedding tables and LM head, which no
structured pruner touches; and projected to a model whose embeddings are half its weights, as
the Hugging Face configs of issue 21 are: ``0.5 + 0.5 * ratio without embeddings``), the head
groups (KV groups for GQA) and widths before -> after,
the oracle's verdict and max relative error, and onnxruntime CPU latency of the original and
the pruned model side by side (at the secondary verification sizes where there are symbolic dims:
llama-cache at batch 2, 32 new tokens on a past of 3) (``onnx_fpgm.measure.bench.benchmark``: one process, interleaved,
after warm-up). Beside ours, in the same rows, the ONNX-native peer (``peer_onnxsim``:
onnxsim's head, width and MatMulNBits passes at the same sparsity with their defaults): its
params (and projected), the heads and widths it touched, whether onnxruntime runs its file and
whether it is exact against the masked original at the sizes our verification used, its pruning
time and its pruned model's latency (a second ``benchmark`` against the original, at the same
sizes: "peer speedup" is over the original timed in that call; "-" where it touched nothing);
"not installed" where onnxsim is not importable.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from end_to_end import format_table

from tests.attention_models import _SeparateQKV, build_deit_like
from tests.llama_models import build_llama_like, export_llama, export_llama_with_past
from tests.torch_models import _quiet_exporter, export_onnx

LLAMA = {"vocab": 512, "dim": 128, "heads": 8, "kv_heads": 2, "hidden": 344, "layers": 2,
         "seq": 32}
BERT_HF = {"vocab": 512, "hidden": 64, "heads": 4, "ffn": 256, "layers": 2, "positions": 32}


class _BertLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = _SeparateQKV(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.intermediate = nn.Linear(dim, ffn)
        self.output = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attention(x))
        return self.norm2(x + self.output(nn.functional.gelu(self.intermediate(x))))


class _BertLike(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 64, heads: int = 4, ffn: int = 256,
                 seq: int = 16) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.Sequential(*(_BertLayer(dim, heads, ffn) for _ in range(2)))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.norm(self.word(input_ids) + self.position))
        return torch.tanh(self.pooler(x[:, 0]))


def _export_ids(module: nn.Module, seq: int, dynamo: bool) -> onnx.ModelProto:
    """Export a module taking int64 ``input_ids`` of shape (1, seq)."""
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, _quiet_exporter():
        path = os.path.join(tmp, "m.onnx")
        kwargs = ({"dynamo": True, "opset_version": 18, "external_data": False,
                   "verbose": False} if dynamo else {"dynamo": False, "opset_version": 17})
        torch.onnx.export(module.eval(), (torch.zeros((1, seq), dtype=torch.int64),), path,
                          input_names=["input_ids"], output_names=["output"], **kwargs)
        return onnx.load(path)


def _optimized_bert() -> onnx.ModelProto:
    """TinyBert exported by TorchScript and fused by onnxruntime's transformer optimizer."""
    import os
    import tempfile

    from onnxruntime.transformers import optimizer

    from tests.text_models import export_bert

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert.onnx")
        onnx.save(export_bert(False, **BERT_HF), path)
        return optimizer.optimize_model(path, model_type="bert", num_heads=BERT_HF["heads"],
                                        hidden_size=BERT_HF["hidden"]).model


#: int4 exports: MatMulNBitsQuantizer's options (onnxruntime-genai's default block size).
INT4 = {"bits": 4, "block_size": 32, "is_symmetric": False}


def build(name: str, exporter: str) -> onnx.ModelProto:
    """``name`` exported by ``exporter`` (torchscript, dynamo, optimized: onnxruntime's
    transformer optimizer on BERT, or int4: TorchScript quantized)."""
    if exporter == "optimized":
        return _optimized_bert()
    model = _build_float(name, exporter == "dynamo")
    if exporter != "int4":
        return model
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, **INT4)
    quantizer.process()
    return quantizer.model.model


def _build_float(name: str, dynamo: bool) -> onnx.ModelProto:
    if name == "bert-hf":
        from tests.text_models import export_bert

        return export_bert(dynamo, **BERT_HF)
    if name == "llama":
        return export_llama(build_llama_like(**LLAMA), dynamo, seq=LLAMA["seq"])
    if name == "llama-cache":
        return export_llama_with_past(build_llama_like(**LLAMA, with_positions=True), dynamo)
    if name == "bert":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return _export_ids(_BertLike(), 16, dynamo)
    module, shape = build_deit_like()
    return export_onnx(module, shape, dynamo=dynamo, fold_bn=not dynamo)


def _embedding_params(model: onnx.ModelProto) -> int:
    """Weights of embedding tables (Gather on a stored 2-D table, the tables of a fused
    EmbedLayerNormalization) and of the LM head (an int4 one: its codes, scales and zero points,
    as ``count_params`` counts them)."""
    from onnx_fpgm.measure.bench import packed_weights

    stored = {t.name: t for t in model.graph.initializer}
    names = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and
             n.input[0] in stored and len(stored[n.input[0]].dims) == 2}
    names |= {name for n in model.graph.node if n.op_type == "EmbedLayerNormalization"
              for name in n.input[2:5] if name in stored}
    outputs = {o.name for o in model.graph.output}
    names |= {name for n in model.graph.node if n.op_type in ("MatMul", "MatMulNBits") and
              n.output[0] in outputs for name in n.input[1:] if name in stored}
    codes = packed_weights(model.graph.node)
    return sum(int(np.prod(stored[n].dims)) * codes.get(n, 1) for n in names)


def _groups(result) -> tuple[str, str]:
    heads, widths = [], []
    for g in result.report.groups:
        text = f"{g.channels_before}->{g.channels_after}" if not g.frozen else \
            f"{g.channels_before} whole"
        (heads if g.heads else widths).append(text)
    return " ".join(heads) or "-", " ".join(w for w in widths if "whole" not in w) or "-"


def run(name: str, exporter: str, sparsity: float, runs: int, warmup: int,
        allow_interface_change: bool = False) -> dict:
    import onnx_fpgm
    from onnx_fpgm.measure.bench import benchmark

    model = build(name, exporter)
    start = time.perf_counter()
    result = onnx_fpgm.prune(model, sparsity, allow_interface_change=allow_interface_change)
    wall = time.perf_counter() - start
    before, after = result.report.before.params, result.report.after.params
    embed = _embedding_params(model)
    heads, widths = _groups(result)
    check = result.report.verification
    sizes = result.report.input_sizes.get("secondary") or result.report.input_sizes["primary"]
    latency = benchmark(model, result.model, runs=runs, warmup=warmup,
                        input_shapes={k: tuple(v) for k, v in sizes.items()})  # the sizes prune chose
    return {"model": name, "export": exporter, "params": after / before,
            "params w/o embed": (after - embed) / (before - embed),
            "embed share": embed / before,
            "at embed 1/2": 0.5 + 0.5 * (after - embed) / (before - embed),
            "heads (groups)": heads, "widths": widths, "verified": check.get("passed"),
            "max rel err": f"{check.get('max_rel_error', float('nan')):.1e}",
            "orig ms": latency.original_ms, "pruned ms": latency.pruned_ms,
            "speedup": latency.original_ms / latency.pruned_ms, "prune s": wall,
            **peer_columns(model, sparsity, result.report.input_sizes, runs, warmup, embed)}


def peer_columns(model: onnx.ModelProto, sparsity: float, input_sizes: dict, runs: int,
                 warmup: int, embed: int) -> dict:
    """The peer's cells beside ours: onnxsim's structured passes at the same sparsity, checked
    at the sizes our verification used (``peer_onnxsim``); "not installed" without it."""
    import peer_onnxsim

    from onnx_fpgm.measure.bench import benchmark, count_params

    if peer_onnxsim.peer_version() is None:
        return dict.fromkeys(("peer params", "peer heads", "peer widths", "peer runs, exact"),
                             "not installed")
    sizes = [{k: tuple(v) for k, v in input_sizes[key].items()}
             for key in ("primary", "secondary") if input_sizes.get(key)]
    peer = peer_onnxsim.run_peer(model, sparsity, sizes or None)
    before = count_params(model)
    after = peer.params_ratio * before
    cells = {"peer params": peer.params_ratio,
             "peer at embed 1/2": 0.5 + 0.5 * (after - embed) / (before - embed),
             "peer heads": peer.heads_text(), "peer widths": peer.widths_text(),
             "peer runs, exact": peer.verdict(), "peer ms": None, "peer speedup": None,
             "peer s": peer.wall_s,
             "peer detail": peer.detail}
    if peer.runs and peer.params_ratio < 1:
        timed = benchmark(model, peer.model, runs=runs, warmup=warmup,
                          input_shapes=sizes[-1] if sizes else None)
        cells["peer ms"] = timed.pruned_ms
        cells["peer speedup"] = timed.original_ms / timed.pruned_ms
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["llama", "llama-cache", "bert", "vit",
                                                              "bert-hf"])
    exporters = ["torchscript", "dynamo", "optimized", "int4"]
    parser.add_argument("--exporters", nargs="+", default=exporters, choices=exporters)
    parser.add_argument("--allow-interface-change", action="store_true",
                        help="prune whole KV groups with the cache (the caches shrink)")
    args = parser.parse_args(argv)
    rows = [run(m, e, args.sparsity, args.runs, args.warmup, args.allow_interface_change)
            for m in args.models for e in args.exporters
            if e != "optimized" or m == "bert-hf"]  # the optimizer's fusions are BERT's
    details = [f"- {r['model']} / {r['export']}: {r.pop('peer detail')}" for r in rows
               if "peer detail" in r]
    print(format_table(rows))
    import peer_onnxsim

    print(f"peer: onnxsim {peer_onnxsim.peer_version() or 'not installed'}")
    print("\n".join(details))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
