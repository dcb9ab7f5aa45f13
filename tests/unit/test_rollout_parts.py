"""Unit tests of the rollout pieces that need no server: config, request parsing, sampling
filter, tensor codecs, bucketing, atomic checkpoint writing, launcher commands."""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct

import pytest
import torch

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.rollout.config import RolloutConfig, SamplingConfig
from megatron_sdpg.rollout.launcher import cpu_server_command, sglang_command
from megatron_sdpg.rollout.protocol import group_request_json, sampling_params_json
from megatron_sdpg.rollout.server.requests import BadRequest, parse_generate
from megatron_sdpg.rollout.sync.base import iter_buckets
from megatron_sdpg.rollout.sync.disk import write_hf_checkpoint
from megatron_sdpg.formats.tensor_codec import (
    decode_safetensors,
    decode_safetensors_blob,
    encode_safetensors,
    encode_sglang,
    safetensors_blob,
)


@pytest.mark.parametrize("change, field", [
    ({"engine": "vllm"}, "rollout.engine"),
    ({"urls": ["localhost:1"]}, r"rollout.urls\[0\]"),
    ({"n_samples": 0}, "rollout.n_samples"),
    ({"sync_strategy": "carrier-pigeon"}, "rollout.sync_strategy"),
    ({"sync_strategy": "distributed", "distributed_backend": "nccl"}, "rollout.distributed_backend"),
    ({"sglang_args": {"--tp": 2}}, "rollout.sglang_args"),
    ({"sampling": SamplingConfig(top_p=0.0)}, "rollout.sampling.top_p"),
])
def test_config_errors_name_the_field(change, field):
    cfg = RolloutConfig(urls=["http://127.0.0.1:1"], model_path="x")
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        cfg.validate("rollout")


def test_launching_without_a_model_names_the_field():
    from megatron_sdpg.rollout.launcher import EngineLauncher

    with pytest.raises(ValueError, match=r"^rollout\.model_path: "):
        EngineLauncher(RolloutConfig(urls=[], model_path=""))


def test_default_config_with_a_url_is_valid():
    RolloutConfig(urls=["http://127.0.0.1:1"]).validate("rollout")


def test_client_request_parses_on_the_server_as_one_sample_per_item():
    cfg = SamplingConfig(temperature=0.0, top_k=-1, max_new_tokens=5, stop_token_ids=[9], seed=3)
    params = [sampling_params_json(cfg, 3 + k) for k in range(3)]
    body = group_request_json([2, 4, 6], ["r0", "r1", "r2"], params, return_logprob=True)
    reqs, single = parse_generate(json.loads(json.dumps(body)), vocab_size=128)
    assert not single and [r.rid for r in reqs] == ["r0", "r1", "r2"]
    assert [r.seed for r in reqs] == [3, 4, 5]
    r = reqs[0]  # SGLang: temperature 0 is greedy = top_k 1 at temperature 1
    assert (r.temperature, r.top_k, r.max_new_tokens, r.stop_token_ids, r.return_logprob) == (1.0, 1, 5, {9}, True)


def test_sglang_request_normalisation():
    reqs, single = parse_generate({"input_ids": [1, 2], "rid": "x"}, 16)
    assert single and [r.rid for r in reqs] == ["x"] and reqs[0].top_k == 0 and reqs[0].max_new_tokens == 128
    reqs, single = parse_generate({"input_ids": [[1], [2, 3]], "rid": "x", "sampling_params": {"n": 2}}, 16)
    assert not single and [r.rid for r in reqs] == ["x_0_0", "x_0_1", "x_1_0", "x_1_1"]
    assert [r.input_ids for r in reqs] == [[1], [1], [2, 3], [2, 3]]


