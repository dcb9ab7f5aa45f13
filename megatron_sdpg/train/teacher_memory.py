"""Counts the bytes of teacher data alive on this rank, and their peak over a step.

The teacher passes hand their tensors to :meth:`TeacherMemory.track`: the
``[T, V/tp]`` logits (or ``[T, h]`` hidden states) kept for the loss on the last
pipeline stage, and on the other stages the teacher part of the activations
sent and received through the pipeline. A tracked tensor counts until its
*storage* is freed (views, ``detach()`` copies and autograd's saved tensors keep
it alive, and are not counted twice), so the peak is what the schedule really
holds, not what the code meant to hold. Cheap: one finaliser per tensor.
"""

from __future__ import annotations

import weakref

import torch


class TeacherMemory:
    """Live and peak bytes of the teacher tensors handed to :meth:`track`.

    Attributes:
        live: Bytes tracked and not yet freed.
        peak: The largest ``live`` since construction or :meth:`reset_peak`.
    """

    def __init__(self):
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, int] = {}  # storage data_ptr -> bytes counted for it

    def track(self, tensor: torch.Tensor, nbytes: int | None = None) -> None:
        """Counts ``nbytes`` (default: the whole tensor) until ``tensor``'s storage is freed.

        Args:
            tensor: Any tensor holding teacher data (possibly with other data, e.g.
                the student half of a concatenated pipeline activation).
            nbytes: The teacher's share of it; at most once per storage.
        """
        storage = tensor.untyped_storage()
        key = storage.data_ptr()  # unique among live storages
        if key in self._tracked or storage.nbytes() == 0:
            return
        counted = tensor.numel() * tensor.element_size() if nbytes is None else int(nbytes)
        self._tracked[key] = counted
        self.live += counted
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key) -> None:
        self.live -= self._tracked.pop(key, 0)

    def reset_peak(self) -> None:
        """Starts a new peak from what is alive now."""
        self.peak = self.live
