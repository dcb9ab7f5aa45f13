"""Our rollout side against SGLang's own code (the versions ``requirements/contract.txt`` pins).

* Requests: the real client and weight-sync strategies run their flows against the CPU
  server through a recording proxy; every body is checked against SGLang's request
  class for that route (unknown keys -- which SGLang silently drops --, missing required
  fields, types checked strictly), every ``sampling_params`` against SGLang's
  ``SamplingParams`` (constructed and ``verify``-ed), every route and method against
  ``http_server.py``.
* Responses: the CPU server's ``/generate`` answers against the keys SGLang's
  ``TokenizerManager`` builds, its finish reasons against SGLang's ``FINISH_*`` classes,
  its log-prob entries against ``detokenize_logprob_tokens``; our parser reads answers
  built from those SGLang pieces.
* Command lines: the engine and router argv our launcher and ``examples/lib/launch.sh``
  build, parsed by SGLang's ``ServerArgs.add_cli_args`` and sglang-router's
  ``RouterArgs.add_cli_args`` parsers (an unknown flag exits 2).

A field or flag renamed in a new SGLang release fails here.
"""

from __future__ import annotations

import argparse
import json
import time

import msgspec
import pytest
import torch

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import RolloutConfig, SamplingConfig
from megatron_sdpg.rollout.launcher import engine_flag_problems, engine_options, router_command, sglang_command
from megatron_sdpg.rollout.protocol import parse_prompt_logprobs, parse_sample, sampling_params_json
from megatron_sdpg.rollout.server import memory
from megatron_sdpg.testing.distributed import free_port, run_single
from megatron_sdpg.testing.rollout import random_like_state, start_cpu_server
from megatron_sdpg.testing.tiny_hf import build_tiny_llama, load_hf_model
from megatron_sdpg.rollout.sync import DiskSync, NcclBroadcastSync, TensorPushSync
from megatron_sdpg.formats.tensor_codec import encode_sglang
from tests.contract import sglang_source as sgl
from tests.contract.recording_proxy import RecordingProxy
from tests.unit.test_launch_scripts import SCRIPTS, dry_run, parse

IO = "srt/managers/io_struct.py"
TM = "srt/managers/tokenizer_manager.py"

# Route -> SGLang's request class (http_server.py binds each route's body to one of them).
REQUEST_CLASSES = {
    "/generate": "GenerateReqInput",
    "/update_weights_from_disk": "UpdateWeightFromDiskReqInput",
    "/update_weights_from_tensor": "UpdateWeightsFromTensorReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/release_memory_occupation": "ReleaseMemoryOccupationReqInput",
    "/resume_memory_occupation": "ResumeMemoryOccupationReqInput",
    "/abort_request": "AbortReq",
}
NO_BODY = {"/health", "/health_generate", "/flush_cache", "/model_info"}


@pytest.fixture(scope="module", autouse=True)
def pinned_sglang():
    problems = sgl.version_problems()
    if problems:
        pytest.fail("; ".join(problems))


def _sampling_params(body: dict) -> list[dict]:
    """``sampling_params`` of a ``/generate`` body: one dict, or one per batch item."""
    params = body["sampling_params"]
    return params if isinstance(params, list) else [params]


def _distributed_rank(rank, world_size, url, state, port):
    client = RolloutClient([url], max_retries=0, request_timeout_s=120.0)
    sync = NcclBroadcastSync(client, "127.0.0.1", port, backend="gloo", bucket_bytes=30_000, timeout_s=60.0)
    try:
        sync.sync(iter(state.items()), version="dist")
    finally:
        sync.close()
        client.close()


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    hf_dir = build_tiny_llama(str(root / "tiny"))
    server = start_cpu_server(hf_dir, str(root / "logs"))
    try:
        yield server, hf_dir, root
    finally:
        server.stop()


