"""Balancing variable-length sequences over data-parallel ranks and micro-batches.

Pure-Python reference implementation (a native extension may replace the hot
loop; the results must stay identical).
"""

from __future__ import annotations

import heapq
from typing import Sequence


def balance_partitions(lengths: Sequence[int], n_parts: int) -> list[list[int]]:
    """Splits sequence indices into ``n_parts`` groups of near-equal total length.

    Longest-processing-time greedy: sequences in decreasing length (ties by
    index) each go to the currently lightest part (ties by part index). Every
    index appears exactly once; each part's indices are returned sorted. When
    there are at least ``n_parts`` sequences, every part gets one or more.

    Args:
        lengths: Token count of each sequence.
        n_parts: Number of parts (e.g. data-parallel ranks).

    Returns:
        ``n_parts`` lists of sequence indices.
    """
    if n_parts < 1:
        raise ValueError(f"n_parts must be >= 1, got {n_parts}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    heap = [(0, 0, p) for p in range(n_parts)]  # (load, count, part)
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    for i in order:
        load, count, p = heapq.heappop(heap)
        parts[p].append(i)
        heapq.heappush(heap, (load + lengths[i], count + 1, p))
    return [sorted(p) for p in parts]


def split_microbatches(indices: Sequence[int], lengths: Sequence[int], max_sequences: int,
                       max_tokens: int = 0) -> list[list[int]]:
    """Cuts one rank's sequences into consecutive micro-batches.

    A micro-batch holds at most ``max_sequences`` sequences and, when
    ``max_tokens`` > 0, at most ``max_tokens`` tokens counted as
    ``n_sequences * longest`` (the padded size actually computed).

    Raises:
        ValueError: one sequence alone exceeds ``max_tokens``.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in indices:
        n = lengths[i]
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