@pytest.mark.parametrize("body, message", [
    ({"input_ids": []}, "input_ids: must be a non-empty list"),
    ({"input_ids": [[1], []]}, r"input_ids\[1\]: must be a non-empty list of ints"),
    ({"input_ids": [1], "sampling_params": {"top_k": 0}}, r"sampling_params\[0\]\.top_k: must be -1 or >= 1"),
    ({"input_ids": [1], "sampling_params": {"temperature": "hot"}}, r"temperature: must be a float"),
    ({"input_ids": [1], "sampling_params": {"stop": "x"}}, "stop strings need a tokenizer"),
    ({"input_ids": [1], "sampling_params": {"bogus": 1}}, r"sampling_params\[0\]\.bogus: unknown"),
    ({"input_ids": [[1], [2]], "rid": ["a"]}, "rid: has 1 entries for a batch of 2"),
    ({"input_ids": [1], "stream": True}, "stream: streaming is not supported"),
    ({"input_ids": [1], "image_data": "x"}, "image_data: not supported"),
])
def test_bad_generate_bodies(body, message):
    with pytest.raises(BadRequest, match=message):
        parse_generate(body, vocab_size=16)


def test_safetensors_codec_roundtrip_and_pickle_rejected():
    w = torch.randn(4, 3)
    named = [("a", w), ("tied", w), ("b", torch.arange(5, dtype=torch.bfloat16))]
    out = dict(decode_safetensors(encode_safetensors(named)))
    assert torch.equal(out["a"], w) and torch.equal(out["tied"], w) and out["b"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not accept SGLang's pickled"):
        decode_safetensors(encode_sglang(named))
    with pytest.raises(ValueError, match="not valid base64"):
        decode_safetensors("***")


def test_safetensors_blob_views_match_the_library_and_bad_headers_are_rejected():
    from safetensors.torch import load as st_load

    named = [("w", torch.randn(3, 5)), ("h", torch.randn(7, dtype=torch.float64)), ("b", torch.randn(2, 2).bfloat16()),
             ("i", torch.arange(3)), ("m", torch.tensor([True, False])), ("e", torch.empty(0, 4)), ("s", torch.tensor(2.5))]
    blob = bytearray(safetensors_blob(named))
    ref = st_load(bytes(blob))
    got = dict(decode_safetensors_blob(blob))
    assert set(got) == set(ref)
    for k, t in ref.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    (hlen,) = struct.unpack("<Q", bytes(blob[:8]))
    header = json.loads(bytes(blob[8 : 8 + hlen]))
    header["w"]["data_offsets"][1] += 4
    bad_header = json.dumps(header).encode()
    bad = struct.pack("<Q", len(bad_header)) + bad_header + bytes(blob[8 + hlen :])
    with pytest.raises(ValueError, match="tensor 'w' has offsets"):
        decode_safetensors_blob(bad)
    with pytest.raises(ValueError, match="not a safetensors blob"):
        decode_safetensors_blob(b"\x80\x04" + b"x" * 20)


def test_sglang_encoding_is_forking_pickle_of_name_tensor_pairs():
    named = [("a", torch.randn(2, 2)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    out = pickle.loads(base64.b64decode(encode_sglang(named)))  # what SGLang's deserializer does
    assert [n for n, _ in out] == ["a", "b"] and all(torch.equal(x, y) for (_, x), (_, y) in zip(out, named))


def test_buckets_respect_the_byte_limit_and_keep_order():
    named = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(iter_buckets(iter(named), bucket_bytes=140))  # fp32: 40, 40, 120, 20, 400, 4 bytes
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]]


def test_checkpoint_write_is_atomic(tmp_path):
    named = [("x", torch.randn(100)), ("y", torch.randn(100)), ("z", torch.randn(10))]
    nbytes, shards = write_hf_checkpoint(iter(named), str(tmp_path / "v1"), shard_bytes=500)
    assert nbytes == 840 and shards == 2
    index = json.loads((tmp_path / "v1" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors",
                                   "z": "model-00002-of-00002.safetensors"}

    def broken():
        yield "a", torch.zeros(3)
        raise RuntimeError("trainer died mid-export")

    with pytest.raises(RuntimeError, match="mid-export"):
        write_hf_checkpoint(broken(), str(tmp_path / "v2"), shard_bytes=500)
    assert sorted(os.listdir(tmp_path)) == ["v1"]  # neither v2 nor a temp dir is left


def test_launch_commands_pass_options_through():
    cmd = sglang_command("/m", "0.0.0.0", 30001, 2, {"mem_fraction_static": 0.7, "enable_x": True, "off": False}, 2)
    assert cmd[1:] == ["-m", "sglang.launch_server", "--model-path", "/m", "--host", "0.0.0.0", "--port", "30001",
                       "--tp-size", "2", "--base-gpu-id", "2", "--mem-fraction-static", "0.7", "--enable-x"]
    assert cpu_server_command("/m", "127.0.0.1", 5, {"seed": 3})[1:] == [
        "-m", "megatron_sdpg.rollout.server", "--hf-dir", "/m", "--host", "127.0.0.1", "--port", "5", "--seed", "3"]


def test_model_weights_load_dir_reads_into_parameters_and_casts(tmp_path):
    from types import SimpleNamespace

    from megatron_sdpg.rollout.server.weights import ModelWeights
    from megatron_sdpg.rollout.sync.disk import write_hf_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2, bias=False).bfloat16())
    model.config = SimpleNamespace(tie_word_embeddings=False)
    w = ModelWeights(model)
    new = {"0.weight": torch.randn(3, 4, dtype=torch.float64), "0.bias": torch.randn(3), "1.weight": torch.randn(2, 3).bfloat16()}
    write_hf_checkpoint(iter(new.items()), str(tmp_path / "v1"), shard_bytes=40)
    ptr = model[1].weight.data_ptr()
    assert w.load_dir(str(tmp_path / "v1")) == 3 * 4 * 8 + 3 * 4 + 2 * 3 * 2
    assert torch.equal(model[0].weight, new["0.weight"].float()) and torch.equal(model[0].bias, new["0.bias"])
    assert torch.equal(model[1].weight, new["1.weight"]) and model[1].weight.data_ptr() == ptr
    write_hf_checkpoint(iter([("0.weight", torch.zeros(3, 4)), ("0.bias", torch.zeros(3))]), str(tmp_path / "v2"), 1 << 20)
    with pytest.raises(ValueError, match="lacks 1 weights"):
        w.load_dir(str(tmp_path / "v2"))
    assert torch.equal(model[0].bias, new["0.bias"])  # a rejected checkpoint writes nothing


