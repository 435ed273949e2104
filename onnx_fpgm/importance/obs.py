"""Structured Optimal Brain Surgeon: which input channels of the consumers cost least to remove.

A consumer computes ``Y = W X`` over design columns (a Conv's unfolded ``C*kh*kw`` patch
columns, a Gemm's or MatMul's input features, plus a column of ones for the bias). With the damped
input Hessian ``H = X^T X + lambda I`` and its inverse ``G = H^-1``, removing the columns ``Q``
and refitting the rest in closed form raises the squared reconstruction error by

    dE(Q) = sum_o  w_oQ (G_QQ)^-1 w_oQ^T

and moves the remaining weights by ``W -= W_Q (G_QQ)^-1 G_Q,:`` (ZipLM, OSSCAR). A channel of a
group owns a block of columns in every consumer that reads it, so its cost is the sum of these
terms over the consumers.

Selection is greedy (one channel at a time, after the update of the previous removals), not one
score per channel: two channels that carry the same signal each cost nothing alone, but removing
both costs the whole signal; the greedy pass removes one and then sees the other's true cost.
Only the rows and columns of the group's own columns are ever needed (``G`` restricted to them is
updated by the same formula), so a step costs ``O(|G|^2 q)`` for blocks of ``q`` columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ObsLayer:
    """One consumer's part in a group: what the greedy pass updates.

    Attributes:
        weight: (out, D) float64 weight rows over the group's columns in this consumer.
        hinv: (D, D) the inverse damped Hessian restricted to those columns.
        columns: per channel of the group, its columns (indices into D; empty when the
            channel does not reach this consumer).
        energy: squared norm of the consumer's outputs on the data (scales costs to a
            relative error).
    """

    weight: np.ndarray
    hinv: np.ndarray
    columns: list[np.ndarray]
    energy: float


@dataclass(frozen=True)
class ObsOrder:
    """The greedy removal order of a group's channels and what each step cost.

    Attributes:
        order: channel positions in the order they go (``n - 1`` of them: one always stays).
        costs: relative error added by each step (summed over consumers, divided by their
            output energy).
    """

    order: np.ndarray
    costs: np.ndarray

    def scores(self, n_channels: int) -> np.ndarray:
        """Per channel: the running maximum of the step costs up to its removal (so a smaller
        score goes first, in the greedy order); the channel that stays scores highest."""
        result = np.zeros(n_channels)
        running = np.maximum.accumulate(self.costs) if len(self.costs) else self.costs
        result[self.order] = running
        left = np.setdiff1d(np.arange(n_channels), self.order)
        top = float(running[-1]) if len(running) else 0.0
        result[left] = 2 * top + 1.0
        return result


def inverse_hessian(gram: np.ndarray, damping: float) -> np.ndarray:
    """``(X^T X + damping * mean(diag) * I)^-1``; a column that never fires keeps the damping."""
    diag = np.diag(gram)
    lam = damping * float(np.mean(diag)) if np.any(diag > 0) else 1.0
    h = gram + max(lam, 1e-12) * np.eye(len(gram))
    try:
        inv = np.linalg.inv(h)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(h)
    return (inv + inv.T) / 2


def greedy_obs_order(layers: list[ObsLayer], n_channels: int, n_remove: int) -> ObsOrder:
    """Remove ``n_remove`` channels one at a time, each the cheapest after the previous
    removals' closed-form update (ties go to the lower position)."""
    weights = [layer.weight.astype(np.float64, copy=True) for layer in layers]
    hinvs = [layer.hinv.astype(np.float64, copy=True) for layer in layers]
    energy = sum(layer.energy for layer in layers)
    scale = 1.0 / energy if energy > 0 else 1.0
    alive = np.ones(n_channels, dtype=bool)
    order, costs = [], []
    for _ in range(min(n_remove, n_channels - 1)):
        cost = np.zeros(n_channels)
        for layer, w, g in zip(layers, weights, hinvs):
            cost += _channel_costs(layer.columns, w, g, alive)
        cost[~alive] = np.inf
        pick = int(np.argmin(cost))
        for layer, w, g in zip(layers, weights, hinvs):
            _remove(layer.columns[pick], w, g)
        alive[pick] = False
        order.append(pick)
        costs.append(max(float(cost[pick]), 0.0) * scale)
    return ObsOrder(np.asarray(order, dtype=np.int64), np.asarray(costs))


def obs_update(weight: np.ndarray, hinv: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """``weight`` (out, D) after removing columns ``removed``, the rest refitted in closed form
    (the removed columns come back zero)."""
    w = weight.astype(np.float64, copy=True)
    if len(removed):  # the inverse Hessian is only read: no copy, no update
        block = hinv[np.ix_(removed, removed)]
        wq = w[:, removed].T  # (q, out)
        try:  # a solve, not an inverse: a third of the work (the hot path of sensitivity)
            coef = np.linalg.solve(block, wq)
        except np.linalg.LinAlgError:
            coef = np.linalg.pinv(block) @ wq
        w -= coef.T @ hinv[removed, :]
        w[:, removed] = 0.0
    return w


def _channel_costs(columns: list[np.ndarray], w: np.ndarray, g: np.ndarray,
                   alive: np.ndarray) -> np.ndarray:
    """dE of removing each alive channel alone (batched over channels with equal block size)."""
    cost = np.zeros(len(columns))
    by_size: dict[int, list[int]] = {}
    for c in np.flatnonzero(alive):
        if len(columns[c]):
            by_size.setdefault(len(columns[c]), []).append(int(c))
    for chans in by_size.values():
        idx = np.stack([columns[c] for c in chans])  # (m, q)
        blocks = g[idx[:, :, None], idx[:, None, :]]  # (m, q, q)
        wq = np.transpose(w[:, idx], (1, 2, 0))  # (m, q, out)
        try:
            sol = np.linalg.solve(blocks, wq)
        except np.linalg.LinAlgError:
            sol = np.linalg.pinv(blocks) @ wq
        cost[chans] = np.einsum("mqo,mqo->m", wq, sol)
    return cost


def _remove(q: np.ndarray, w: np.ndarray, g: np.ndarray) -> None:
    """Apply the OBS update for removing columns ``q`` to ``w`` and ``g`` in place."""
    if not len(q):
        return
    inv, rows = _update_weight(q, w, g)
    g -= rows.T @ (inv @ rows)
    g[q, :] = 0.0
    g[:, q] = 0.0


def _update_weight(q: np.ndarray, w: np.ndarray, g: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The OBS update of ``w`` alone for removing columns ``q`` (``g`` read, not written);
    returns ``(H^-1_QQ)^-1`` and ``H^-1_{Q,:}`` for the caller that updates ``g`` too."""
    block = g[np.ix_(q, q)]
    try:
        inv = np.linalg.inv(block)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(block)
    rows = g[q, :]  # (q, D), a copy
    w -= (w[:, q] @ inv) @ rows
    w[:, q] = 0.0
    return inv, rows
