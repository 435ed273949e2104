"""Fused attention ops of onnxruntime's ``com.microsoft`` domain: whole heads.

Channel algebra (``num_heads = h``, hidden size ``H``, head size ``d = H / h``):

* ``Attention(x, W, b)``: ``W`` (H_in, 3H) packs the Q, K and V projections side by side; output
  column ``c`` of each part belongs to head ``c // d``. The op is a producer of 3H atoms (the
  columns of W), split into levels (3, h, d) with the head level free: head ``i`` removes
  columns ``p * H + i * d .. + d`` of every part ``p``. Its output (B, S, H) carries V's atoms,
  head-major, to the output projection (whose input rows the oracle zeroes).
* ``MultiHeadAttention(q, k, v, bias)``: q, k, v are projected activations (B, S, H) whose
  channels are split into (h, d); heads are paired across q, k and v, the output carries v's.
* ``GroupQueryAttention(q, k, v, ...)``: as MultiHeadAttention with ``kv_num_heads`` K/V heads,
  each shared by ``h / h_kv`` query heads: a KV group is one atom; with q|k|v packed in
  ``query`` (key, value empty) the groups are cut out of its one channel axis. With a KV cache
  (past inputs, present outputs read) the K/V heads stay (the cache's interface): query slot
  ``s`` of every group is one atom, so the same slots go from every group and ``num_heads``
  shrinks while ``kv_num_heads`` stays. Under ``--allow-interface-change`` the caches
  (``interface.FUSED_CACHES``: graph inputs and outputs no other op reads on their head or
  head_dim axis) carry their KV heads' channels on axes (1, 3): KV groups prune as without a
  cache, and the caches shrink with them (``interface.interface_changes``).
  ``RotaryEmbedding`` on (B, S, h * d) rotates within heads: whole heads, ``num_heads``
  rewritten.

Rewrite: the kept heads' columns of W and b (``qkv_hidden_sizes`` too), ``num_heads``, and a
constant ``attention_bias`` (B, h, S, T) sliced on its head axis. head_dim and ``scale`` stay.
Blocked: past/present key-value caches (but GroupQueryAttention's), MultiHeadAttention's packed or 4-D q/k/v layouts, a
computed attention bias, an input whose own channels are ours (the input width of the fused
projection is not rewritten). Output shapes onnx cannot infer are recorded from the inputs.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..blocks import SplitMap, new_split, require_free, require_whole
from ..channels import ChannelMap
from ..interface import FUSED_CACHES, read_only_by
from ..registry import register
from ._util import has_input, pass_like_input, record_shape

_BIAS_INPUT = {"Attention": 5, "MultiHeadAttention": 5}
#: (head axis, head_dim axis) of GroupQueryAttention's past/present caches.
_CACHE_AXES = FUSED_CACHES[("GroupQueryAttention", "com.microsoft")][2]


def _check_extras(node, ctx, past_inputs: tuple[int, ...]) -> str | None:
    where = f"fused attention {node.op} {node.name}"
    if any(has_input(node, i) for i in past_inputs):
        return f"{where} reads a key/value cache (heads are not rewritten there)"
    if any(out.outputs or out.name in {t.name for t in ctx.graph.outputs}
           for out in node.outputs[1:] if out is not None and out.name):
        return f"{where} writes a key/value cache that is used"
    index = _BIAS_INPUT[node.op]
    if has_input(node, index) and ctx.const(node.inputs[index]) is None:
        return f"{where} has a computed attention bias"
    return None


def _heads(node, ctx, labels: np.ndarray, parts: int, heads: int, where: str):
    """Split ``labels`` (parts * H) into (parts, h, d) with whole parts, free heads."""
    d = len(labels) // (parts * heads)
    smap = new_split(ctx, where, labels.reshape(parts, heads, d), [0, 1, 2])
    require_whole(ctx, smap, 0, f"{where} packs Q, K and V")
    require_whole(ctx, smap, 2, f"{where} keeps head_dim")
    require_free(ctx, smap, 1, f"{where} pairs heads", heads=True)
    return smap


@register("Attention", domain="com.microsoft")
class MicrosoftAttentionHandler:
    """com.microsoft Attention with packed Q/K/V weights (see module docstring)."""

    def propagate(self, node, ctx) -> None:
        where = f"fused attention {node.op} {node.name}"
        xmap = ctx.map(node.inputs[0])
        weight = ctx.const(node.inputs[1])
        heads = int(node.attrs.get("num_heads", 0))
        bias = ctx.const(node.inputs[2]) if has_input(node, 2) else None
        sizes = node.attrs.get("qkv_hidden_sizes")
        reason = _check_extras(node, ctx, (4,))
        if xmap is not None:
            ctx.block(xmap, f"{where} reads them (its input width is not rewritten)")
        if reason is None and (weight is None or weight.ndim != 2 or heads < 1 or
                               weight.shape[1] % (3 * heads) or
                               (has_input(node, 2) and bias is None)):
            reason = f"{where}: weights are not a stored (H_in, 3H) constant"
        if reason is None and sizes is not None and len(set(sizes)) != 1:
            reason = f"{where}: Q, K and V of different widths (qkv_hidden_sizes)"
        atoms = ctx.new_source(node, weight.T) if weight is not None and weight.ndim == 2 \
            else None
        if reason is not None:
            if atoms is not None:
                ctx.block(atoms, reason)
            return
        smap = _heads(node, ctx, atoms, 3, heads, where)
        if ctx.shape(node.inputs[0]) is not None and len(ctx.shape(node.inputs[0])) == 3:
            record_shape(ctx, node.outputs[0], [*node.inputs[0].shape[:2], len(atoms) // 3],
                         node.inputs[0].dtype)
        ctx.set_map(node.outputs[0], ChannelMap(2, smap.labels[2].reshape(-1), heads=True))

    def apply(self, node, ctx) -> None:
        found = _kept_heads(node, ctx, "num_heads")
        if found is None:
            return
        keep, columns, kept_heads, heads = found
        ctx.slice_input(node, 1, 1, columns)
        if has_input(node, 2):
            ctx.slice_input(node, 2, 0, columns)
        node.attrs["num_heads"] = len(kept_heads)
        if "qkv_hidden_sizes" in node.attrs:
            node.attrs["qkv_hidden_sizes"] = [len(keep)] * 3
        _slice_attention_bias(node, ctx, kept_heads, heads)


@register("MultiHeadAttention", domain="com.microsoft")
class MicrosoftMultiHeadAttentionHandler:
    """com.microsoft MultiHeadAttention on separate projected q, k, v (B, S, H)."""

    def propagate(self, node, ctx) -> None:
        where = f"fused attention {node.op} {node.name}"
        heads = int(node.attrs.get("num_heads", 0))
        qkv = [ctx.map(t) if has_input(node, i) else None for i, t in enumerate(node.inputs[:3])]
        shapes = [ctx.shape(t) if has_input(node, i) else None
                  for i, t in enumerate(node.inputs[:3])]
        reason = _check_extras(node, ctx, (6, 7))
        if reason is None and (heads < 1 or any(s is None or len(s) != 3 for s in shapes)):
            reason = f"{where}: q, k and v are not three (B, S, H) tensors"
        if reason is None and (any(m is None or m.axis != 2 for m in qkv) or
                               len({len(m.labels) for m in qkv}) != 1 or
                               len(qkv[0].labels) % heads):
            reason = f"{where}: q, k and v do not all carry our channels on their last axis"
        if reason is None and has_input(node, 3) and ctx.const(node.inputs[3]) is None:
            reason = f"{where}: the packed bias is not a stored constant"
        if reason is not None:
            for m in qkv:
                ctx.block(m, reason)
            return
        splits = [_heads(node, ctx, m.labels, 1, heads, where) for m in qkv]
        for other in splits[1:]:
            ctx.couple(splits[0].representative(1), other.representative(1), where)
        ctx.set_map(node.outputs[0], ChannelMap(2, qkv[2].labels, heads=True))

    def apply(self, node, ctx) -> None:
        found = _kept_heads(node, ctx, "num_heads")
        if found is None:
            return
        _, columns, kept_heads, heads = found
        if has_input(node, 3):
            ctx.slice_input(node, 3, 0, columns)
        node.attrs["num_heads"] = len(kept_heads)
        _slice_attention_bias(node, ctx, kept_heads, heads)


@register("GroupQueryAttention", domain="com.microsoft")
class MicrosoftGroupQueryAttentionHandler:
    """com.microsoft GroupQueryAttention on separate q (B, S, h * d), k and v (B, S, h_kv * d),
    or on q|k|v packed in ``query`` (B, S, (h + 2 h_kv) * d) with key and value empty:
    query head ``i`` reads KV head ``i // (h / h_kv)``, so a KV group (its K and V head and the
    query heads sharing them) is one atom; ``num_heads`` and ``kv_num_heads`` are rewritten.
    Its own rotary (``do_rotary``: cos/sin caches of head_dim / 2 columns) acts within a head.
    With a key/value cache (past inputs, or present outputs that are read) the KV heads stay and
    the query slots within the groups prune (``_query_slots``), unless the caches may shrink
    with their KV heads (``_changeable_caches``)."""

    def propagate(self, node, ctx) -> None:
        where = f"fused attention {node.op} {node.name}"
        heads, kv = int(node.attrs.get("num_heads", 0)), int(node.attrs.get("kv_num_heads", 0))
        packed = not has_input(node, 1) and not has_input(node, 2)
        qkv = [ctx.map(t) if has_input(node, i) else None for i, t in enumerate(node.inputs[:3])]
        shapes = [ctx.shape(t) if has_input(node, i) else None
                  for i, t in enumerate(node.inputs[:3])]
        reason = None
        if any(has_input(node, i) for i in range(9, len(node.inputs))):
            reason = f"{where} has position ids, an attention bias or head sinks"
        elif heads < 1 or kv < 1 or heads % kv or any(
                s is None or len(s) != 3 for s in (shapes[:1] if packed else shapes)):
            reason = f"{where}: q, k and v are not (B, S, H) tensors"
        elif packed and (qkv[0] is None or qkv[0].axis != 2 or
                         len(qkv[0].labels) % (heads + 2 * kv)):
            reason = f"{where}: the packed q|k|v does not carry our channels on its last axis"
        elif not packed and (
                any(m is None or m.axis != 2 for m in qkv) or len(qkv[0].labels) % heads or
                len(qkv[1].labels) != len(qkv[2].labels) or
                len(qkv[1].labels) * heads != len(qkv[0].labels) * kv):
            reason = f"{where}: q, k and v do not all carry our channels on their last axis"
        if reason is not None:
            for m in qkv:
                ctx.block(m, reason)
            return
        caches = _changeable_caches(node, ctx)
        if caches is None:
            out = _query_slots(ctx, qkv, packed, heads, kv, where)
            record_shape(ctx, node.outputs[0], [*node.inputs[0].shape[:2], len(out)],
                         node.inputs[0].dtype)
            ctx.set_map(node.outputs[0], ChannelMap(2, out, heads=True))
            return
        if packed:
            smap, v_labels = _packed_groups(ctx, qkv[0].labels, heads, kv, where)
            d = len(v_labels) // kv
            r_d = smap.labels.shape[1] - 2 * d  # a group's query columns
            k_cache, v_cache = (SplitMap(_CACHE_AXES, smap.labels[:, r_d + i * d:r_d + i * d + d],
                                         smap.record, smap.levels) for i in (0, 1))
        else:
            q, k, v = (_heads(node, ctx, m.labels, 1, n, where)
                       for m, n in zip(qkv, (heads, kv, kv)))
            _pair_groups(ctx, q.representative(1), k.representative(1), v.representative(1),
                         where)
            v_labels = qkv[2].labels
            k_cache, v_cache = (SplitMap(_CACHE_AXES, m.labels[0], m.record, m.levels[1:])
                                for m in (k, v))
        for tensor, cache in zip(caches, (k_cache, v_cache, k_cache, v_cache)):
            if tensor is not None:  # the past/present caches shrink with the KV groups
                ctx.set_map(tensor, cache)
                if not tensor.inputs:
                    continue
                ctx.changeable_outputs.add(tensor.name)
        out = np.repeat(v_labels.reshape(kv, -1), heads // kv, axis=0).reshape(-1)
        head_dim = len(v_labels) // kv
        record_shape(ctx, node.outputs[0], [*node.inputs[0].shape[:2], heads * head_dim],
                     node.inputs[0].dtype)
        ctx.set_map(node.outputs[0], ChannelMap(2, out, heads=True))

    def apply(self, node, ctx) -> None:
        keep = ctx.keep(node.outputs[0])
        if keep is None:
            return
        heads, kv = int(node.attrs["num_heads"]), int(node.attrs["kv_num_heads"])
        kept_heads = len(np.unique(keep // (len(ctx.map(node.outputs[0]).labels) // heads)))
        node.attrs["num_heads"] = kept_heads
        # with a cache the KV heads stay (query slots went), unless the caches shrink with them
        if not _has_cache(node, ctx) or any(ctx.split_map(t) is not None
                                            for t in _cache_tensors(node)):
            node.attrs["kv_num_heads"] = kept_heads // (heads // kv)


@register("RotaryEmbedding", domain="com.microsoft")
class MicrosoftRotaryEmbeddingHandler:
    """com.microsoft RotaryEmbedding on (B, S, h * d) with ``num_heads``: it rotates within each
    head, so the channels go by whole heads (head_dim whole) and ``num_heads`` is rewritten.
    The cos/sin caches are per position and rotary dimension, the same for every head."""

    def propagate(self, node, ctx) -> None:
        xmap, shape = ctx.map(node.inputs[0]), ctx.shape(node.inputs[0])
        if xmap is None:
            return
        heads = int(node.attrs.get("num_heads", 0))
        where = f"fused attention {node.op} {node.name}"
        if shape is None or len(shape) != 3 or xmap.axis != 2 or heads < 1 or \
                len(xmap.labels) % heads:
            ctx.block(xmap, f"{where}: not a (B, S, num_heads * head_dim) input of ours")
            return
        smap = new_split(ctx, where, xmap.labels.reshape(heads, -1), [1, 2])
        require_whole(ctx, smap, 1, f"{where} rotates within a head")
        require_free(ctx, smap, 0, f"{where} keeps heads whole", heads=True)
        pass_like_input(node, ctx, xmap)

    def apply(self, node, ctx) -> None:
        keep = ctx.keep(node.inputs[0])
        if keep is not None:
            heads = int(node.attrs["num_heads"])
            node.attrs["num_heads"] = len(keep) // (len(ctx.map(node.inputs[0]).labels) // heads)


def _packed_groups(ctx, labels: np.ndarray, heads: int, kv: int, where: str
                   ) -> tuple[SplitMap, np.ndarray]:
    """q|k|v packed on one axis, (h + 2 h_kv) * d: KV group ``g`` is query heads
    ``g * r .. g * r + r - 1`` (r = h / h_kv), K head ``g`` and V head ``g``. One split whose
    rows are the groups, (h_kv, (r + 2) * d), the group level free; returns it and V's
    labels."""
    d = len(labels) // (heads + 2 * kv)
    q, k, v = np.split(labels, [heads * d, (heads + kv) * d])
    grid = np.concatenate([q.reshape(kv, -1), k.reshape(kv, d), v.reshape(kv, d)], axis=1)
    smap = new_split(ctx, where, grid, [0, 1])
    require_whole(ctx, smap, 1, f"{where} keeps head_dim and a group's heads together")
    require_free(ctx, smap, 0, f"{where} pairs query heads with their KV head", heads=True)
    return smap, v


def _has_cache(node, ctx) -> bool:
    """GroupQueryAttention reads past keys/values, or writes present ones that are used."""
    outputs = {t.name for t in ctx.graph.outputs}
    return any(has_input(node, i) for i in (3, 4)) or any(
        out.outputs or out.name in outputs
        for out in node.outputs[1:] if out is not None and out.name)


def _cache_tensors(node) -> list:
    """past_key, past_value, present_key, present_value (None where absent)."""
    pasts, presents, _ = FUSED_CACHES[(node.op, node.domain)]
    return [node.inputs[i] if has_input(node, i) else None for i in pasts] + [
        node.outputs[i] if i < len(node.outputs) and node.outputs[i].name else None
        for i in presents]


def _changeable_caches(node, ctx) -> list | None:
    """The cache tensors (``_cache_tensors``), [] without a cache, or None when the KV heads
    must stay: ``--allow-interface-change`` lets the caches shrink with the KV groups only when
    every past is a graph input (``ctx.cache_inputs``) and every present used is a graph output,
    each read by no other op on its head or head_dim axis (``read_only_by``)."""
    if not _has_cache(node, ctx):
        return []
    outputs = {t.name for t in ctx.graph.outputs}
    tensors = _cache_tensors(node)
    if tensors[0] is None or tensors[1] is None:  # a present without a past: kept as it is
        return None
    for tensor in tensors:
        if tensor is None:
            continue
        graph_io = tensor.name in outputs if tensor.inputs else tensor.name in ctx.cache_inputs
        if not (graph_io or (tensor.inputs and not tensor.outputs)) or \
                not read_only_by(node, tensor, _CACHE_AXES) or ctx.shape(tensor) is None or \
                len(ctx.shape(tensor)) != 4:
            return None
    return tensors


def _query_slots(ctx, qkv, packed: bool, heads: int, kv: int, where: str) -> np.ndarray:
    """With a cache: K and V heads stay whole (blocked), query head ``g * r + s`` (r = h / h_kv)
    is one atom with query head ``s`` of every group, its head_dim whole (a split whose free
    level is the slot): one atom per slot ``s``, so
    that every group keeps the same slots and query head ``i`` still reads KV head ``i // r'``.
    Returns the output's labels (the query heads')."""
    why = f"{where} keeps its KV heads (its key/value cache is the model's interface)"
    if packed:
        d = len(qkv[0].labels) // (heads + 2 * kv)
        q, kv_labels = np.split(qkv[0].labels, [heads * d])
        ctx.cut(qkv[0].labels, heads * d)  # the whole K|V columns are a group of their own
        ctx.block(kv_labels, why)
    else:
        d, q = len(qkv[0].labels) // heads, qkv[0].labels
        ctx.block(qkv[1], why)
        ctx.block(qkv[2], why)
    slots = q.reshape(kv, heads // kv, d).transpose(1, 0, 2)  # (slot, group, head_dim)
    smap = new_split(ctx, where, slots, [0, 1, 2])
    require_whole(ctx, smap, 1, f"{where} keeps its KV groups")
    require_whole(ctx, smap, 2, f"{where} keeps head_dim")
    require_free(ctx, smap, 0, f"{where} takes the same query slots from every KV group",
                 heads=True)
    return q


def _pair_groups(ctx, q_heads, k_heads, v_heads, where: str) -> None:
    """Query head ``i`` reads KV head ``i // (h / h_kv)``: couple each KV head with its query
    heads (one atom per KV group; plain multi-head attention when ``h == h_kv``)."""
    n_rep = len(q_heads) // len(k_heads)
    ctx.couple(q_heads, np.repeat(k_heads, n_rep), where)
    ctx.couple(k_heads, v_heads, where)


def _kept_heads(node, ctx, attr: str):
    """(kept output positions, kept packed Q/K/V columns, kept heads, heads) or None."""
    keep = ctx.keep(node.outputs[0])
    if keep is None:
        return None
    hidden = len(ctx.map(node.outputs[0]).labels)
    heads = int(node.attrs[attr])
    columns = np.concatenate([p * hidden + keep for p in range(3)])
    return keep, columns, np.unique(keep // (hidden // heads)), heads


def _slice_attention_bias(node, ctx, kept_heads: np.ndarray, heads: int) -> None:
    index = _BIAS_INPUT[node.op]
    if not has_input(node, index):
        return
    value = ctx.const(node.inputs[index])
    if value.ndim == 4 and value.shape[1] == heads and heads > 1:
        ctx.slice_input(node, index, 1, kept_heads)


@register("Attention")
class OnnxAttentionHandler:
    """ONNX Attention (opset 23): q, k, v as (B, S, h * d) with ``q_num_heads``/``kv_num_heads``
    or as (B, h, S, d); whole heads paired across q, k and v; with grouped-query heads (k/v with
    fewer heads) a KV group is one atom."""

    accepts_split = True

    def propagate(self, node, ctx) -> None:
        where = f"fused attention {node.op} {node.name}"
        qkv = [ctx.map(t) or ctx.split_map(t) if has_input(node, i) else None
               for i, t in enumerate(node.inputs[:3])]
        shapes = [ctx.shape(t) if has_input(node, i) else None
                  for i, t in enumerate(node.inputs[:3])]
        reason = self._check(node, ctx, qkv, shapes, where)
        if reason is not None:
            for m in qkv:
                ctx.block(m, reason)
            for tensor in node.inputs[3:]:
                ctx.block_tensor(tensor, reason)
            return
        if len(shapes[0]) == 3:
            heads, kv = int(node.attrs["q_num_heads"]), int(node.attrs["kv_num_heads"])
            q, k, v = (_heads(node, ctx, m.labels, 1, n, where)
                       for m, n in zip(qkv, (heads, kv, kv)))
            _pair_groups(ctx, q.representative(1), k.representative(1), v.representative(1),
                         where)
            labels = np.repeat(qkv[2].labels.reshape(kv, -1), heads // kv, axis=0)
            ctx.set_map(node.outputs[0], ChannelMap(2, labels.reshape(-1), heads=True))
            return
        for m in qkv:  # (B, h, S, d): levels on axes 1 (heads) and 3 (head_dim)
            require_whole(ctx, m, 1, f"{where} keeps head_dim")
            require_free(ctx, m, 0, f"{where} pairs heads", heads=True)
        q, k, v = qkv
        _pair_groups(ctx, q.representative(0), k.representative(0), v.representative(0), where)
        n_rep = q.labels.shape[0] // v.labels.shape[0]
        ctx.set_map(node.outputs[0], replace(v, labels=np.repeat(v.labels, n_rep, axis=0)))

    @staticmethod
    def _check(node, ctx, qkv, shapes, where) -> str | None:
        if any(has_input(node, i) for i in (4, 5)):
            return f"{where} reads a key/value cache (heads are not rewritten there)"
        if any(out.outputs or out.name in {t.name for t in ctx.graph.outputs}
               for out in node.outputs[1:] if out is not None and out.name):
            return f"{where} writes a key/value cache or scores that are used"
        if any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1 or \
                len(shapes[0]) not in (3, 4):
            return f"{where}: q, k and v of unknown or different ranks"
        if len(shapes[0]) == 3:
            heads, kv = int(node.attrs.get("q_num_heads", 0)), int(node.attrs.get("kv_num_heads",
                                                                                  0))
            if heads < 1 or kv < 1 or heads % kv:
                return f"{where}: q_num_heads is not a multiple of kv_num_heads"
            if any(m is None or not isinstance(m, ChannelMap) or m.axis != 2 for m in qkv) or \
                    len(qkv[0].labels) % heads or len(qkv[1].labels) != len(qkv[2].labels) or \
                    len(qkv[1].labels) * heads != len(qkv[0].labels) * kv:
                return f"{where}: q, k and v do not all carry our channels on their last axis"
        elif any(m is None or isinstance(m, ChannelMap) or m.axes != (1, 3) for m in qkv) or \
                qkv[1].labels.shape != qkv[2].labels.shape or \
                qkv[0].labels.shape[1] != qkv[1].labels.shape[1] or \
                qkv[0].labels.shape[0] % qkv[1].labels.shape[0]:
            return f"{where}: q, k and v are not all split into (heads, head_dim) on axes 1, 3"
        if has_input(node, 3):
            mask, shape = ctx.const(node.inputs[3]), ctx.shape(node.inputs[3])
            if shape is None or (len(shape) == 4 and shape[1] != 1 and mask is None):
                return f"{where} has a computed per-head attention mask"
        return None

    def apply(self, node, ctx) -> None:
        if ctx.split_map(node.outputs[0]) is not None:
            found = ctx.split_keep(node.outputs[0])
            if found is None:
                return
            kept_heads, heads = found[1], ctx.split_map(node.outputs[0]).labels.shape[0]
        else:
            found = _kept_heads(node, ctx, "q_num_heads")
            if found is None:
                return
            _, _, kept_heads, heads = found
            n_rep = heads // int(node.attrs["kv_num_heads"])
            node.attrs["q_num_heads"] = len(kept_heads)
            node.attrs["kv_num_heads"] = len(kept_heads) // n_rep
        if has_input(node, 3):
            value = ctx.const(node.inputs[3])
            if value is not None and value.ndim == 4 and value.shape[1] == heads and heads > 1:
                ctx.slice_input(node, 3, 1, kept_heads)