@pytest.mark.parametrize("off_policy, extra, wait", [
    (0, {}, None),  # the server's default: a bounded spin (it has the cores while it decodes)
    (1, {}, "passive"),  # generation overlaps the training ranks: idle threads must not hold their cores
    (1, {"omp_wait": "spin"}, "spin"),  # an explicit rollout.sglang_args value wins
])
def test_cpu_engines_wait_passively_when_generation_overlaps_training(off_policy, extra, wait):
    from megatron_sdpg.rollout.launcher import EngineLauncher

    cfg = RolloutConfig(urls=[], model_path="/m", engine="cpu", off_policy_steps=off_policy, sglang_args=extra)
    cmd = EngineLauncher(cfg).engines[0].command
    assert (cmd[cmd.index("--omp-wait") + 1] if "--omp-wait" in cmd else None) == wait


def test_cpu_server_omp_wait_choices_set_libgomp_unless_the_environment_does():
    from megatron_sdpg.rollout.server.__main__ import parse_args
    from megatron_sdpg.rollout.server.openmp import OMP_WAIT_ENV, apply_omp_wait

    assert parse_args(["--hf-dir", "/m", "--port", "1"]).omp_wait == "spin"
    assert OMP_WAIT_ENV == {"spin": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"},
                            "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}
    env = {"PATH": "/bin"}
    apply_omp_wait("spin", env)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "100000"}
    env = {"OMP_WAIT_POLICY": "PASSIVE"}  # set by the user: kept
    apply_omp_wait("spin", env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "100000"}
    with pytest.raises(SystemExit) as err:
        parse_args(["--hf-dir", "/m", "--port", "1", "--omp-wait", "busy"])
    assert err.value.code == 2
