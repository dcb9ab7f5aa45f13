"""A ``transformers`` KV cache whose full-attention layers write into buffers reserved up front.

``DynamicCache`` concatenates every layer's keys and values at every decode step
(a copy of the whole history per token); here each full-attention layer
(``DynamicLayer``) gets a ``[b, heads, capacity, head_dim]`` buffer sized for the
prompt plus the longest completion, writes the new step in place and hands the
attention a view of the filled part. Other layer kinds (sliding windows, linear
attention) keep ``transformers``' own classes. Rows are dropped with
``Cache.batch_select_indices`` (finished samples).
"""

from __future__ import annotations

import torch


def new_cache(config, capacity: int):
    """A ``DynamicCache`` for ``config`` whose full-attention layers reserve ``capacity`` positions.

    Falls back to a plain ``DynamicCache`` on ``transformers`` versions without per-layer caches.
    """
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=config)
    except TypeError:
        return DynamicCache()
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return cache
    if isinstance(getattr(cache, "layers", None), list):
        cache.layers = [ReservedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` backed by buffers of ``capacity`` positions (grown by doubling if exceeded)."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self.filled = 0
            self._k: torch.Tensor | None = None
            self._v: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            """Writes ``[b, h, n, d]`` new states after the filled part; returns views of all filled states."""
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                b, h, _, d = key_states.shape
                self._k = key_states.new_empty((b, h, self.capacity, d))
                self._v = value_states.new_empty((b, value_states.shape[1], self.capacity, value_states.shape[-1]))
            n = key_states.shape[-2]
            if self.filled + n > self._k.shape[-2]:
                more = max(self.filled + n, 2 * self._k.shape[-2]) - self._k.shape[-2]
                self._k = torch.cat([self._k, self._k.new_empty((*self._k.shape[:2], more, self._k.shape[-1]))], -2)
                self._v = torch.cat([self._v, self._v.new_empty((*self._v.shape[:2], more, self._v.shape[-1]))], -2)
            self._k[:, :, self.filled : self.filled + n] = key_states
            self._v[:, :, self.filled : self.filled + n] = value_states
            self.filled += n
            self.keys, self.values = self._k[:, :, : self.filled], self._v[:, :, : self.filled]
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.filled:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, : self.filled], self._v[:, :, : self.filled]

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self.is_initialized and self.keys is not None:
                self.filled = self.keys.shape[-2]

        def reset(self) -> None:
            super().reset()
            self.filled, self._k, self._v = 0, None, None

    return _ReservedLayer


def ReservedLayer(capacity: int):  # noqa: N802 - a class built on first use (transformers imported lazily)
    """A full-attention cache layer reserving ``capacity`` positions."""
    global _RESERVED
    if _RESERVED is None:
        _RESERVED = _reserved_layer_class()
    return _RESERVED(capacity)


_RESERVED = None
