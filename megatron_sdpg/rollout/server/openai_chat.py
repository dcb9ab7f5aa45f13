"""``/v1/chat/completions`` (OpenAI's chat API, as SGLang and vLLM serve it) for the CPU server.

The messages go through the tokenizer's own chat template (``chat_template_kwargs``,
e.g. ``{"enable_thinking": false}``, are passed to it, as SGLang does), the prompt
is generated from like any ``/generate`` request, on the same model worker. Supported
request fields: ``messages``, ``model`` (echoed), ``max_tokens`` /
``max_completion_tokens`` (default 128), ``temperature``, ``top_p``, ``n``, ``seed``
(choice i uses ``seed + i``), ``stop``, ``chat_template_kwargs``. Streaming, tools and
log-probs are refused with a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from aiohttp import web

from megatron_sdpg.rollout.server.requests import BadRequest, parse_generate
from megatron_sdpg.rollout.server.worker import EngineNotReady

_REFUSED = ("stream", "tools", "tool_choice", "logprobs", "top_logprobs", "response_format", "functions")


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error"}}, status=status)


def chat_prompt_ids(tokenizer, body: dict[str, Any]) -> list[int]:
    """Token ids of the chat-templated ``messages`` with the assistant header appended."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise BadRequest("messages: must be a non-empty list of {role, content} objects with string content")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest("chat_template_kwargs: must be an object")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - a template error is the caller's request
        raise BadRequest(f"messages: the chat template failed ({type(e).__name__}: {e})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _sampling_params(body: dict[str, Any]) -> list[dict[str, Any]]:
    """One SGLang ``sampling_params`` dict per choice."""
    for key in _REFUSED:
        if body.get(key):
            raise BadRequest(f"{key}: not supported by the CPU server")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BadRequest(f"n: must be an int >= 1, got {n!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed: must be an int, got {seed!r}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    base = {"max_new_tokens": 128 if max_tokens is None else max_tokens}
    for key in ("temperature", "top_p", "stop"):
        if body.get(key) is not None:
            base[key] = body[key]
    return [base | ({} if seed is None else {"sampling_seed": seed + i}) for i in range(n)]


def add_chat_routes(app: web.Application, state) -> None:
    """Registers ``POST /v1/chat/completions`` on the CPU server's app.

    Args:
        app: The server's aiohttp application (before it starts).
        state: Its ``ServerState`` (worker, tokenizer, model path).
    """

    async def chat_completions(request: web.Request) -> web.Response:
        if state.tokenizer is None:
            return _error("this server has no tokenizer (no chat template); use /generate with input_ids")
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise BadRequest("body: must be a JSON object")
            ids = chat_prompt_ids(state.tokenizer, body)
            params = _sampling_params(body)
            rid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
            reqs, _ = parse_generate({"input_ids": [ids] * len(params), "sampling_params": params,
                                      "rid": [f"{rid}-{i}" for i in range(len(params))]}, state.vocab_size,
                                     limits=state.limits)
            results = await asyncio.wrap_future(state.worker.submit_generate(reqs))
        except EngineNotReady as e:  # the queue is full now, or a weight update is incomplete
            return _error(str(e), status=503)
        except ValueError as e:  # BadRequest and JSON errors
            return _error(str(e) if isinstance(e, BadRequest) else f"body: not valid JSON ({e})")
        choices = []
        for i, (req, res) in enumerate(zip(reqs, results)):
            text = state.tokenizer.decode(res.output_ids, skip_special_tokens=True)
            finish = res.finish_reason or {}
            matched = finish.get("matched")
            if isinstance(matched, str) and matched in text:
                text = text[: text.index(matched)]
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": "length" if finish.get("type") == "length" else "stop"})
        completion = sum(len(r.output_ids) for r in results)
        return web.json_response({
            "id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or state.model_path, "choices": choices,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                      "total_tokens": len(ids) + completion},
        })

    app.router.add_post("/v1/chat/completions", chat_completions)
