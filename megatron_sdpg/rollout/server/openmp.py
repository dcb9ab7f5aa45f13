"""How the CPU server's idle OpenMP threads wait (``--omp-wait``); read by libgomp once, when torch loads it.

``spin`` spins ~0.1 ms (100,000 iterations) before sleeping: the decode step's many small
parallel regions then find their threads awake (0.19 vs 0.33 s for 128 rows on an idle
2-core machine). ``passive`` sleeps at once, for a server that shares its cores with other
busy processes (e.g. generation overlapping training). docs/rollout.md has the figures.
"""

from __future__ import annotations

import os
from typing import MutableMapping

# The OpenMP wait settings of each --omp-wait choice (set unless the environment sets them).
OMP_WAIT_ENV = {"spin": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"},
                "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def apply_omp_wait(choice: str, environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets ``choice``'s variables in ``environ`` where it does not set them already (before ``import torch``)."""
    for name, value in OMP_WAIT_ENV[choice].items():
        environ.setdefault(name, value)
