"""Real exporter files, as a user has them, pruned with ``onnx-fpgm IN OUT --sparsity S`` (issue 21).

Usage: ``python benchmarks/exporters.py [--sparsity 0.5] [--work DIR] [--genai-python PY]
[--only llama-optimum bert-optimum vit-optimum llama-genai-fp32 llama-genai-int4
qwen2-optimum ... qwen2-genai-fp32 ...] [--flags ...]``

Needs the ``export`` extra (``pip install .[export]``: transformers, optimum-onnx,
onnxruntime-genai), never the core install. Nothing is downloaded: tiny random-weight models
are built from configs in code (``save_pretrained`` into ``--work``), with a word-level
tokenizer of their own for the genai builder, and exported as their tools export them:

- **llama-optimum**: ``optimum-cli export onnx --task text-generation-with-past`` of a
  ``LlamaConfig`` (vocabulary 512, width 128, 8 query heads on 2 KV heads, MLP 344, 2 layers):
  TorchScript, past_key_values.* in, present.* out;
- **bert-optimum**: ``--task feature-extraction`` of a ``BertConfig`` (width 64, 4 heads, FFN 256,
  2 layers);
- **vit-optimum**: ``--task feature-extraction`` of a ``ViTConfig`` (32 x 32 images, patches of 8,
  width 48, 4 heads, FFN 96, 2 layers);
- **llama-genai-fp32 / -int4**: ``python -m onnxruntime_genai.models.builder -i DIR -o OUT
  -p fp32|int4 -e cpu`` of the same llama (GroupQueryAttention with packed q|k|v and its own
  rotary, SimplifiedLayerNormalization, MatMulNBits with accuracy_level 4 for int4);
- **distilbert, roberta, albert, deberta-v2, electra, mobilebert** (``feature-extraction``) and
  **swin, convnext, deit, mobilevit** (``image-classification``), each ``NAME-optimum``: the
  configs of ``exporter_encoders.py``.
- **qwen2 / mistral / phi3 / gemma / gpt2 -optimum** (``text-generation-with-past``) and
  **qwen2 / mistral / phi3 -genai-fp32**: the llama's sizes in each family's config
  (``DECODERS``): Qwen2 (GQA, q/k/v bias), Mistral (GQA, sliding window 64), Phi-3 (packed
  qkv_proj and gate_up_proj; its rotary's pass-through part), Gemma (4 query heads on one KV
  head, head_dim 48 != 128 / 4, GeGLU, scaled embeddings), GPT-2 (Conv1D: packed c_attn as
  ``addmm`` on ``x.view(-1, d)``, learned positions, tied LM head; 4 heads, MLP 344).

optimum-onnx 0.1 wants transformers < 4.58, onnxruntime-genai 0.18's builder imports classes
of transformers 5: where one environment cannot hold both, ``--genai-python`` names the
interpreter of one that has onnxruntime-genai (and this tree's requirements are not needed
there: only the builder runs in it).

Each file is pruned by the CLI in a subprocess (``python -m onnx_fpgm``, verification on,
``--report``), and the table gives its exit code, params after/before, the head groups
(query slots where a KV cache keeps the KV heads) and widths before -> after, the verdict
with the max relative error, and the reasons that kept the rest whole. Beside them, the
ONNX-native peer on the same file (``peer_onnxsim``: onnxsim's structured passes at the same
sparsity, in this process; its params, heads, widths, whether onnxruntime runs its file and
whether it is exact against the masked original at the sizes our verification used).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# benchmarks/transformers.py would shadow the transformers package: this folder is not searched
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("end_to_end", HERE / "end_to_end.py")
_end_to_end = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_end_to_end)
format_table = _end_to_end.format_table
_spec = importlib.util.spec_from_file_location("peer_onnxsim", HERE / "peer_onnxsim.py")
peer_onnxsim = importlib.util.module_from_spec(_spec)
sys.modules["peer_onnxsim"] = peer_onnxsim  # its dataclasses look their module up there
_spec.loader.exec_module(peer_onnxsim)
_spec = importlib.util.spec_from_file_location("exporter_encoders", HERE / "exporter_encoders.py")
exporter_encoders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exporter_encoders)
ENCODERS = exporter_encoders.ENCODERS

LLAMA = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
         "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
         "max_position_embeddings": 256}
BERT = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "max_position_embeddings": 128}
VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "num_hidden_layers": 2,
       "num_attention_heads": 4, "intermediate_size": 96}
#: decoder families beside the llama: (transformers config class, its options)
DECODERS = {
    "qwen2": ("Qwen2Config", LLAMA),
    "mistral": ("MistralConfig", {**LLAMA, "sliding_window": 64}),
    "phi3": ("Phi3Config", {**LLAMA, "original_max_position_embeddings": 256, "pad_token_id": 0,
                            "bos_token_id": 1, "eos_token_id": 2}),
    "gemma": ("GemmaConfig", {**LLAMA, "num_attention_heads": 4, "num_key_value_heads": 1,
                              "head_dim": 48}),
    "gpt2": ("GPT2Config", {"vocab_size": 512, "n_embd": 128, "n_head": 4, "n_layer": 2,
                            "n_positions": 128, "n_inner": 344}),
}
GENAI_DECODERS = ("qwen2", "mistral", "phi3")  # the genai builder rows of this survey
FILES = ("llama-optimum", "bert-optimum", "vit-optimum", "llama-genai-fp32", "llama-genai-int4",
         *(f"{name}-optimum" for name in DECODERS),
         *(f"{name}-genai-fp32" for name in GENAI_DECODERS), *ENCODERS)
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def build_models(work: Path, names: list[str]) -> None:
    """Random-weight Hugging Face folders (seeded) for llama, bert, vit, ``DECODERS`` and
    ``names``' encoders."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        BertConfig,
        BertModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTModel,
    )

    def save_tokenizer(folder: Path) -> None:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 512)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>").save_pretrained(folder)

    torch.manual_seed(0)
    if not (work / "llama" / "config.json").exists():
        LlamaForCausalLM(LlamaConfig(**LLAMA)).eval().save_pretrained(work / "llama")
        save_tokenizer(work / "llama")
    for name, (config_class, options) in DECODERS.items():
        if not (work / name / "config.json").exists():
            torch.manual_seed(0)
            config = getattr(transformers, config_class)(**options)
            AutoModelForCausalLM.from_config(config).eval().save_pretrained(work / name)
            save_tokenizer(work / name)
    if not (work / "bert" / "config.json").exists():
        BertModel(BertConfig(**BERT)).eval().save_pretrained(work / "bert")
    if not (work / "vit" / "config.json").exists():
        ViTModel(ViTConfig(**VIT)).eval().save_pretrained(work / "vit")
    for name in names:
        source = work / name.removesuffix("-optimum")
        if name in ENCODERS and not (source / "config.json").exists():
            torch.manual_seed(0)
            exporter_encoders.build_encoder(name, source)


