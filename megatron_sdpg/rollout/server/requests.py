"""Parses SGLang ``/generate`` bodies into per-sample requests for the CPU server.

Follows sglang 0.5.23's ``GenerateReqInput`` normalisation: ``input_ids`` is one
prompt (list of ints) or a batch (list of lists); ``sampling_params`` and
``return_logprob``/``logprob_start_len`` are one value for all items or one per
item; ``rid`` is one string (a batch gets ``f"{rid}_{i}"``) or one per item;
``n > 1`` repeats every item n times (a single prompt then answers with a list).
``temperature == 0`` becomes greedy (``top_k = 1``, temperature 1) and
``top_k == -1`` the whole vocabulary, as in SGLang's ``SamplingParams``.
Anything the server cannot honour is rejected with a message naming the field,
before any request reaches the model: a bad request never fails the requests it
would have been batched with. ``Limits`` bounds the work one request may ask for.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any

# Sampling fields accepted with any value, and fields accepted only at SGLang's default.
_SUPPORTED = {
    "temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids", "n",
    "ignore_eos", "sampling_seed", "no_stop_trim", "skip_special_tokens",
    "spaces_between_special_tokens",
}
_DEFAULT_ONLY = {
    "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0,
    "min_new_tokens": 0, "json_schema": None, "regex": None, "ebnf": None, "structural_tag": None,
    "logit_bias": None, "stop_regex": None, "custom_params": None, "stream_interval": None,
}
_TOP_LEVEL = {
    "input_ids", "text", "sampling_params", "rid", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "stream", "log_metrics",
}


class BadRequest(ValueError):
    """A ``/generate`` body the server cannot serve; the message names the field."""


@dataclass(frozen=True)
class Limits:
    """Most work one ``/generate`` body may ask for (the server's ``--max-n`` and ``--max-new-tokens``).

    Attributes:
        max_n: Largest ``sampling_params.n``.
        max_new_tokens: Largest ``sampling_params.max_new_tokens``.
    """

    max_n: int = 1024
    max_new_tokens: int = 32768


# torch.Generator.manual_seed accepts exactly this range.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


@dataclass
class SampleRequest:
    """One sample to generate, after SGLang's normalisation.

    Attributes:
        rid: Request id echoed in ``meta_info.id``.
        input_ids: Prompt token ids ``[p]`` (p >= 1).
        temperature: Divides the logits (> 0; greedy requests have 1 and top_k 1).
        top_p: Nucleus mass in (0, 1].
        top_k: Keep the k most likely tokens; 0 means the whole vocabulary.
        max_new_tokens: Upper bound on output tokens (0: prefill only).
        stop_token_ids: Token ids that end the sample (kept in the output).
        stop: Strings that end the sample (needs a tokenizer).
        ignore_eos: Do not stop at the model's EOS ids (explicit stop ids still apply).
        seed: ``sampling_seed``; ``None`` draws one from the server's seeded generator.
        return_logprob: Report per-token log-probs.
        logprob_start_len: First prompt position with a reported log-prob; -1: none.
        no_stop_trim: Keep a matched stop string in ``text``.
    """

    rid: str
    input_ids: list[int]
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    stop_token_ids: set[int] = field(default_factory=set)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    no_stop_trim: bool = False


def _per_item(value: Any, num: int, name: str, default: Any) -> list[Any]:
    if value is None:
        return [default] * num
    if isinstance(value, list):
        if len(value) != num:
            raise BadRequest(f"{name}: has {len(value)} entries for a batch of {num}")
        return value
    return [value] * num


def _sampling(params: Any, idx: int, vocab_size: int, limits: Limits) -> dict[str, Any]:
    where = f"sampling_params[{idx}]"
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest(f"{where}: must be an object")
    for key, value in params.items():
        if key in _SUPPORTED:
            continue
        if key in _DEFAULT_ONLY:
            if value is not None and value != _DEFAULT_ONLY[key]:
                raise BadRequest(f"{where}.{key}: not supported by the CPU server (only {_DEFAULT_ONLY[key]!r})")
            continue
        raise BadRequest(f"{where}.{key}: unknown sampling parameter")

    def num(key: str, default: float, kind: type) -> Any:
        value = params.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadRequest(f"{where}.{key}: must be a {kind.__name__}, got {value!r}")
        if not math.isfinite(value):  # NaN and Infinity are valid JSON to Python's parser
            raise BadRequest(f"{where}.{key}: must be finite, got {value!r}")
        if kind is int and value != int(value):
            raise BadRequest(f"{where}.{key}: must be an int, got {value!r}")
        return kind(value)

    temperature = num("temperature", 1.0, float)
    top_p = num("top_p", 1.0, float)
    top_k = num("top_k", -1, int)
    max_new = num("max_new_tokens", 128, int)
    if temperature < 0:
        raise BadRequest(f"{where}.temperature: must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"{where}.top_p: must be in (0, 1], got {top_p}")
    if top_k == 0 or top_k < -1:
        raise BadRequest(f"{where}.top_k: must be -1 or >= 1, got {top_k}")
    if max_new < 0:
        raise BadRequest(f"{where}.max_new_tokens: must be >= 0, got {max_new}")
    if max_new > limits.max_new_tokens:
        raise BadRequest(f"{where}.max_new_tokens: {max_new} is above the server's limit "
                         f"--max-new-tokens {limits.max_new_tokens}")
    if temperature < 1e-6:  # SGLang: greedy is temperature 1 with top_k 1
        temperature, top_k = 1.0, 1
    stop = params.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"{where}.stop: must be a string or a list of non-empty strings")
    stop_ids = params.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in stop_ids):
        raise BadRequest(f"{where}.stop_token_ids: must be token ids in [0, {vocab_size})")
    seed = params.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not _SEED_MIN <= seed <= _SEED_MAX):
        raise BadRequest(f"{where}.sampling_seed: must be an int in [-2**63, 2**64), got {seed!r}")
    n = num("n", 1, int)
    if n < 1:
        raise BadRequest(f"{where}.n: must be >= 1, got {n}")
    if n > limits.max_n:
        raise BadRequest(f"{where}.n: {n} is above the server's limit --max-n {limits.max_n}")
    return dict(
        temperature=temperature,
        top_p=top_p,
        top_k=0 if top_k in (-1,) or top_k >= vocab_size else top_k,
        max_new_tokens=max_new,
        stop_token_ids={int(t) for t in stop_ids},
        stop=list(stop),
        ignore_eos=bool(params.get("ignore_eos") or False),
        seed=seed,
        no_stop_trim=bool(params.get("no_stop_trim") or False),
        n=n,
    )


def parse_generate(body: Any, vocab_size: int, tokenize=None, limits: Limits = Limits()) -> tuple[list[SampleRequest], bool]:
    """Turns a ``/generate`` body into sample requests.

    Args:
        body: The decoded JSON body.
        vocab_size: Token ids must lie in ``[0, vocab_size)``.
        tokenize: ``str -> list[int]`` for ``text`` prompts, or ``None`` without a tokenizer.
        limits: Bounds on ``n`` and ``max_new_tokens``.

    Returns:
        ``(requests, single)``: ``single`` means the response is one object, not a list.

    Raises:
        BadRequest: The body breaks the format or asks for something unsupported.
    """
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    unknown = sorted(set(body) - _TOP_LEVEL)
    if unknown:
        raise BadRequest(f"{unknown[0]}: not supported by the CPU server")
    if body.get("stream"):
        raise BadRequest("stream: streaming is not supported by the CPU server")
    if (body.get("top_logprobs_num") or 0) != 0:
        raise BadRequest("top_logprobs_num: not supported by the CPU server")
    prompts = body.get("input_ids")
    if prompts is None and body.get("text") is not None:
        if tokenize is None:
            raise BadRequest("text: the server has no tokenizer; send input_ids")
        text = body["text"]
        if not (isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise BadRequest("text: must be a string or a non-empty list of strings")
        prompts = tokenize(text) if isinstance(text, str) else [tokenize(t) for t in text]
    if not isinstance(prompts, list) or not prompts:
        raise BadRequest("input_ids: must be a non-empty list of token ids or of lists of token ids")
    single = not isinstance(prompts[0], list)
    batch = [prompts] if single else prompts
    for i, p in enumerate(batch):
        if not isinstance(p, list) or not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            raise BadRequest(f"input_ids[{i}]: must be a non-empty list of ints")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"input_ids[{i}]: token id {bad[0]} outside [0, {vocab_size})")
    num = len(batch)
    params = [_sampling(p, i, vocab_size, limits) for i, p in enumerate(_per_item(body.get("sampling_params"), num, "sampling_params", None))]
    n = params[0]["n"]
    if any(p["n"] != n for p in params):
        raise BadRequest("sampling_params.n: must be the same for all items")
    rid = body.get("rid")
    if isinstance(rid, str):
        rids = [rid] if single and n == 1 else [f"{rid}_{i}" for i in range(num)]
    else:
        rids = _per_item(rid, num, "rid", None)
        rids = [r if r is not None else uuid.uuid4().hex for r in rids]
    if not all(isinstance(r, str) for r in rids):
        raise BadRequest("rid: must be a string or a list of strings")
    want_lp = _per_item(body.get("return_logprob"), num, "return_logprob", False)
    start = _per_item(body.get("logprob_start_len"), num, "logprob_start_len", -1)
    for i, s in enumerate(start):
        if isinstance(s, bool) or not isinstance(s, int) or s < -1:
            raise BadRequest(f"logprob_start_len: must be an int >= -1, got {s!r}" + (f" for item {i}" if num > 1 else ""))
    out: list[SampleRequest] = []
    for i in range(num):
        p = dict(params[i])
        p.pop("n")
        for k in range(n):
            out.append(
                SampleRequest(
                    rid=rids[i] if n == 1 else f"{rids[i]}_{k}",
                    input_ids=list(batch[i]),
                    return_logprob=bool(want_lp[i]),
                    logprob_start_len=int(start[i]),
                    **p,
                )
            )
    if any(r.stop for r in out) and tokenize is None:
        raise BadRequest("sampling_params.stop: stop strings need a tokenizer; the server has none")
    return out, single and n == 1