@pytest.fixture(scope="module")
def recorded(engine):
    """Every request of our real flows (generation, probes, the three syncs, release/resume, abort)."""
    server, hf_dir, root = engine
    proxy = RecordingProxy(server.url)
    client = RolloutClient([proxy.url], max_retries=0, request_timeout_s=120.0)
    state = random_like_state(load_hf_model(hf_dir), seed=3)
    try:
        client.wait_healthy(timeout_s=30)
        sampling = SamplingConfig(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=6, stop=["t9"],
                                  stop_token_ids=[7], seed=11)
        client.generate([[2, 5, 6], [2, 9]], n=2, sampling=sampling)
        client.generate([[2, 5]], n=1, sampling=SamplingConfig(temperature=0.0, max_new_tokens=3))
        client.prompt_logprobs(proxy.url, [2, 5, 6, 7])
        client.run(client.aclient.healthy(proxy.url, generate=True))
        DiskSync(client, str(root / "sync"), config_dir=hf_dir).sync(iter(state.items()), version="disk")
        TensorPushSync(client, bucket_bytes=50_000).sync(iter(state.items()), version="tensor")
        run_single(_distributed_rank, proxy.url, state, free_port(), timeout=120)
        client.run(client.aclient.release_memory_occupation())
        client.run(client.aclient.resume_memory_occupation(["weights"]))
        client.run(client.aclient.resume_memory_occupation())
        TensorPushSync(client).sync(iter(state.items()), version="resumed")
        client.submit(client.aclient.generate([[2, 5]], SamplingConfig(max_new_tokens=400, ignore_eos=True)))
        for _ in range(500):  # until that request is in flight, so that closing the client aborts it
            if any(r.path == "/generate" and _sampling_params(r.body)[0]["max_new_tokens"] == 400
                   for r in proxy.requests):
                break
            time.sleep(0.01)
    finally:
        client.close()  # cancels the long generate: /abort_request {"abort_all": true}
        proxy.close()
    return proxy.requests


def test_every_route_and_method_exists_in_sglang(recorded):
    routes = sgl.http_routes()
    seen = {(r.method, r.path) for r in recorded}
    for method, path in sorted(seen):
        assert path in routes, f"SGLang {sgl.pinned_versions()['sglang']} has no route {path}"
        assert method in routes[path], f"SGLang serves {path} with {sorted(routes[path])}, we send {method}"
    # The flows really ran: every route we know a body for was called (and nothing else was).
    assert {p for _, p in seen} == set(REQUEST_CLASSES) | NO_BODY


def test_every_json_body_matches_sglangs_request_class(recorded):
    checked = 0
    for r in recorded:
        if r.path in NO_BODY:
            assert r.body is None, (r.path, r.body)
            continue
        if r.path == "/update_weights_from_tensor" and r.content_type == "application/octet-stream":
            continue  # the streamed tensor body, checked below
        fields = sgl.class_fields(IO, REQUEST_CLASSES[r.path])
        assert isinstance(r.body, dict), (r.path, r.body)
        assert sgl.body_problems(r.body, fields, r.path) == []
        checked += 1
    assert checked >= 12


def test_streamed_tensor_options_are_sglang_fields(recorded):
    """Our one deviation (the safetensors bytes as the body) keeps SGLang's option names in the query."""
    fields = sgl.class_fields(IO, "UpdateWeightsFromTensorReqInput")
    streamed = [r for r in recorded if r.path == "/update_weights_from_tensor"
                and r.content_type == "application/octet-stream"]
    assert streamed
    for r in streamed:
        options = {k: json.loads(v) for k, v in r.query.items()}
        assert sgl.body_problems(options, {k: f for k, f in fields.items() if k != "serialized_named_tensors"},
                                 "query") == []


def test_sglang_encoded_tensor_body_matches_sglangs_request_class():
    """The JSON body TensorPushSync sends to real SGLang engines (one payload per TP rank)."""
    bucket = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.zeros(3, 4))]
    body = json.loads(TensorPushSync(None, encoding="sglang", tp_size=2).request_body(encode_sglang(bucket)))
    fields = sgl.class_fields(IO, "UpdateWeightsFromTensorReqInput")
    assert sgl.body_problems(body, fields, "/update_weights_from_tensor") == []
    assert len(body["serialized_named_tensors"]) == 2


def test_sampling_params_pass_sglangs_strict_sampling_params(recorded):
    sp_mod = sgl.import_light("sglang.srt.sampling.sampling_params")
    types = {f.name: f.type for f in msgspec.structs.fields(sp_mod.SamplingParams)}
    sent = [p for r in recorded if r.path == "/generate" for p in _sampling_params(r.body)]
    sent.append(sampling_params_json(SamplingConfig(seed=1), 5, max_new_tokens=0))
    assert len(sent) >= 7
    for params in sent:
        for key, value in params.items():
            assert key in types, f"SamplingParams has no field {key!r}"
            msgspec.convert(value, types[key])  # strict: raises on a wrong type
        sp = sp_mod.SamplingParams(**params)  # unknown keys raise TypeError
        sp.verify(vocab_size=128)
    assert any("sampling_seed" in p and "stop" in p and "stop_token_ids" in p for p in sent)


