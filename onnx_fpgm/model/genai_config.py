"""onnxruntime-genai's ``genai_config.json`` beside a decoder, rewritten for its pruned KV heads.

Under ``--allow-interface-change`` whole KV groups prune (a KV head with the query heads that
read it), so ``model.decoder.num_key_value_heads`` and ``num_attention_heads`` shrink by the
same factor and ``head_size`` stays. The copy beside OUT is written through the run's file plan
(``files.FilePlan.add_genai_config``), like every other written file.
"""
from __future__ import annotations

import json
from typing import Any

#: The file onnxruntime-genai reads beside its model.
GENAI_CONFIG = "genai_config.json"


def kv_heads_change(changes: list[dict[str, Any]]) -> tuple[int, int] | None | str:
    """(KV heads before, after) shared by every changed cache; None: no change; a str: why the
    changes cannot be written as one count (the layers kept different numbers of heads)."""
    pairs = {(c["before"][c["axis"]], c["after"][c["axis"]]) for c in changes}
    if not pairs:
        return None
    if len(pairs) > 1:
        return "the layers keep different numbers of KV heads " + \
            ", ".join(f"{b} -> {a}" for b, a in sorted(pairs, key=str))
    return pairs.pop()


def updated_genai_config(text: str, changes: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The config for the pruned model (None: not writable) and a note saying what was done."""
    try:
        config = json.loads(text)
        decoder = config["model"]["decoder"]
        kv, heads = int(decoder["num_key_value_heads"]), int(decoder["num_attention_heads"])
    except (ValueError, KeyError, TypeError) as err:
        return None, (f"{GENAI_CONFIG} beside IN not written beside OUT: no readable "
                      f"model.decoder head counts ({type(err).__name__}: {err})")
    change = kv_heads_change(changes)
    if isinstance(change, str):
        return None, f"{GENAI_CONFIG} not written beside OUT: {change}"
    if change is None:
        return text, f"{GENAI_CONFIG} copied beside OUT (no head was removed)"
    before, after = change
    if before != kv or heads % kv:
        return None, (f"{GENAI_CONFIG} not written beside OUT: it declares "
                      f"{kv} KV heads, the model's caches {before}")
    decoder["num_key_value_heads"] = after
    decoder["num_attention_heads"] = heads // kv * after
    return json.dumps(config, indent=4) + "\n", (
        f"{GENAI_CONFIG} written beside OUT: num_key_value_heads {kv} -> {after}, "
        f"num_attention_heads {heads} -> {decoder['num_attention_heads']}")
