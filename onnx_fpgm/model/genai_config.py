"""onnxruntime-genai's ``genai_config.json`` beside a decoder, rewritten for the pruned model.

Under ``--allow-interface-change`` whole KV groups prune (a KV head with the query heads that
read it) and the caches shrink with them. genai counts one ``num_key_value_heads`` and one
``num_attention_heads`` for all ``num_hidden_layers``: they are read off the pruned
GroupQueryAttention nodes (``num_heads``/``kv_num_heads`` as rewritten, also where a layer kept
its KV heads and only query slots went) or, without such nodes (a Concat cache), from the caches
that shrank, both counts by the same factor. A model whose layers kept different counts, or
whose caches shrank in only some layers, cannot be described: refused before anything is
written. ``model.decoder.filename`` names OUT (``pointed_at``); ``head_size`` follows the
caches' head_dim axis where head dims went with them (``head_size_change``). The copy
beside OUT is written through the run's file plan (``files.FilePlan.add_genai_config``), by
the CLI and ``PruneResult.save`` alike, from ``config_for_out``.
"""
from __future__ import annotations

import json
from typing import Any

import onnx

from ..errors import ConfigError

#: The file onnxruntime-genai reads beside its model.
GENAI_CONFIG = "genai_config.json"


def kv_heads_change(changes: list[dict[str, Any]]) -> tuple[int, int] | None | str:
    """(KV heads before, after) shared by every changed cache; None: no change; a str: why the
    changes cannot be written as one count (the layers kept different numbers of heads)."""
    return _one_change(changes, lambda c: c.get("heads_axis", c["axis"]), "numbers of KV heads")


def head_size_change(changes: list[dict[str, Any]]) -> tuple[int, int] | None | str:
    """(head_size before, after) shared by every cache whose head_dim axis shrank; None: no
    such change; a str: why it cannot be written as one size."""
    return _one_change(changes, lambda c: c.get("head_dim_axis"), "head sizes")


def _one_change(changes: list[dict[str, Any]], axis_of, what: str
                ) -> tuple[int, int] | None | str:
    """(size before, after) on the axis ``axis_of`` names, shared by every change that shrank
    that axis (a report row lists its shrunk ``axes``; older rows only ``axis``)."""
    pairs = {(c["before"][axis], c["after"][axis]) for c in changes
             if (axis := axis_of(c)) is not None and axis in c.get("axes", [c["axis"]])}
    if len(pairs) > 1:
        return f"the layers keep different {what} " + \
            ", ".join(f"{b} -> {a}" for b, a in sorted(pairs, key=str))
    return pairs.pop() if pairs else None


def gqa_heads(model: onnx.ModelProto) -> set[tuple[int, int]]:
    """(num_heads, kv_num_heads) of every com.microsoft GroupQueryAttention of ``model``."""
    found = set()
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft":
            attrs = {a.name: a.i for a in node.attribute}
            found.add((int(attrs.get("num_heads", 0)), int(attrs.get("kv_num_heads", 0))))
    return found


def _layers_left_whole(changes: list[dict[str, Any]], layers: int) -> int:
    """How many of ``layers`` kept their caches whole while others' shrank (0: all or none
    shrank): each layer has a past key and a past value input."""
    shrunk = len({c["name"] for c in changes if c["kind"] == "input"}) // 2
    return layers - shrunk if 0 < shrunk < layers else 0


def pointed_at(config: dict[str, Any], out_name: str) -> None:
    """``model.decoder.filename`` set to OUT's file name (genai opens the model by it)."""
    config["model"]["decoder"]["filename"] = out_name


def updated_genai_config(text: str, changes: list[dict[str, Any]],
                         heads_after: set[tuple[int, int]] | None = None,
                         out_name: str | None = None) -> tuple[str | None, str]:
    """The config for the pruned model (None: it does not describe IN, not written) and a note
    saying what was done. ``heads_after``: ``gqa_heads`` of the pruned model (empty or None:
    the counts follow ``changes``); ``out_name``: OUT's file name (``pointed_at``).

    Raises:
        ConfigError: the layers kept different head counts, or only some caches shrank.
    """
    try:
        config = json.loads(text)
        decoder = config["model"]["decoder"]
        kv, heads = int(decoder["num_key_value_heads"]), int(decoder["num_attention_heads"])
        layers = int(decoder.get("num_hidden_layers", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return None, (f"{GENAI_CONFIG} beside IN not written beside OUT: no readable "
                      f"model.decoder head counts ({type(err).__name__}: {err})")
    change = kv_heads_change(changes)
    size = head_size_change(changes)
    if isinstance(size, str):
        change = size
    whole = _layers_left_whole(changes, layers)
    if isinstance(change, str) or (heads_after and len(heads_after) > 1) or whole:
        why = change if isinstance(change, str) else \
            f"{whole} of {layers} layers kept their KV caches whole" if whole else \
            "the layers keep different head counts " + ", ".join(
                f"{h}/{k}" for h, k in sorted(heads_after))
        raise ConfigError(f"{GENAI_CONFIG} counts one number of heads for all layers, but "
                          f"{why}: not written (nor OUT); prune every layer alike")
    if change is not None and (change[0] != kv or heads % kv):
        return None, (f"{GENAI_CONFIG} not written beside OUT: it declares "
                      f"{kv} KV heads, the model's caches {change[0]}")
    if heads_after:
        new_heads, new_kv = next(iter(heads_after))
    elif change is not None:
        new_kv, new_heads = change[1], heads // kv * change[1]
    else:
        new_heads, new_kv = heads, kv
    if size is not None and "head_size" in decoder and int(decoder["head_size"]) != size[0]:
        return None, (f"{GENAI_CONFIG} not written beside OUT: it declares head_size "
                      f"{decoder['head_size']}, the model's caches {size[0]}")
    if (new_heads, new_kv) == (heads, kv) and size is None and \
            out_name in (None, decoder.get("filename")):
        return text, f"{GENAI_CONFIG} copied beside OUT (no head was removed)"
    decoder["num_key_value_heads"], decoder["num_attention_heads"] = new_kv, new_heads
    sized = ""
    if size is not None:
        decoder["head_size"] = size[1]
        sized = f", head_size {size[0]} -> {size[1]}"
    if out_name is not None:
        pointed_at(config, out_name)
    return json.dumps(config, indent=4) + "\n", (
        f"{GENAI_CONFIG} written beside OUT: num_key_value_heads {kv} -> {new_kv}, "
        f"num_attention_heads {heads} -> {new_heads}{sized}, "
        f"filename {decoder.get('filename')}")


def config_for_out(text: str, pruned: onnx.ModelProto, changes: list[dict[str, Any]],
                   out_name: str) -> tuple[str | None, str]:
    """IN's config ``text`` for OUT (``updated_genai_config`` with the pruned model's
    GroupQueryAttention head counts): what the CLI and ``PruneResult.save`` both write.

    Raises:
        ConfigError: the layers cannot share one count (see ``updated_genai_config``).
    """
    return updated_genai_config(text, changes, gqa_heads(pruned), out_name)
