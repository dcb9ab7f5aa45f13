"""SGLang's ``/generate`` wire format, as the rollout client writes and reads it.

Field names follow sglang 0.5.23 (``GenerateReqInput`` in
``sglang/srt/managers/io_struct.py``, ``SamplingParams`` in
``sglang/srt/sampling/sampling_params.py``, the response dicts built by
``TokenizerManager``):

Request (batch form, one item per sample)::

    {"input_ids": [[...], ...], "sampling_params": [{...}, ...],
     "rid": ["<batch>-g0-s0", ...], "return_logprob": true, "logprob_start_len": -1}

Response: a list with one object per item, in order::

    {"text": "...", "output_ids": [...],
     "meta_info": {"id": rid, "finish_reason": {"type": "stop", "matched": 2} |
                   {"type": "length", "length": 16} | {"type": "abort", "message": "..."},
                   "prompt_tokens": 7, "completion_tokens": 16, "weight_version": "3",
                   "output_token_logprobs": [[logprob, token_id, text|null], ...],
                   "input_token_logprobs": [[null, id0, null], [lp, id1, null], ...]}}

We always send a group as n single-sample items (never ``n > 1``): SGLang
derives a seeded sample's noise from ``(sampling_seed, position)``, so n samples
sharing one seed would be identical; one item per sample also gives every sample
its own request id, which is how the client proves none was lost or duplicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from megatron_sdpg.rollout.config import SamplingConfig


@dataclass(frozen=True)
class BinaryBody:
    """A request body sent as is with its own content type (e.g. a safetensors blob)."""

    data: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class StreamedBody:
    """A request body of known length sent piece by piece, never joined into one buffer.

    Attributes:
        size: Total bytes (the Content-Length).
        pieces: Returns the body's parts in order; called once per send, so a retry or
            each of several engines gets the whole body.
        content_type: The Content-Type header.
    """

    size: int
    pieces: Callable[[], Iterable[bytes | memoryview]]
    content_type: str = "application/octet-stream"


class RolloutError(RuntimeError):
    """Base class of every rollout client error."""


class EngineUnavailableError(RolloutError):
    """The engine refused the connection, dropped it, or answered 5xx."""


class EngineTimeoutError(RolloutError):
    """The engine did not answer within the request timeout."""


class MalformedResponseError(RolloutError):
    """The engine answered 200 with a body that breaks SGLang's response format."""


class RequestRejectedError(RolloutError):
    """The engine answered 4xx: the request itself is wrong; retrying will not help."""


class EngineRestartedError(RolloutError):
    """A dead engine was restarted and serves its initial weights, not the synced ones: the
    caller must sync the current weights again and redo the whole batch (not retried here)."""


@dataclass
class Sample:
    """One generated completion.

    Attributes:
        rid: Request id, unique within the batch (``<batch>-g<group>-s<sample>``).
        group: Index of the prompt in the batch.
        index: Index of the sample within its group.
        prompt_ids: Prompt token ids, ``[p]``.
        output_ids: Generated token ids, ``[c]`` (a matched stop token included, as SGLang does).
        logprobs: Log-prob of each output token, ``[c]`` (log-softmax of the
            temperature-scaled logits, fp32), empty when not requested.
        finish_reason: ``stop`` (stop token, EOS or stop string), ``length`` or ``abort``.
        matched: The stop token id or string that ended the sample, if any.
        weight_version: The engine's weight version when the sample finished.
        text: Decoded completion, or ``None`` when the engine has no tokenizer.
        engine: URL of the engine that produced it.
    """

    rid: str
    group: int
    index: int
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    matched: int | str | None = None
    weight_version: str | None = None
    text: str | None = None
    engine: str = ""


def sample_rid(batch_id: str, group: int, index: int) -> str:
    """The request id of sample ``index`` of group ``group`` in batch ``batch_id``."""
    return f"{batch_id}-g{group}-s{index}"


def sampling_params_json(cfg: SamplingConfig, sampling_seed: int | None = None, **overrides: Any) -> dict[str, Any]:
    """SGLang ``sampling_params`` for one sample.

    Args:
        cfg: The configured sampling parameters.
        sampling_seed: Per-sample seed (SGLang's ``sampling_seed``), or ``None``.
        **overrides: Extra or replaced SGLang sampling fields (e.g. ``max_new_tokens=0``).
    """
    params: dict[str, Any] = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "ignore_eos": cfg.ignore_eos,
        "n": 1,
    }
    if cfg.stop:
        params["stop"] = list(cfg.stop)
    if cfg.stop_token_ids:
        params["stop_token_ids"] = list(cfg.stop_token_ids)
    if sampling_seed is not None:
        params["sampling_seed"] = int(sampling_seed)
    params.update(overrides)
    return params


