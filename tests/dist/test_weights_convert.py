"""HF <-> Megatron conversion proven by logits, on 4 gloo ranks at TP1, TP2, PP2 and TP2xPP2.

One spawn runs every layout and family (spawning costs seconds); the tests below
check its results. The reference is the ``transformers`` forward of the same
tiny model in fp32 (max abs diff <= 1e-5 on the true-vocabulary columns).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_sdpg.testing.distributed import run_on_ranks
from megatron_sdpg.testing.tiny_hf import CASES, tiny_hf_model

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))
LOGIT_TOL = 1e-5
SMALL_SHARD = 40_000  # bytes per HF shard in the TP2xPP2 export
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _exported_mismatches(exported: dict, hf_dir: str) -> list[str]:
    from megatron_sdpg.formats.hf_io import SafetensorsReader

    ref = SafetensorsReader(hf_dir)
    bad = sorted(set(ref) ^ set(exported))
    bad += [k for k in ref if k in exported and not (exported[k].dtype == ref[k].dtype and torch.equal(exported[k], ref[k]))]
    return bad


def _all_layouts(rank, world_size, hf_dirs, tokens, workdir):
    """Every layout x family: logits, export round trip; then checkpoints and converters."""
    from megatron_sdpg.models.builder import build_model_chunks
    from megatron_sdpg.platform.distributed import init_model_parallel
    from megatron_sdpg.platform.layout import ParallelConfig
    from megatron_sdpg.weights import WeightMappingError
    from megatron_sdpg.weights.checkpoint import load_megatron_checkpoint, read_checkpoint_config
    from megatron_sdpg.weights.checkpoint_source import CheckpointParamSource, CheckpointSourceUnavailable
    from megatron_sdpg.weights.convert import VerifyConfig, hf_model_config, hf_to_megatron, megatron_to_hf
    from megatron_sdpg.weights.export import export_hf_weights
    from megatron_sdpg.formats.hf_io import SafetensorsReader
    from megatron_sdpg.weights.hf_source import HFParamSource
    from megatron_sdpg.weights.load import load_hf_weights_into
    from megatron_sdpg.weights.verify import megatron_logits

    out = {"logits": {}, "export_bad": {}, "errors": {}, "ckpt_logits_equal": {}, "reports": {}}
    for tp, pp in LAYOUTS:
        groups = init_model_parallel(ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=False), seed=0)
        for case, hf_dir in hf_dirs.items():
            cfg = hf_model_config(hf_dir, "float32")
            chunks = build_model_chunks(cfg, groups, init_weights=False)
            load_hf_weights_into(chunks, cfg, groups, SafetensorsReader(hf_dir))
            logits = megatron_logits(chunks, groups, tokens, cfg.vocab_size)
            # Small buckets: several gathers and sends per stage, and tensors split across them.
            exported = dict(export_hf_weights(chunks, cfg, groups, bucket_bytes=24_000))
            if rank == 0:
                out["logits"][(case, tp, pp)] = logits.numpy()
                out["export_bad"][(case, tp, pp)] = _exported_mismatches(exported, hf_dir)
            else:
                assert exported == {}, "only global rank 0 yields exported tensors"
        if (tp, pp) == (2, 1):
            cfg = hf_model_config(hf_dirs["llama_gqa_rope3"], "float32")
            state = dict(SafetensorsReader(hf_dirs["llama_gqa_rope3"]))
            state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)
            try:
                load_hf_weights_into(build_model_chunks(cfg, groups, init_weights=False), cfg, groups, state)
            except WeightMappingError as err:
                out["errors"]["shape"] = str(err)
            try:  # the converter's streaming source checks every shape before anything is written
                HFParamSource(build_model_chunks(cfg, groups, init_weights=False), cfg, groups, state)
            except WeightMappingError as err:
                out["errors"]["source_shape"] = str(err)
            for case, hf_dir in hf_dirs.items():
                hf_to_megatron(hf_dir, os.path.join(workdir, f"{case}.mg"), groups, progress=False)

    # Checkpoints saved at TP2 load at TP1xPP2: logits identical to loading the HF weights there.
    groups = init_model_parallel(ParallelConfig(tp=1, pp=2, use_distributed_optimizer=False), seed=0)
    for case in hf_dirs:
        ckpt = os.path.join(workdir, f"{case}.mg")
        cfg = read_checkpoint_config(ckpt)
        chunks = build_model_chunks(cfg, groups, init_weights=False)
        load_megatron_checkpoint(chunks, ckpt)
        logits = megatron_logits(chunks, groups, tokens, cfg.vocab_size)
        reports = megatron_to_hf(ckpt, os.path.join(workdir, f"{case}.hf"), groups, progress=False,
                                 verify=VerifyConfig(prompts=2, new_tokens=4))
        # Without --verify the export reads the files directly (no model load); from this TP2
        # checkpoint at TP1 that means assembling each parameter from both TP pieces.
        CheckpointParamSource(build_model_chunks(cfg, groups, init_weights=False), ckpt, lambda name: True)
        megatron_to_hf(ckpt, os.path.join(workdir, f"{case}.hf_direct"), groups, progress=False)
        if rank == 0:
            out["ckpt_logits_equal"][case] = bool(np.array_equal(logits.numpy(), out["logits"][(case, 1, 2)]))
            out["reports"][case] = [vars(r) for r in reports]
    # A checkpoint the direct reader does not take (stored fp32, config says bf16) goes through
    # dist_checkpointing on every rank alike, and still exports exactly.
    odd = os.path.join(workdir, "odd.mg")
    if rank == 0:
        shutil.copytree(os.path.join(workdir, "llama_gqa_rope3.mg"), odd)
        with open(os.path.join(odd, "megatron_sdpg_model.json")) as f:
            stored = json.load(f)
        with open(os.path.join(odd, "megatron_sdpg_model.json"), "w") as f:
            json.dump(dict(stored, params_dtype="bfloat16"), f)
    torch.distributed.barrier()
    try:
        CheckpointParamSource(build_model_chunks(read_checkpoint_config(odd), groups, init_weights=False), odd,
                              lambda name: True)
    except CheckpointSourceUnavailable as err:
        out["errors"]["direct_reader"] = str(err)
    megatron_to_hf(odd, os.path.join(workdir, "odd.hf"), groups, progress=False)
    # Export at TP2xPP2: all four ranks write their own shards (TP-split parameters gathered
    # onto alternating writers); small shards so each writer fills several.
    groups = init_model_parallel(ParallelConfig(tp=2, pp=2, use_distributed_optimizer=False), seed=0)
    for case in hf_dirs:
        ckpt = os.path.join(workdir, f"{case}.mg")
        CheckpointParamSource(build_model_chunks(read_checkpoint_config(ckpt), groups, init_weights=False), ckpt,
                              lambda name: True, 2, groups.tp_rank)  # the direct path applies (it raises where not)
        megatron_to_hf(ckpt, os.path.join(workdir, f"{case}.hf_tp2pp2"), groups, max_shard_bytes=SMALL_SHARD,
                       progress=False)
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Saved tiny HF models, shared tokens, and their fp32 ``transformers`` logits."""
    root = tmp_path_factory.mktemp("tiny_hf")
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(1))
    dirs, ref = {}, {}
    for case in CASES:
        model = tiny_hf_model(case)
        dirs[case] = str(root / case)
        model.save_pretrained(dirs[case])
        with torch.no_grad():
            ref[case] = model(input_ids=tokens).logits.numpy()
    return dirs, tokens, ref


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    dirs, tokens, _ = tiny
    work = str(tmp_path_factory.mktemp("converted"))
    result = run_on_ranks(_all_layouts, 4, dirs, tokens, work, timeout=300, daemon=False)[0]
    return result, work


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_logits_match_transformers(tiny, converted, tp, pp):
    _, _, ref = tiny
    result, _ = converted
    for case in CASES:
        logits = result["logits"][(case, tp, pp)]
        assert logits.shape == ref[case].shape, case
        diff = np.abs(logits - ref[case]).max()
        assert diff <= LOGIT_TOL, f"{case} at tp={tp} pp={pp}: max |dlogit| {diff:.3e} (logit scale {np.abs(ref[case]).max():.2f})"


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_export_is_bit_identical_to_hf(converted, tp, pp):
    result, _ = converted
    for case in CASES:
        assert result["export_bad"][(case, tp, pp)] == [], f"{case} at tp={tp} pp={pp}"


