"""Batches of training problems from a seeded, resumable position.

The order is a function of ``(seed, epoch)`` only: epoch ``e`` visits the problems in
the permutation drawn from ``numpy.random.default_rng([seed, e])`` (or in file
order without shuffling). The position is ``(epoch, index)``; saving it with
``state_dict()`` and restoring it with ``load_state_dict()`` continues with exactly
the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_sdpg.data.problem import Problem


class PromptSource:
    """Yields batches of problems, epoch after epoch.

    Args:
        problems: The training problems (at least one).
        batch_size: Problems per batch; a batch may span an epoch boundary.
        seed: Seed of the per-epoch permutations.
        shuffle: Permute every epoch (else file order).
    """

    def __init__(self, problems: Sequence[Problem], batch_size: int, seed: int = 0, shuffle: bool = True):
        if not problems:
            raise ValueError("PromptSource needs at least one problem")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.problems)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def next_batch(self) -> list[Problem]:
        """The next ``batch_size`` problems; advances the position."""
        batch = []
        while len(batch) < self.batch_size:
            if self.index == len(self.problems):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.problems) - self.index)
            batch.extend(self.problems[i] for i in self._order[self.index : self.index + take])
            self.index += take
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The position (and what it is valid for), for checkpoints."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_problems": len(self.problems),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a position saved by ``state_dict``.

        Raises:
            ValueError: the state was saved for another seed, order or problem count.
        """
        for key in ("seed", "shuffle", "num_problems"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(f"prompt source state has {key}={state[key]!r}, this source has {mine!r}")
        if not 0 <= state["index"] <= len(self.problems):
            raise ValueError(f"prompt source state index {state['index']} out of range")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
