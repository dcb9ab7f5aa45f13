"""What every weight-sync strategy shares: bucketing, timing, version and probe checks.

A strategy takes an iterator of ``(hf_name, tensor)`` pairs (full, unsharded,
already renamed to HF names) and a weight version, delivers the tensors to every
engine, and returns metrics. Afterwards every engine must report the new version
in ``/model_info``; optionally the engines' log-probs of a fixed probe sequence
are compared with the trainer's (``ProbeCheck``).
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from megatron_sdpg.rollout.blocking_client import RolloutClient


class WeightSyncError(RuntimeError):
    """An engine refused the new weights or reports another version afterwards."""


class WeightSyncMismatchError(WeightSyncError):
    """After a sync, an engine's probe log-probs differ from the trainer's beyond the threshold."""


@dataclass
class ProbeCheck:
    """A fixed probe sequence and the trainer's log-probs of it.

    Attributes:
        token_ids: The probe, ``[p]``.
        logprobs: ``log_softmax`` of the trainer's raw logits (no temperature, fp32)
            at positions 0..p-2, gathered at tokens 1..p-1: ``[p-1]``.
        threshold: Largest allowed max |Δ log-prob| on any engine.
    """

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    threshold: float

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids) - 1:
            raise ValueError(f"probe: {len(self.logprobs)} logprobs for {len(self.token_ids)} tokens (need p-1)")


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups pairs into buckets of at most ``bucket_bytes`` (a larger tensor gets a bucket of its own)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = tensor_bytes(t)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (SGLang's dtype strings)."""
    return str(dtype).removeprefix("torch.")


class WeightSync(abc.ABC):
    """Base of the strategies.

    Args:
        client: Reaches every engine.
        probe: Optional post-sync log-prob check.
    """

    name = "base"

    def __init__(self, client: RolloutClient, probe: ProbeCheck | None = None):
        self.client = client
        self.probe = probe

    @abc.abstractmethod
    def _push(self, named: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        """Delivers the tensors and sets ``version`` on every engine; returns at least ``sync/bytes``."""

    def sync(self, named: Iterable[tuple[str, torch.Tensor]], version: str | int,
             probe: ProbeCheck | None = None) -> dict[str, float]:
        """Delivers new weights to every engine.

        Args:
            named: ``(hf_name, tensor)`` pairs, full and unsharded.
            version: The new weight version (reported by the engines afterwards).
            probe: Post-sync check for this sync (default: the one given at construction).

        Returns:
            Metrics: ``sync/time_s``, ``sync/bytes``, ``sync/gb_per_s`` and strategy details,
            plus ``sync/probe_max_abs_diff`` when a probe is set.

        Raises:
            WeightSyncError: An engine refused the weights or reports another version.
            WeightSyncMismatchError: The probe check failed.
        """
        version = str(version)
        start = time.perf_counter()
        metrics = self._push(named, version)
        elapsed = time.perf_counter() - start
        metrics.update({"sync/time_s": elapsed, "sync/gb_per_s": metrics["sync/bytes"] / elapsed / 1e9 if elapsed else 0.0})
        self.check_versions(version)
        probe = probe or self.probe
        if probe is not None:
            metrics["sync/probe_max_abs_diff"] = self.check_probe(probe)
        return metrics

    def post_all(self, path: str, body: dict, timeout_s: float | None = None) -> list:
        from megatron_sdpg.rollout.protocol import RequestRejectedError

        try:
            return self.client.post_all(path, body, timeout_s)
        except RequestRejectedError as e:
            raise WeightSyncError(f"{self.name} sync: an engine refused {path}: {e}") from None

    def check_versions(self, version: str) -> None:
        for url in self.client.urls:
            got = self.client.run(self.client.aclient.model_info(url)).get("weight_version")
            if str(got) != version:
                raise WeightSyncError(f"{url} reports weight_version {got!r} after syncing version {version!r}")

    def check_probe(self, probe: ProbeCheck) -> float:
        """Max |Δ log-prob| over engines and positions; raises above ``probe.threshold``.

        A NaN or infinite log-prob on either side (e.g. NaN weights) fails the
        check, and its difference is reported as nan/inf, never as 0.
        """
        want = torch.tensor(list(probe.logprobs), dtype=torch.float64)
        worst = 0.0
        for url in self.client.urls:
            got = torch.tensor(self.client.prompt_logprobs(url, probe.token_ids), dtype=torch.float64)
            diff = (got - want).abs()
            bad = ~torch.isfinite(diff)
            i = int(bad.nonzero()[0, 0]) if bool(bad.any()) else int(diff.argmax())
            value = float(diff[i])
            if bool(bad.any()) or value > probe.threshold:
                raise WeightSyncMismatchError(
                    f"post-sync check failed on {url}: max |engine - trainer| log-prob = {value:.3g} "
                    f"> {probe.threshold:g} at probe position {i + 1} (token {probe.token_ids[i + 1]}): "
                    f"engine {float(got[i]):.6f}, trainer {float(want[i]):.6f}; the engine's weights do not match"
                    + (" (non-finite log-probs: NaN/inf weights?)" if bool(bad.any()) else "")
                )
            worst = max(worst, value)
        return worst