def test_checkpoint_saved_at_tp2_loads_at_tp1_pp2(converted):
    result, _ = converted
    assert result["ckpt_logits_equal"] == {case: True for case in CASES}


def test_round_trip_files_bit_identical_and_config_equivalent(tiny, converted):
    from transformers import AutoModelForCausalLM

    from megatron_sdpg.formats.hf_io import INDEX_FILE, SafetensorsReader

    dirs, tokens, ref = tiny
    result, work = converted
    for case in CASES:
        out = os.path.join(work, f"{case}.hf")
        assert os.path.isfile(os.path.join(out, INDEX_FILE))
        original, back = SafetensorsReader(dirs[case]), SafetensorsReader(out)
        assert sorted(original) == sorted(back), case
        for name in original:
            a, b = original[name], back[name]
            assert a.dtype == b.dtype and torch.equal(a, b), f"{case}: {name} differs"
        for side in ("config.json", "generation_config.json"):
            with open(os.path.join(dirs[case], side)) as f, open(os.path.join(out, side)) as g:
                assert json.load(f) == json.load(g), f"{case}: {side}"
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            np.testing.assert_array_equal(model(input_ids=tokens).logits.numpy(), ref[case])
        for report in result["reports"][case]:
            assert report["max_abs_diff"] <= LOGIT_TOL and report["kl_max"] <= 1e-9 and report["greedy_agree"], report


