"""A Reshape's sizes as integers: symbols as stand-in primes, ``-1`` and unnamed dims inferred.

Block matching through a Reshape multiplies sizes; a symbol (``batch``) becomes its own large
prime so that products of symbols are equal exactly when they are equal symbolically. Exporters
also write products (dynamo's ``seq*batch`` for a ``view(-1, d)``) and fresh unknowns (onnx's
``unk__N`` where its inference lost a size): the first are products of primes, one of the second
takes what the target leaves.
"""
from __future__ import annotations

import math


def named_dims(numbers: list[int], in_dims: list, elements: list) -> list:
    """Output sizes with the stand-in primes turned back into their symbols (else None)."""
    symbols = [*in_dims, *(e.symbol for e in elements if e.symbol is not None)]
    (numbered,), _ = resolve_symbols(symbols)
    by_number = {n: s for n, s in zip(numbered, symbols) if isinstance(s, str)}
    return [by_number.get(n, n if n < 2**31 else None) for n in numbers]


def resolve_symbols(*dim_lists: list[int | str]) -> tuple[list[list[int]], list[set[int]]]:
    """Dims as integers, every symbol replaced by its own large prime (shared by all lists).

    Products of such dims are equal exactly when they are equal symbolically (no static dim
    holds a prime factor above 2**31), so block matching and ``-1`` inference work unchanged.
    Returns the integer lists and, per list, the positions that were symbols.
    A product of symbols as dynamo names it (``seq*batch``) is the product of theirs.
    """
    primes: dict[str, int] = {}
    numbers, symbolic = [], []
    for dims in dim_lists:
        numbers.append([]), symbolic.append(set())
        for i, dim in enumerate(dims):
            if isinstance(dim, str):
                number = 1
                for factor in _factors(dim):
                    if isinstance(factor, int):
                        number *= factor
                        continue
                    if factor not in primes:
                        primes[factor] = _prime(len(primes))
                    number *= primes[factor]
                numbers[-1].append(number)
                symbolic[-1].add(i)
            else:
                numbers[-1].append(int(dim))
    return numbers, symbolic


def _unnamed(dim) -> bool:
    """A dim nobody named: a per-tensor ``?`` token or one of onnx's ``unk__N`` stand-ins."""
    return isinstance(dim, str) and dim.startswith(("?", "unk__"))


def _infer_unnamed_input(in_dims: list, in_numbers: list[int], out: list,
                         out_numbers: list[int]) -> None:
    """One input dim nobody named takes the size the (fully known) target leaves, in place.

    onnx's inference names a size it could not follow afresh (``unk__N``): Hugging Face's
    Conv1D (``x.view(-1, d)``, Gemm, ``view(b, s, n)``) reads a Gemm output ``[unk, n]``
    reshaped to ``[b, s, n]``; in a valid model the unknown dim is ``b * s``.
    """
    unnamed = [i for i, d in enumerate(in_dims) if _unnamed(d) and d not in out]
    if len(unnamed) != 1 or -1 in out_numbers:
        return
    others = math.prod(d for i, d in enumerate(in_numbers) if i != unnamed[0])
    total = math.prod(out_numbers)
    if others and total % others == 0:
        in_numbers[unnamed[0]] = total // others


def _factors(dim: str) -> list[int | str]:
    """The factors of a dim_param written as a product (``seq*batch``, ``2*s``), else itself."""
    parts = [part.strip() for part in dim.split("*")]
    if len(parts) < 2 or not all(p.isidentifier() or p.isdigit() for p in parts):
        return [dim]
    return [int(p) if p.isdigit() else p for p in parts]


_PRIMES: list[int] = []


def _prime(k: int) -> int:
    """The ``k``-th prime above 2**31."""
    while len(_PRIMES) <= k:
        candidate = (_PRIMES[-1] if _PRIMES else 2**31) + 1
        while not _is_prime(candidate):
            candidate += 1
        _PRIMES.append(candidate)
    return _PRIMES[k]


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin (exact for n < 3.3e24)."""
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41):
        if n % a == 0:
            return n == a
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def resolve_reshape_target(in_dims: list, elements: list, allowzero: bool):
    """A Reshape target against its input: (input sizes, output sizes, symbolic input
    positions) as integers, ``-1`` inferred.

    Symbols become stand-in primes (``resolve_symbols``); None when an element is computed by
    arithmetic or the sizes do not add up.
    """
    out: list = []
    for i, element in enumerate(elements):
        if element.value == 0 and not allowzero:
            if i >= len(in_dims):
                return None
            out.append(in_dims[i])
        elif element.value is not None:
            if element.value < -1:
                return None
            out.append(element.value)
        elif element.symbol is not None:
            out.append(element.symbol)
        elif element.labels is not None and element.factor > 1:
            out.append(len(element.labels) * element.factor)
        else:
            out.append(-1)  # computed by arithmetic: in a valid model, what the others leave
    (in_numbers, out_numbers), (in_symbolic, _) = resolve_symbols(in_dims, out)
    if out_numbers.count(-1) > 1:
        return None
    _infer_unnamed_input(in_dims, in_numbers, out, out_numbers)
    if -1 in out_numbers:
        known = math.prod(d for d in out_numbers if d != -1)
        if known == 0 or math.prod(in_numbers) % known:
            return None
        out_numbers[out_numbers.index(-1)] = math.prod(in_numbers) // known
    return in_numbers, out_numbers, in_symbolic
