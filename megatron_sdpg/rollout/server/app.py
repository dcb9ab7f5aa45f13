"""HTTP routes of the CPU rollout server (SGLang's names, bodies and status codes).

Not for production (see the package docstring). aiohttp serves it: the client
already needs aiohttp, so one well-kept library covers both ends with no
pydantic/uvicorn stack. All model work (generation and weight updates) runs on
one worker thread in arrival order, so a weight update never interleaves with a
running batch (SGLang likewise lets the running batch finish first);
consecutive ``/generate`` calls waiting in the queue are merged into one batch.
"""

from __future__ import annotations

import asyncio
import collections
import json
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import web

from megatron_sdpg.rollout.server.generator import BatchGenerator, SampleResult
from megatron_sdpg.rollout.server.openai_chat import add_chat_routes
from megatron_sdpg.rollout.server.requests import BadRequest, SampleRequest, parse_generate
from megatron_sdpg.rollout.server.weights import ModelWeights
from megatron_sdpg.rollout.server.streamed_update import drain, query_options, receive_streamed_update
from megatron_sdpg.weights.tensor_codec import decode_safetensors


@dataclass
class _Job:
    fn: Callable[..., Any] | None = None  # a control job
    reqs: list[SampleRequest] = field(default_factory=list)  # a generate job
    epoch: int = 0
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class ModelWorker:
    """The one thread that touches the model.

    Args:
        generator: Runs batches.
        max_batch: Most samples merged into one batch.
    """

    def __init__(self, generator: BatchGenerator, max_batch: int = 256):
        self.generator = generator
        self.max_batch = max_batch
        self.abort_epoch = 0
        self.aborted_rids: set[str] = set()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="model-worker", daemon=True)
        self._thread.start()

    def submit_generate(self, reqs: list[SampleRequest]) -> concurrent.futures.Future:
        return self._push(_Job(reqs=reqs, epoch=self.abort_epoch))

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        return self._push(_Job(fn=fn))

    def abort(self, rid: str | None, abort_all: bool) -> None:
        if abort_all:
            self.abort_epoch += 1
        elif rid:
            self.aborted_rids.add(rid)

    def _push(self, job: _Job) -> concurrent.futures.Future:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                batch = [self._jobs.popleft()]
                if batch[0].fn is None:
                    size = len(batch[0].reqs)
                    while self._jobs and self._jobs[0].fn is None and size + len(self._jobs[0].reqs) <= self.max_batch:
                        size += len(self._jobs[0].reqs)
                        batch.append(self._jobs.popleft())
            if batch[0].fn is not None:
                self._run_control(batch[0])
            else:
                self._run_generate(batch)

    @staticmethod
    def _run_control(job: _Job) -> None:
        try:
            job.future.set_result(job.fn())
        except BaseException as e:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(e)

    def _run_generate(self, jobs: list[_Job]) -> None:
        reqs = [r for j in jobs for r in j.reqs]
        epoch_of = {id(r): j.epoch for j in jobs for r in j.reqs}
        by_rid = {r.rid: r for r in reqs}

        def aborted(rid: str) -> bool:
            return rid in self.aborted_rids or epoch_of[id(by_rid[rid])] != self.abort_epoch

        try:
            results = self.generator.generate(reqs, aborted)
        except BaseException as e:  # noqa: BLE001
            for j in jobs:
                j.future.set_exception(e)
            return
        self.aborted_rids.difference_update(by_rid)
        pos = 0
        for j in jobs:
            j.future.set_result(results[pos : pos + len(j.reqs)])
            pos += len(j.reqs)


class ServerState:
    """What the routes share: the worker, the weights, the tokenizer and the weight version."""

    def __init__(self, model, tokenizer, model_path: str, seed: int, max_batch: int):
        self.model = model
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.weight_version = "default"
        self.vocab_size = int(model.config.vocab_size)
        eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
        eos = eos if eos is not None else model.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        decode = None if tokenizer is None else (lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
        self.decode = decode
        self.weights = ModelWeights(model)
        self.worker = ModelWorker(BatchGenerator(model, eos_ids, decode, seed), max_batch=max_batch)

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
    if not isinstance(body, dict):
        raise BadRequest("body: must be a JSON object")
    return body


def build_app(state: ServerState, max_body_bytes: int) -> web.Application:
    """The aiohttp application with SGLang's routes."""
    routes = web.RouteTableDef()
    tokenize = None if state.tokenizer is None else (lambda s: state.tokenizer.encode(s, add_special_tokens=False))

    @routes.get("/health")
    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200)

    @routes.get("/health_generate")
    async def health_generate(_: web.Request) -> web.Response:
        probe = [SampleRequest(rid=f"HEALTH_CHECK_{time.monotonic_ns()}", input_ids=[0], max_new_tokens=1, top_k=1)]
        try:
            await asyncio.wait_for(asyncio.wrap_future(state.worker.submit_generate(probe)), timeout=20.0)
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
            "model_type": getattr(state.model.config, "model_type", None),
            "architectures": getattr(state.model.config, "architectures", None),
        })

    @routes.get("/server_info")
    @routes.get("/get_server_info")
    async def server_info(_: web.Request) -> web.Response:
        return web.json_response({"model_path": state.model_path, "weight_version": state.weight_version,
                                  "engine": "megatron_sdpg cpu server (not for production)"})

    @routes.route("*", "/generate")
    async def generate(request: web.Request) -> web.Response:
        try:
            reqs, single = parse_generate(await _json_body(request), state.vocab_size, tokenize)
        except BadRequest as e:
            return _error(str(e))
        results = await asyncio.wrap_future(state.worker.submit_generate(reqs))
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
            nbytes = state.weights.load_dir(body["model_path"])
            state.model_path = body["model_path"]
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
            return state.weights.load(decode_safetensors(payloads[0]), require_all=False)

        return await _update(request, load)

    @routes.post("/update_weights_from_distributed")
    async def update_from_distributed(request: web.Request) -> web.Response:
        def load(body: dict[str, Any]) -> int:
            if body.get("load_format") not in (None,):
                raise ValueError(f"load_format: {body.get('load_format')!r} not supported")
            return state.weights.receive(body["names"], body["dtypes"], body["shapes"],
                                         body.get("group_name", "weight_update_group"))

        return await _update(request, load)

    @routes.post("/init_weights_update_group")
    async def init_group(request: web.Request) -> web.Response:
        try:
            b = await _json_body(request)
            await state.run(lambda: state.weights.init_group(
                b["master_address"], int(b["master_port"]), int(b["rank_offset"]), int(b["world_size"]),
                b.get("group_name", "weight_update_group"), b.get("backend", "nccl")))
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
        return _outcome(True, f"Weight version updated to {version}", new_version=version)

    app = web.Application(client_max_size=max_body_bytes)
    app.add_routes(routes)
    add_chat_routes(app, state)
    return app