def export(name: str, work: Path, genai_python: str) -> Path:
    """Export one file (kept when already there); returns the model path."""
    out = work / name
    model = out / "model.onnx"
    if model.exists():
        return model
    env = {**os.environ, **OFFLINE}
    if name.endswith("-optimum"):
        source = name.removesuffix("-optimum")
        if name in ENCODERS:
            task = ENCODERS[name][3]
        else:
            task = "feature-extraction" if source in ("bert", "vit") \
                else "text-generation-with-past"
        command = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "onnx",
                   "-m", str(work / source), "--task", task, str(out)]
    else:
        precision = name.rsplit("-", 1)[1]
        command = [genai_python, "-m", "onnxruntime_genai.models.builder", "-i",
                   str(work / name.split("-")[0]), "-o", str(out), "-p", precision, "-e", "cpu",
                   "-c", str(work / "hf-cache")]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
    if done.returncode or not model.exists():
        raise SystemExit(f"{name}: export failed ({done.returncode}): "
                         f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return model


def prune(name: str, model: Path, work: Path, sparsity: float, flags: list[str]) -> dict:
    """``python -m onnx_fpgm IN OUT --sparsity S`` and what its report says."""
    out_dir = work / "pruned" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "report.json"
    report.unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "onnx_fpgm", str(model),
                           str(out_dir / "model.onnx"), "--sparsity", str(sparsity), "-q",
                           "--report", str(report), *flags],
                          check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    row: dict[str, object] = {"file": name, "exit": done.returncode}
    if not report.exists():
        row["verified"] = (done.stderr or done.stdout).strip().splitlines()[-1][:120]
        return row
    data = json.loads(report.read_text())
    row["params"] = f"{data['after']['params'] / data['before']['params']:.3f}"
    groups = data["groups"]
    row["heads"] = ", ".join(f"{g['channels_before']}->{g['channels_after']}"
                             for g in groups if g["heads"]) or "whole"
    row["widths"] = ", ".join(f"{g['channels_before']}->{g['channels_after']}"
                              for g in groups if not g["heads"] and not g["frozen"]) or "-"
    check = data.get("verification") or {}
    row["verified"] = ("yes" if check.get("passed") else "NO") + \
        f" ({check.get('max_rel_error', float('nan')):.1e}, {len(check.get('checked_at', []))} sets)"
    reasons = sorted({_short(g["frozen"]) for g in groups if g["frozen"]})
    row["stayed whole"] = "; ".join(reasons)
    return row


