"""Balancing variable-length sequences over data-parallel ranks and micro-batches.

Two implementations give identical results: the C++ extension
``megatron_sdpg._packing_native`` (``csrc/packing.cpp``, built by ``setup.py``)
and the pure-Python ``*_py`` functions here. :func:`balance_partitions` and
:func:`split_microbatches` use the extension when it is importable and the
Python path otherwise, or when an input does not fit the extension's int64s.
"""

from __future__ import annotations

import heapq
from typing import Sequence

try:
    from megatron_sdpg import _packing_native as _native
except ImportError:  # not built (no compiler, or a source checkout without build_ext)
    _native = None

NATIVE_AVAILABLE = _native is not None


def _check_lengths(lengths: Sequence[int]) -> None:
    if len(lengths) and min(lengths) < 0:
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"lengths[{i}] is {lengths[i]}; token counts must be >= 0")


def balance_partitions_py(lengths: Sequence[int], n_parts: int) -> list[list[int]]:
    """Pure-Python :func:`balance_partitions` (the reference and the fallback)."""
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    _check_lengths(lengths)
    n = len(lengths)
    # Python's sort is stable, also with reverse=True: equal lengths keep increasing index.
    order = sorted(range(n), key=lengths.__getitem__, reverse=True)
    # Each heap entry packs the tuple (load, count, part) into one int ordered the same
    # way (count < 2**count_bits, part < 2**part_bits, load >= 0): ints compare faster.
    part_bits = (n_parts - 1).bit_length()
    load_shift = part_bits + n.bit_length()
    part_mask = (1 << part_bits) - 1
    one_more = 1 << part_bits
    heap = list(range(n_parts))  # loads and counts all zero: a valid min-heap
    owner = [0] * n
    replace = heapq.heapreplace
    try:
        for i in order:
            top = heap[0]
            owner[i] = top & part_mask
            replace(heap, top + (lengths[i] << load_shift) + one_more)
    except TypeError:
        raise TypeError(f"lengths[{i}] is {lengths[i]!r}; token counts must be integers") from None
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for i, p in enumerate(owner):  # increasing i: every part comes out sorted
        parts[p].append(i)
    return parts


def balance_partitions(lengths: Sequence[int], n_parts: int) -> list[list[int]]:
    """Splits sequence indices into ``n_parts`` groups of near-equal total length.

    Longest-processing-time greedy: sequences in decreasing length (ties by
    index) each go to the part with the smallest ``(load, count, part index)``:
    the lightest, ties to the one holding fewer sequences, then the lower
    index. Every index appears exactly once; each part's indices are returned
    sorted. When there are at least ``n_parts`` sequences, every part gets one
    or more. Runs in O(n log n + n log n_parts).

    Args:
        lengths: Non-negative integer token count of each sequence.
        n_parts: Number of parts (e.g. data-parallel ranks).

    Returns:
        ``n_parts`` lists of sequence indices.

    Raises:
        ValueError: ``n_parts`` < 1 or a negative length.
        TypeError: a length that is not an integer.
    """
    if _native is not None:
        try:
            return _native.balance_partitions(lengths, n_parts)
        except (TypeError, OverflowError):
            pass  # not int64-representable: the Python path handles any integers
    return balance_partitions_py(lengths, n_parts)


def split_microbatches_py(indices: Sequence[int], lengths: Sequence[int], max_sequences: int,
                          max_tokens: int = 0) -> list[list[int]]:
    """Pure-Python :func:`split_microbatches` (the reference and the fallback)."""
    if max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    n_lengths = len(lengths)
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in indices:
        if not 0 <= i < n_lengths:
            raise IndexError(f"index {i} is out of range for {n_lengths} lengths")
        n = lengths[i]
        if n < 0:
            raise ValueError(f"lengths[{i}] is {n}; token counts must be >= 0")
        if max_tokens and n > max_tokens:
            raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch budget of {max_tokens}")
        new_longest = max(longest, n)
        if current and (len(current) >= max_sequences or (max_tokens and new_longest * (len(current) + 1) > max_tokens)):
            batches.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def split_microbatches(indices: Sequence[int], lengths: Sequence[int], max_sequences: int,
                       max_tokens: int = 0) -> list[list[int]]:
    """Cuts one rank's sequences into consecutive micro-batches.

    A micro-batch holds at most ``max_sequences`` sequences and, when
    ``max_tokens`` > 0, at most ``max_tokens`` tokens counted as
    ``n_sequences * longest`` (the padded size actually computed). Only the
    entries of ``lengths`` named by ``indices`` are read.

    Args:
        indices: Sequence indices in micro-batch order (e.g. one part of
            :func:`balance_partitions`).
        lengths: Non-negative token count of every sequence.
        max_sequences: Most sequences per micro-batch (>= 1).
        max_tokens: Padded-token budget per micro-batch; 0 for none.

    Returns:
        Consecutive runs of ``indices`` (the same objects, in the same order).

    Raises:
        ValueError: a budget is out of range, a length is negative, or one
            sequence alone exceeds ``max_tokens``.
        IndexError: an index outside ``lengths``.
    """
    if _native is not None:
        if not isinstance(indices, (list, tuple, range)):
            indices = list(indices)  # an iterator is read once, whichever path then runs
        try:
            return _native.split_microbatches(indices, lengths, max_sequences, max_tokens)
        except (TypeError, OverflowError):
            pass  # not int64-representable: the Python path handles any integers
    return split_microbatches_py(indices, lengths, max_sequences, max_tokens)