def test_direct_export_from_a_tp2_checkpoint_at_tp1_pp2_is_bit_identical(tiny, converted):
    from megatron_sdpg.formats.hf_io import SafetensorsReader

    dirs, _, _ = tiny
    _, work = converted
    for case in CASES:
        assert _exported_mismatches(dict(SafetensorsReader(os.path.join(work, f"{case}.hf_direct"))), dirs[case]) == []


def test_a_checkpoint_the_direct_reader_refuses_exports_through_dist_checkpointing(tiny, converted):
    from megatron_sdpg.formats.hf_io import SafetensorsReader

    dirs, _, _ = tiny
    result, work = converted
    assert "is stored as torch.float32, the model has torch.bfloat16" in result["errors"]["direct_reader"]
    original, back = SafetensorsReader(dirs["llama_gqa_rope3"]), SafetensorsReader(os.path.join(work, "odd.hf"))
    assert sorted(original) == sorted(back)
    for name in original:
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], original[name].bfloat16()), name


def test_export_at_tp2_pp2_writes_every_tensor_once_bit_identical_with_a_correct_index(tiny, converted):
    from safetensors import safe_open

    from megatron_sdpg.formats.hf_io import INDEX_FILE

    dirs, _, _ = tiny
    _, work = converted
    for case in CASES:
        out = os.path.join(work, f"{case}.hf_tp2pp2")
        with open(os.path.join(out, INDEX_FILE)) as f:
            index = json.load(f)
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        assert len(files) > 4 and files == sorted(set(index["weight_map"].values())), case
        assert all(name.endswith(f"-of-{len(files):05d}.safetensors") for name in files)
        original = {}
        with safe_open(os.path.join(dirs[case], "model.safetensors"), framework="pt") as f:
            original = {k: f.get_tensor(k) for k in f.keys()}
        seen, total = {}, 0
        for name in files:  # read back with the safetensors library, not our reader
            with safe_open(os.path.join(out, name), framework="pt") as f:
                keys = list(f.keys())
                nbytes = 0
                for k in keys:
                    t = f.get_tensor(k)
                    nbytes += t.numel() * t.element_size()
                    assert index["weight_map"][k] == name and k not in seen, f"{case}: {k}"
                    assert t.dtype == original[k].dtype and torch.equal(t, original[k]), f"{case}: {k} differs"
                    seen[k] = name
            assert len(keys) == 1 or nbytes <= SMALL_SHARD, f"{case}: {name} holds {nbytes} bytes"
            total += nbytes
        assert sorted(seen) == sorted(original) and index["metadata"]["total_size"] == total, case


def test_shape_mismatch_names_the_tensor(converted):
    result, _ = converted
    expected = "shape mismatch for HF tensor 'model.layers.1.self_attn.k_proj.weight': got (48, 64), expected (32, 64)"
    assert result["errors"]["shape"] == expected
    assert result["errors"]["source_shape"] == expected


def test_cli_verify_table_and_nonzero_exit_above_tolerance(tiny, tmp_path):
    """The real CLI, one process without torchrun: prints the table, exits 1 when KL tolerance is 0."""
    dirs, _, _ = tiny
    out = tmp_path / "mg"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--hf-dir", dirs["qwen2_bias"],
         "--megatron-dir", str(out), "--verify", "--verify-prompts", "1", "--verify-tokens", "3", "--kl-tol", "0",
         "--no-progress"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "max|dlogit|" in proc.stdout and "verify: FAIL" in proc.stdout, proc.stdout
    assert os.path.isfile(out / "megatron_sdpg_model.json") and not os.path.exists(str(out) + ".incomplete")


def test_cli_verify_of_a_bf16_conversion_holds_fp32_tolerances(tiny, tmp_path):
    """Stored bf16, compared in fp32 on weights rounded alike: a correct conversion passes 1e-3 / 1e-6
    (computing in bf16 would put the logits ~1e-2 apart and fail it)."""
    dirs, _, _ = tiny
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--hf-dir", dirs["llama_gqa_rope3"],
         "--megatron-dir", str(tmp_path / "mg"), "--dtype", "bfloat16", "--verify", "--verify-prompts", "1",
         "--verify-tokens", "3", "--no-progress"],
        capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "verify: PASS (tolerances: max|dlogit| <= 0.001, KL <= 1e-06; stored bfloat16" in proc.stdout, proc.stdout