def group_request_json(
    prompt_ids: Sequence[int],
    rids: Sequence[str],
    params: Sequence[dict[str, Any]],
    return_logprob: bool,
    logprob_start_len: int = -1,
) -> dict[str, Any]:
    """The ``/generate`` body for one group: one batch item per sample."""
    if len(rids) != len(params):
        raise ValueError(f"{len(rids)} rids for {len(params)} sampling_params")
    prompt = [int(t) for t in prompt_ids]
    return {
        "input_ids": [prompt for _ in rids],
        "sampling_params": list(params),
        "rid": list(rids),
        "return_logprob": bool(return_logprob),
        "logprob_start_len": int(logprob_start_len),
    }


def _fail(url: str, rid: str, what: str) -> MalformedResponseError:
    return MalformedResponseError(f"malformed /generate response from {url} for rid {rid}: {what}")


def _parse_logprob_triples(triples: Any, url: str, rid: str, key: str, expect_ids: Sequence[int]) -> list[float | None]:
    if not isinstance(triples, list) or len(triples) != len(expect_ids):
        n = len(triples) if isinstance(triples, list) else type(triples).__name__
        raise _fail(url, rid, f"meta_info.{key} has {n} entries, expected {len(expect_ids)}")
    out: list[float | None] = []
    for i, (entry, tok) in enumerate(zip(triples, expect_ids)):
        if not isinstance(entry, list) or len(entry) < 2:
            raise _fail(url, rid, f"meta_info.{key}[{i}] is not a [logprob, token_id, text] triple")
        lp, tid = entry[0], entry[1]
        if tid != tok:
            raise _fail(url, rid, f"meta_info.{key}[{i}] is for token {tid}, expected {tok}")
        if lp is None:
            out.append(None)
            continue
        if not isinstance(lp, (int, float)) or math.isnan(lp) or lp > 1e-4:
            raise _fail(url, rid, f"meta_info.{key}[{i}] logprob {lp!r} is not a number <= 0")
        out.append(float(lp))
    return out


def parse_sample(
    obj: Any, url: str, rid: str, group: int, index: int, prompt_ids: Sequence[int], want_logprobs: bool
) -> Sample:
    """Checks one response object against SGLang's format and returns it as a ``Sample``.

    Raises:
        MalformedResponseError: A field is missing, of the wrong type, or inconsistent
            (another rid, logprobs for other tokens, unknown finish reason).
    """
    if not isinstance(obj, dict):
        raise _fail(url, rid, f"item is {type(obj).__name__}, expected an object")
    output_ids = obj.get("output_ids")
    if not isinstance(output_ids, list) or not all(isinstance(t, int) for t in output_ids):
        raise _fail(url, rid, "output_ids missing or not a list of ints")
    meta = obj.get("meta_info")
    if not isinstance(meta, dict):
        raise _fail(url, rid, "meta_info missing")
    if meta.get("id") != rid:
        raise _fail(url, rid, f"meta_info.id is {meta.get('id')!r}")
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or reason.get("type") not in ("stop", "length", "abort"):
        raise _fail(url, rid, f"meta_info.finish_reason {reason!r} is not {{type: stop|length|abort}}")
    logprobs: list[float] = []
    if want_logprobs and reason["type"] != "abort":
        parsed = _parse_logprob_triples(
            meta.get("output_token_logprobs"), url, rid, "output_token_logprobs", output_ids
        )
        if any(lp is None for lp in parsed):
            raise _fail(url, rid, "meta_info.output_token_logprobs has a null logprob")
        logprobs = [float(lp) for lp in parsed]  # type: ignore[arg-type]
    text = obj.get("text")
    version = meta.get("weight_version")
    return Sample(
        rid=rid,
        group=group,
        index=index,
        prompt_ids=list(prompt_ids),
        output_ids=list(output_ids),
        logprobs=logprobs,
        finish_reason=reason["type"],
        matched=reason.get("matched"),
        weight_version=None if version is None else str(version),
        text=text if isinstance(text, str) else None,
        engine=url,
    )


def parse_prompt_logprobs(obj: Any, url: str, rid: str, prompt_ids: Sequence[int]) -> list[float]:
    """Log-probs of prompt tokens 1..p-1 from a ``logprob_start_len=0`` response, ``[p-1]``.

    SGLang reports ``[null, id0, text]`` for the first prompt token (nothing
    predicts it); it is dropped here. Prompt log-probs are SGLang's
    ``input_token_logprobs``: log-softmax of the raw logits (no temperature).
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("meta_info"), dict):
        raise _fail(url, rid, "meta_info missing")
    parsed = _parse_logprob_triples(
        obj["meta_info"].get("input_token_logprobs"), url, rid, "input_token_logprobs", prompt_ids
    )
    if parsed[0] is not None or any(lp is None for lp in parsed[1:]):
        raise _fail(url, rid, "meta_info.input_token_logprobs must be null exactly at position 0")
    return [float(lp) for lp in parsed[1:]]  # type: ignore[arg-type]