def test_memory_tags_are_sglangs():
    constants = sgl.parse("srt/constants.py")
    values = {n.value.value for n in constants.body
              if hasattr(n, "targets") and n.targets[0].id.startswith("GPU_MEMORY_TYPE_")}
    assert set(memory.TAGS) == values


# ---------------------------------------------------------------- responses


def _raw_generate(client, url, body):
    return client.run(client.aclient.call(url, "POST", "/generate", body))


def test_cpu_server_answers_have_sglangs_keys_and_shapes(engine):
    server, _, _ = engine
    client = RolloutClient([server.url], max_retries=0)
    try:
        stop_tok = 9
        out = _raw_generate(client, server.url, {
            "input_ids": [[2, 5, 6], [2, 7]], "rid": ["a", "b"], "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": [{"max_new_tokens": 5, "temperature": 0.0, "ignore_eos": True},
                                {"max_new_tokens": 5, "temperature": 1.0, "stop_token_ids": [stop_tok],
                                 "sampling_seed": 4, "ignore_eos": True}]})
    finally:
        client.close()
    top_keys = sgl.dict_keys_assigned(TM, "out_dict")
    meta_keys = sgl.dict_keys_assigned(TM, "meta_info")
    detok = sgl.method_as_function(TM, "TokenizerManager", "detokenize_logprob_tokens")
    reasons = sgl.compile_classes("srt/managers/schedule_batch.py",
                                  ["BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_LENGTH", "FINISH_ABORT"])
    for item in out:
        assert set(item) <= top_keys, set(item) - top_keys
        meta = item["meta_info"]
        assert set(meta) <= meta_keys, set(meta) - meta_keys
        for key in ("output_token_logprobs", "input_token_logprobs"):
            values, ids = [e[0] for e in meta[key]], [e[1] for e in meta[key]]
            assert json.loads(json.dumps(detok(None, values, ids, False))) == meta[key]
        reason = meta["finish_reason"]
        if reason["type"] == "length":
            assert reason == reasons["FINISH_LENGTH"](5).to_json()
        else:
            assert reason == reasons["FINISH_MATCHED_TOKEN"](stop_tok).to_json()
    abort_keys = set(reasons["FINISH_ABORT"]("Aborted by /abort_request").to_json())
    assert {"type", "message"} <= abort_keys  # what the CPU server sends on an abort


def test_our_parser_reads_answers_built_from_sglangs_pieces():
    detok = sgl.method_as_function(TM, "TokenizerManager", "detokenize_logprob_tokens")
    reasons = sgl.compile_classes("srt/managers/schedule_batch.py", [
        "BaseFinishReason", "FINISH_MATCHED_TOKEN", "FINISH_MATCHED_STR", "FINISH_LENGTH", "FINISH_ABORT"])
    prompt, output, lps = [2, 5, 6], [8, 9, 10], [-0.5, -1.25, -0.125]
    cases = [(reasons["FINISH_LENGTH"](3), "length", None), (reasons["FINISH_MATCHED_TOKEN"](10), "stop", 10),
             (reasons["FINISH_MATCHED_STR"]("t10"), "stop", "t10"), (reasons["FINISH_ABORT"](), "abort", None)]
    for reason, kind, matched in cases:
        meta = {"id": "r-g0-s0", "finish_reason": reason.to_json(), "prompt_tokens": 3, "completion_tokens": 3,
                "cached_tokens": 0, "weight_version": "7",
                "output_token_logprobs": detok(None, lps, output, False),
                "input_token_logprobs": detok(None, [None, -1.0, -2.0], prompt, False)}
        answer = json.loads(json.dumps({"text": None, "output_ids": output, "meta_info": meta}))
        sample = parse_sample(answer, "u", "r-g0-s0", 0, 0, prompt, want_logprobs=True)
        assert (sample.finish_reason, sample.matched, sample.weight_version) == (kind, matched, "7")
        if kind != "abort":
            assert sample.logprobs == lps
        assert parse_prompt_logprobs(answer, "u", "r-g0-s0", prompt) == [-1.0, -2.0]


def test_sglang_answers_busy_flushes_with_400():
    """The client's retry relies on it: a flush refused while requests run is a 400, not a 5xx."""
    fn = next(n for n in sgl.parse("srt/entrypoints/http_server.py").body
              if getattr(n, "name", None) == "flush_cache")
    assert "HTTPStatus.BAD_REQUEST" in sgl.ast.unparse(fn)


# ---------------------------------------------------------------- command lines


def _server_parser() -> argparse.ArgumentParser:
    server_args = sgl.import_light("sglang.srt.server_args")
    parser = argparse.ArgumentParser(exit_on_error=False)
    server_args.ServerArgs.add_cli_args(parser)
    return parser


