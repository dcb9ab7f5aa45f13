"""HTTP routes of the CPU rollout server (SGLang's names, bodies and status codes).

Not for production (see the package docstring). aiohttp serves it: the client
already needs aiohttp, so one well-kept library covers both ends with no
pydantic/uvicorn stack. All model work (generation and weight updates) runs on
one worker thread in arrival order (``worker.ModelWorker``), so a weight update
never interleaves with a running batch (SGLang likewise lets the running batch
finish first); consecutive ``/generate`` calls waiting in the queue are merged
into one batch. ``/health`` answers 503 while the worker is dead or the weights
are half-written (see ``weights``); a request the server cannot serve now
(queue full, weights half-written) gets 503, a bad one 400 naming the field.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Callable

from aiohttp import web

from megatron_sdpg.rollout.fingerprint import checkpoint_fingerprint
from megatron_sdpg.rollout.server.generator import BatchGenerator, SampleResult
from megatron_sdpg.rollout.server.memory import MemoryOccupation, resident_bytes
from megatron_sdpg.rollout.server.openai_chat import add_chat_routes
from megatron_sdpg.rollout.server.requests import BadRequest, Limits, SampleRequest, parse_generate
from megatron_sdpg.rollout.server.weights import ModelWeights
from megatron_sdpg.rollout.server.worker import EngineNotReady, ModelWorker
from megatron_sdpg.rollout.server.streamed_update import drain, query_options, receive_streamed_update
from megatron_sdpg.formats.tensor_codec import decode_safetensors


class ServerState:
    """What the routes share: the worker, the weights, the tokenizer and the weight version.

    Args:
        model: The served ``transformers`` model (loaded from ``model_path``).
        tokenizer: Its tokenizer, or ``None``.
        model_path: The checkpoint directory the model was loaded from.
        seed: Seeds the seeds of unseeded samples.
        max_batch: Most samples decoded together.
        limits: Bounds on ``n`` and ``max_new_tokens`` of one request.
        max_queued_tokens: Most prompt + max_new_tokens tokens queued at once.
        weight_group_timeout_s: Bound on joining (and each collective of) a weight-update group.
        batch_wait_s: How long a batch waits after the last ``/generate`` arrived for more (``ModelWorker.gather_s``).
    """

    def __init__(self, model, tokenizer, model_path: str, seed: int, max_batch: int, limits: Limits = Limits(),
                 max_queued_tokens: int = 1 << 22, weight_group_timeout_s: float = 120.0, batch_wait_s: float = 0.005):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.limits = limits
        self.weight_group_timeout_s = weight_group_timeout_s
        # Of the checkpoint the weights came from; None once other weights were pushed.
        try:
            self.weight_fingerprint: str | None = checkpoint_fingerprint(model_path)
        except FileNotFoundError:  # no safetensors files (transformers also loads .bin): nothing to compare
            self.weight_fingerprint = None
        self.weight_version = "default"
        self.vocab_size = int(model.config.vocab_size)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.decode = decode
        self.weights = ModelWeights(model)
        self.worker = ModelWorker(BatchGenerator(model, eos_ids, decode, seed), max_batch=max_batch,
                                  max_queued_tokens=max_queued_tokens, ready=self.weights.not_ready,
                                  gather_s=batch_wait_s)

    def not_healthy(self) -> str | None:
        """Why the server cannot serve, or ``None``."""
        if not self.worker.alive():
            return "the model worker thread has died"
        return self.weights.not_ready()

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.worker.submit(fn))


def _sample_json(state: ServerState, r: SampleRequest, res: SampleResult) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": r.rid,
        "finish_reason": res.finish_reason,
        "prompt_tokens": len(r.input_ids),
        "completion_tokens": len(res.output_ids),
        "cached_tokens": 0,
        "weight_version": state.weight_version,
    }
    if r.return_logprob:
        meta["input_token_logprobs"] = [
            [lp, tok, None] for lp, tok in zip(res.input_logprobs, r.input_ids[max(r.logprob_start_len, 0):])
        ]
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(res.output_logprobs, res.output_ids)]
    text = None
    if state.decode is not None:
        text = state.decode(res.output_ids)
        matched = (res.finish_reason or {}).get("matched")
        if isinstance(matched, str) and not r.no_stop_trim and matched in text:
            text = text[: text.index(matched)]
    return {"text": text, "output_ids": res.output_ids, "meta_info": meta}


def _error(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


def _outcome(ok: bool, message: str, **extra: Any) -> web.Response:
    return web.json_response({"success": ok, "message": message, **extra}, status=200 if ok else 400)


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())  # from bytes: no intermediate str of a large body
    except ValueError as e:
        raise BadRequest(f"body: not valid JSON ({e})") from None
    except RecursionError:
        raise BadRequest("body: JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


def build_app(state: ServerState, max_body_bytes: int, health_timeout_s: float = 20.0) -> web.Application:
    """The aiohttp application with SGLang's routes (``/health_generate`` waits ``health_timeout_s``)."""
    routes = web.RouteTableDef()
    tokenize = None if state.tokenizer is None else (lambda s: state.tokenizer.encode(s, add_special_tokens=False))

    @routes.get("/health")
    async def health(_: web.Request) -> web.Response:
        reason = state.not_healthy()
        return web.Response(status=200) if reason is None else web.Response(text=reason + "\n", status=503)

    @routes.get("/health_generate")
    async def health_generate(_: web.Request) -> web.Response:
        probe = [SampleRequest(rid=f"HEALTH_CHECK_{time.monotonic_ns()}", input_ids=[0], max_new_tokens=1, top_k=1)]
        try:  # (a timeout cancels the probe; the worker then skips it)
            await asyncio.wait_for(asyncio.wrap_future(state.worker.submit_generate(probe)), timeout=health_timeout_s)
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            return web.Response(status=503)
        return web.Response(status=200)

    @routes.route("*", "/flush_cache")
    async def flush_cache(_: web.Request) -> web.Response:
        # Each batch owns its KV cache and there is no prefix cache: nothing survives a batch.
        return web.Response(text="Cache flushed.\n", status=200)

    @routes.get("/model_info")
    @routes.get("/get_model_info")
    async def model_info(_: web.Request) -> web.Response:
        return web.json_response({
            "model_path": state.model_path,
            "tokenizer_path": state.model_path if state.tokenizer is not None else None,
            "is_generation": True,
            "weight_version": state.weight_version,
            "weight_fingerprint": state.weight_fingerprint,
            "model_type": getattr(state.model.config, "model_type", None),
            "architectures": getattr(state.model.config, "architectures", None),
        })

    @routes.get("/server_info")
    @routes.get("/get_server_info")
    async def server_info(_: web.Request) -> web.Response:
        return web.json_response({"model_path": state.model_path, "weight_version": state.weight_version,
                                  "pid": os.getpid(), "engine": "megatron_sdpg cpu server (not for production)"})

    @routes.route("*", "/generate")
    async def generate(request: web.Request) -> web.Response:
        try:
            reqs, single = parse_generate(await _json_body(request), state.vocab_size, tokenize, state.limits)
            results = await asyncio.wrap_future(state.worker.submit_generate(reqs))
        except BadRequest as e:
            return _error(str(e))
        except EngineNotReady as e:
            return _error(str(e), status=503)
        out = [_sample_json(state, r, res) for r, res in zip(reqs, results)]
        return web.json_response(out[0] if single else out)

    @routes.post("/abort_request")
    async def abort_request(request: web.Request) -> web.Response:
        try:
            body = await _json_body(request)
        except BadRequest as e:
            return _error(str(e))
        state.worker.abort(body.get("rid") or None, bool(body.get("abort_all", False)))
        return web.Response(status=200)

    async def _update(request: web.Request, load: Callable[[dict[str, Any]], int]) -> web.Response:
        try:
            if request.content_type == "application/octet-stream":
                await drain(request.content)
                raise BadRequest("body: application/octet-stream is accepted by /update_weights_from_tensor only")
            body = await _json_body(request)
            if body.get("abort_all_requests"):
                state.worker.abort(None, True)
            nbytes = await state.run(lambda: load(body))
        except (BadRequest, ValueError, FileNotFoundError, KeyError, TypeError) as e:
            return _outcome(False, f"Failed to update weights: {e}")
        if body.get("weight_version") is not None:
            state.weight_version = str(body["weight_version"])
        return _outcome(True, f"Succeeded to update model weights ({nbytes} bytes).", num_paused_requests=0)

    @routes.post("/update_weights_from_disk")
    async def update_from_disk(request: web.Request) -> web.Response:
        def load(body: dict[str, Any]) -> int:
            fmt = body.get("load_format")
            if fmt not in (None, "auto", "safetensors"):
                raise ValueError(f"load_format: {fmt!r} not supported (auto or safetensors)")
            fingerprint = checkpoint_fingerprint(body["model_path"])
            nbytes = state.weights.load_dir(body["model_path"])
            state.model_path, state.weight_fingerprint = body["model_path"], fingerprint
            return nbytes

        return await _update(request, load)

    async def update_from_streamed_tensor(request: web.Request) -> web.Response:
        """Our fast path: the safetensors bytes themselves as the body, options in the query."""
        options = query_options(request)
        try:
            if options.get("load_format") not in (None, "safetensors"):
                await drain(request.content)
                raise ValueError(f"load_format: {options.get('load_format')!r} not supported")
            if options.get("abort_all_requests"):
                state.worker.abort(None, True)
            state.weight_fingerprint = None
            nbytes = await receive_streamed_update(
                request, state.weights, lambda fn: asyncio.wrap_future(state.worker.submit(fn)), max_body_bytes)
        except (BadRequest, ValueError) as e:
            return _outcome(False, f"Failed to update weights: {e}")
        if options.get("weight_version") is not None:
            state.weight_version = str(options["weight_version"])
        return _outcome(True, f"Succeeded to update model weights ({nbytes} bytes).", num_paused_requests=0)

    @routes.post("/update_weights_from_tensor")
    async def update_from_tensor(request: web.Request) -> web.Response:
        if request.content_type == "application/octet-stream":
            return await update_from_streamed_tensor(request)

        def load(body: dict[str, Any]) -> int:
            if body.get("load_format") not in (None, "safetensors"):
                raise ValueError(f"load_format: {body.get('load_format')!r} not supported")
            payloads = body["serialized_named_tensors"]
            if not isinstance(payloads, list) or len(payloads) != 1:
                raise ValueError("serialized_named_tensors: one entry per TP rank; this server has one rank")
            state.weight_fingerprint = None
            return state.weights.load(decode_safetensors(payloads[0]), require_all=False)

        return await _update(request, load)

    @routes.post("/update_weights_from_distributed")
    async def update_from_distributed(request: web.Request) -> web.Response:
        def load(body: dict[str, Any]) -> int:
            if body.get("load_format") not in (None,):
                raise ValueError(f"load_format: {body.get('load_format')!r} not supported")
            state.weight_fingerprint = None
            return state.weights.receive(body["names"], body["dtypes"], body["shapes"],
                                         body.get("group_name", "weight_update_group"))

        return await _update(request, load)

    @routes.post("/init_weights_update_group")
    async def init_group(request: web.Request) -> web.Response:
        try:
            b = await _json_body(request)
            # Off the model worker (joining touches no weights), bounded: a trainer that never
            # comes must not hold up generation.
            await asyncio.to_thread(
                state.weights.init_group, b["master_address"], int(b["master_port"]), int(b["rank_offset"]),
                int(b["world_size"]), b.get("group_name", "weight_update_group"), b.get("backend", "nccl"),
                state.weight_group_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to the caller as SGLang does
            return _outcome(False, f"Failed to initialize custom process group: {e}.")
        return _outcome(True, "Succeeded to initialize custom process group.")

    @routes.post("/destroy_weights_update_group")
    async def destroy_group(request: web.Request) -> web.Response:
        try:
            b = await _json_body(request)
            await state.run(lambda: state.weights.destroy_group(b.get("group_name", "weight_update_group")))
        except Exception as e:  # noqa: BLE001
            return _outcome(False, f"Failed to destroy custom process group: {e}.")
        return _outcome(True, "Succeeded to destroy custom process group.")

    @routes.post("/update_weight_version")
    async def update_weight_version(request: web.Request) -> web.Response:
        try:
            b = await _json_body(request)
            version = str(b["new_version"])
        except (BadRequest, KeyError) as e:
            return _outcome(False, f"Failed to update weight version: {e}")
        if b.get("abort_all_requests", True):
            state.worker.abort(None, True)
        state.weight_version = version
        print(f"weight version: {version}", flush=True)  # the engine's log records every version it serves
        return _outcome(True, f"Weight version updated to {version}", new_version=version)

    app = web.Application(client_max_size=max_body_bytes)
    app.add_routes(routes)
    add_memory_routes(app, state)
    add_chat_routes(app, state)
    return app


# Routes that need the weights in memory: refused between release and resume.
_NEEDS_WEIGHTS = ("/generate", "/v1/chat/completions", "/health_generate", "/update_weights_from_disk", "/update_weights_from_tensor",
                  "/update_weights_from_distributed")


def add_memory_routes(app: web.Application, state: ServerState) -> None:
    """``/release_memory_occupation`` and ``/resume_memory_occupation`` (SGLang's ``tags`` body), and
    a middleware that refuses generation and weight updates while the weights are released and,
    as SGLang does, answers ``/flush_cache`` with 400 while ``/generate`` requests are in progress.

    Release waits for the batches queued before it (it runs on the model worker in
    arrival order); requests arriving after it are refused at once. The answers add
    ``freed_bytes``/``allocated_bytes`` and the server's ``resident_memory_bytes``
    to SGLang's (which has no body), for the trainer's metrics.
    """
    memory = MemoryOccupation(state.model)
    released = {"weights": False}  # set when a release is accepted, cleared when a resume has run

    running = {"generate": 0}  # /generate calls in progress (queued or decoding)

    @web.middleware
    async def refuse_while_released(request: web.Request, handler):
        if released["weights"] and request.path in _NEEDS_WEIGHTS:
            if request.content_length:
                await drain(request.content)
            message = f"{request.path}: the weights are released; POST /resume_memory_occupation first"
            return web.Response(status=503) if request.path == "/health_generate" else _error(message)
        if request.path == "/flush_cache" and running["generate"]:
            # As SGLang: no flush while requests run or wait; 400, and the caller asks again.
            return web.Response(text=f"Flush cache failed: {running['generate']} /generate requests in progress.\n",
                                status=400)
        if request.path != "/generate":
            return await handler(request)
        running["generate"] += 1
        try:
            return await handler(request)
        finally:
            running["generate"] -= 1

    async def tags(request: web.Request) -> set[str]:
        body = await _json_body(request) if request.content_length else {}
        return memory.tags_of(body.get("tags"))

    async def release(request: web.Request) -> web.Response:
        try:
            which = await tags(request)
        except (BadRequest, ValueError) as e:
            return _error(str(e))
        if "weights" in which:
            released["weights"] = True
        freed = await state.run(lambda: memory.release(which))
        return web.json_response({"success": True, "message": f"released {sorted(which)}", "freed_bytes": freed,
                                  "resident_memory_bytes": resident_bytes()})

    async def resume(request: web.Request) -> web.Response:
        try:
            which = await tags(request)
        except (BadRequest, ValueError) as e:
            return _error(str(e))
        allocated = await state.run(lambda: memory.resume(which))
        released["weights"] = memory.weights_released
        return web.json_response({"success": True, "message": f"resumed {sorted(which)}",
                                  "allocated_bytes": allocated, "resident_memory_bytes": resident_bytes()})

    app.middlewares.append(refuse_while_released)
    for method in ("GET", "POST"):
        app.router.add_route(method, "/release_memory_occupation", release)
        app.router.add_route(method, "/resume_memory_occupation", resume)