def peer_cells(model: Path, sparsity: float, report: Path) -> tuple[dict, str]:
    """The peer's cells for one file (onnxsim's structured passes at the same sparsity,
    checked at the sizes our verification used) and its per-pass detail."""
    if peer_onnxsim.peer_version() is None:
        return dict.fromkeys(("peer params", "peer heads", "peer widths", "peer runs, exact"),
                             "not installed"), ""
    import onnx

    sizes = json.loads(report.read_text()).get("input_sizes", {}) if report.exists() else {}
    sets = [{k: tuple(v) for k, v in sizes[key].items()}
            for key in ("primary", "secondary") if sizes.get(key)]
    try:
        peer = peer_onnxsim.run_peer(onnx.load(str(model)), sparsity, sets or None)
    except Exception as err:  # noqa: BLE001  (one file's failure is that file's cell)
        return {"peer runs, exact": f"error: {type(err).__name__}: {err}"[:90]}, ""
    return {"peer params": f"{peer.params_ratio:.3f}", "peer heads": peer.heads_text(),
            "peer widths": peer.widths_text(), "peer runs, exact": peer.verdict()}, peer.detail


def _short(reason: str) -> str:
    """A reason without its node names (one line per kind)."""
    words = [w for w in reason.split() if not w.startswith("/") and "." not in w.strip(",")]
    return " ".join(words)[:70]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnx-fpgm-exporters"))
    parser.add_argument("--genai-python", default=sys.executable)
    parser.add_argument("--only", nargs="+", choices=FILES, default=list(FILES))
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="more onnx-fpgm options, passed as they are (last)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    build_models(args.work, args.only)
    rows, details = [], []
    for name in args.only:
        model = export(name, args.work, args.genai_python)
        row = prune(name, model, args.work, args.sparsity, args.flags)
        cells, detail = peer_cells(model, args.sparsity,
                                   args.work / "pruned" / name / "report.json")
        rows.append({**row, **cells})
        details.append(f"- {name}: {detail}")
    print(format_table(rows))
    print(f"peer: onnxsim {peer_onnxsim.peer_version() or 'not installed'}")
    print("\n".join(details))


if __name__ == "__main__":
    main()
