"""One-step-off-policy rollouts (``rollout.off_policy_steps=1``): the next batch is generated
while the trainer updates on this one.

Weight versions count optimizer steps: ``v_k`` are the policy's weights at the start of
step ``k`` (``v_0`` the initial ones); step ``k``'s update turns them into ``v_{k+1}``,
which the sync after step ``k`` pushes to the engines as weight version ``k+1``.

- ``off_policy_steps=0``: step ``k`` generates its batch ``B_k`` with ``v_k`` and then
  trains on it (staleness 0).
- ``off_policy_steps=1``: right after ``B_k`` is complete, rank 0 starts generating
  ``B_{k+1}`` on a background thread (the engines still hold ``v_k``), and the trainer
  runs step ``k``'s passes and update meanwhile. Before the sync of ``v_{k+1}`` the
  trainer waits for ``B_{k+1}`` to finish, so the engines never receive weights while
  a batch is in flight. Step ``k+1`` then trains ``v_{k+1}`` on ``B_{k+1}`` (generated with
  ``v_k``: staleness 1). ``B_0`` (and the first batch after a resume) has nothing to
  overlap with and is generated on-policy. Dynamic-sampling refill rounds are generated
  when the step needs them, with the weights the engines hold then (on-policy).
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class BackgroundCall:
    """``fn()`` on a daemon thread; :meth:`result` waits for it and returns or re-raises.

    A daemon thread never holds the process open: a run that fails elsewhere exits
    while its in-flight batch is still waiting on the engines (closing the client
    cancels those requests).
    """

    def __init__(self, fn: Callable[[], Any], name: str):
        self._fn = fn
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as err:  # re-raised in the caller's thread
            self._error = err
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout_s: float | None = None) -> Any:
        """The call's return value (its exception is raised here).

        Raises:
            TimeoutError: Not finished within ``timeout_s``.
        """
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"{self._thread.name} still running after {timeout_s}s")
        if self._error is not None:
            raise self._error
        return self._value


def weight_version_number(reported: list[str | None]) -> int | None:
    """The oldest weight version the engines reported for a batch's samples, as a step count.

    ``"default"`` (SGLang's and the CPU server's name for the weights they started with)
    is version 0. ``None`` when an engine reported none or a version that is not a number.
    """
    numbers = []
    for version in reported:
        if version is None:
            return None
        if version == "default":
            numbers.append(0)
            continue
        try:
            numbers.append(int(version))
        except ValueError:
            return None
    return min(numbers) if numbers else None