def _router_parser() -> argparse.ArgumentParser:
    router_args = sgl.import_light("sglang_router.router_args")
    parser = argparse.ArgumentParser(exit_on_error=False)
    router_args.RouterArgs.add_cli_args(parser)
    return parser


def _after_module(argv: list[str], module: str) -> list[str]:
    return argv[argv.index(module) + 1:]


def test_launcher_engine_command_parses_with_sglangs_server_args():
    cfg = RolloutConfig(engine="sglang", model_path="/models/x", tp_size=2, colocate=True, deterministic=True,
                        sglang_args={"mem_fraction_static": 0.35, "context_length": 8192})
    argv = sglang_command(cfg.model_path, "0.0.0.0", 30001, cfg.tp_size, engine_options(cfg), base_gpu_id=2)
    ns = _server_parser().parse_args(_after_module(argv, "sglang.launch_server"))
    assert (ns.model_path, ns.host, ns.port, ns.tp_size, ns.base_gpu_id) == ("/models/x", "0.0.0.0", 30001, 2, 2)
    assert ns.enable_memory_saver and ns.enable_deterministic_inference
    assert (ns.mem_fraction_static, ns.context_length) == (0.35, 8192)
    plain = RolloutConfig(engine="sglang", model_path="/m")
    ns = _server_parser().parse_args(_after_module(
        sglang_command("/m", "127.0.0.1", 1, 1, engine_options(plain)), "sglang.launch_server"))
    assert not ns.enable_memory_saver and not ns.enable_deterministic_inference


def test_engine_flags_are_read_back_from_sglangs_server_info():
    """The trainer checks engines given by URL through /server_info, which SGLang fills from
    ``ServerArgs.resolved_dict()`` (``build_server_info``)."""
    server_args = sgl.import_light("sglang.srt.server_args")
    build = next(n for n in sgl.parse("srt/utils/common.py").body if getattr(n, "name", None) == "build_server_info")
    assert "server_args.resolved_dict()" in sgl.ast.unparse(build)
    cfg = RolloutConfig(engine="sglang", model_path="/m", colocate=True, deterministic=True)
    for flags, missing in [(["--enable-deterministic-inference", "--enable-memory-saver"], []),
                           (["--enable-memory-saver"], ["deterministic"]), ([], ["deterministic", "colocate"])]:
        ns = _server_parser().parse_args(["--model-path", "/m", *flags])
        info = server_args.ServerArgs.from_cli_args(ns).resolved_dict()
        assert [field for field, _ in engine_flag_problems(info, cfg)] == missing


def test_an_unknown_engine_flag_is_refused_by_sglangs_parser():
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        _server_parser().parse_args(["--model-path", "/m", "--enable-memory-savers"])


@pytest.mark.parametrize("env", [{}, {"COLOCATE": "0", "ROLLOUT_NODES": "1", "DETERMINISTIC": "1"}],
                         ids=["colocated", "dedicated_deterministic"])
def test_launch_script_commands_parse_with_sglangs_parsers(tmp_path, env):
    r = dry_run(SCRIPTS[0], tmp_path, **env)
    assert r.returncode == 0, r.stderr
    tags = parse(r.stdout)
    engines = [c for h in tags if h != "batch" for c in tags[h] if "sglang.launch_server" in c]
    routers = [c for h in tags if h != "batch" for c in tags[h] if "sglang_router.launch_router" in c]
    # No router: the trainer addresses every engine itself (the distributed sync joins each one's ranks).
    assert engines and routers == []
    for argv in engines:
        ns = _server_parser().parse_args(_after_module(argv, "sglang.launch_server"))
        assert ns.enable_memory_saver == (env.get("COLOCATE", "1") == "1")
        assert ns.enable_deterministic_inference == (env.get("DETERMINISTIC") == "1")
        assert ns.port >= 30000 and ns.mem_fraction_static > 0


def test_router_command_parses_with_sglang_routers_args():
    argv = router_command(["http://a:1", "http://b:2"], "0.0.0.0", 30100, {"policy": "cache_aware"})
    ns = _router_parser().parse_args(_after_module(argv, "sglang_router.launch_router"))
    router_args = sgl.import_light("sglang_router.router_args")
    args = router_args.RouterArgs.from_cli_args(ns)
    assert (args.worker_urls, args.host, args.port, args.policy) == (["http://a:1", "http://b:2"], "0.0.0.0",
                                                                    30100, "cache_aware")
