"""The planner against hand-computed figures, published parameter counts and the example configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from megatron_sdpg.config import ConfigError, load_config
from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.planning.assumptions import PlanAssumptions
from megatron_sdpg.planning.flops import step_flops
from megatron_sdpg.planning.inputs import planning_model
from megatron_sdpg.planning.memory import estimate_memory, worst_stage
from megatron_sdpg.planning.params import stage_params, total_params
from megatron_sdpg.planning.workload import Workload, workload_from_config
from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "examples", "configs")

SMALL = ModelConfig(arch="llama", vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, params_dtype="bfloat16")
SMALL_WORK = Workload(prompt_tokens=20, teacher_prompt_tokens=40, response_tokens=44, sequences_per_step=16,
                      micro_batch_size=2)
TP2_PP2_DP2 = ParallelLayout.resolve(ParallelConfig(tp=2, pp=2), 8)


def test_published_parameter_counts():
    llama8 = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                         num_attention_heads=32, num_key_value_heads=8)
    llama70 = ModelConfig(arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
                          num_attention_heads=64, num_key_value_heads=8)
    qwen32 = ModelConfig(arch="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64,
                         num_attention_heads=40, num_key_value_heads=8)
    # Sums of the safetensors shapes of the released checkpoints.
    assert total_params(llama8) == 8_030_261_248
    assert total_params(llama70) == 70_553_706_496
    assert total_params(qwen32) == 32_763_876_352


def test_stage_params_by_hand():
    # One layer on one of 2 TP ranks: QKV 64*(4+2*2)*16 = 8192, proj 64*64 = 4096, fc1 64*2*128 = 16384,
    # fc2 128*64 = 8192: 36864 / 2 = 18432, plus two replicated RMSNorm weights 2*64.
    per_layer = 36864 // 2 + 128
    vocab_rows = 1000 // 2
    stages = stage_params(SMALL, tp=2, pp=2)
    assert [s.layers for s in stages] == [2, 2]
    assert stages[0].total == 2 * per_layer + vocab_rows * 64  # embedding
    assert stages[1].total == 2 * per_layer + vocab_rows * 64 + 64  # output layer + final norm


def test_memory_by_hand():
    """Every term of both stages of a TP2 x PP2 x DP2 bf16 SDPG step, computed by hand."""
    prepass = PlanAssumptions(teacher_in_schedule=False)
    stages = estimate_memory(SMALL, TP2_PP2_DP2, SMALL_WORK, prepass, distributed_optimizer=True)
    p0, p1 = 2 * 18560 + 32000, 2 * 18560 + 32000 + 64
    # student 20+44 = 64 tokens, teacher 40+44 = 84 -> 88 (padded to 8); 16 sequences / dp 2 = 8 per rank,
    # 2 per micro-batch -> m = 4 micro-batches; T = 2*44 = 88 response rows; V/tp = 500.
    # One layer's activations (bf16, tp 2: 2 heads, 1 KV head, d 16): per token 4*64 + (2+2)*16 + 2*16 + 3*128/2
    # = 544 elements; 2*64 tokens -> 128*544*2 bytes, + the fp32 log-sum-exp 128*2*4.
    layer = 128 * 544 * 2 + 128 * 2 * 4
    # Plus one layer's transient gradients in backward: fc1 output and input, 128 * (2*128/2 + 64) * 2 bytes.
    bwd = 128 * (128 + 64) * 2
    s0, s1 = stages
    assert (s0.weights, s0.gradients, s0.optimizer, s0.reference_weights) == (2 * p0, 4 * p0, 12 * p0 // 2, 2 * p0)
    assert (s1.weights, s1.gradients, s1.optimizer, s1.reference_weights) == (2 * p1, 4 * p1, 12 * p1 // 2, 2 * p1)
    assert s0.activations == 2 * 2 * layer + bwd  # 2 layers x 2 micro-batches in flight (pp - stage)
    assert s1.activations == 2 * 1 * layer + 2 * 128 * 64 * 2 + bwd  # + final norm and output layer inputs
    full_logits, rows = 128 * 500 * 2, 88 * 500 * 2
    # The output layer runs on the 88 response rows only: their logits and the KL kernel's 3 x 88 fp32 chunk
    # rows (backward writes the rows' gradient in place).
    kl_work = 3 * 88 * 500 * 4
    assert s1.logits_and_kl == rows + kl_work
    assert s1.teacher_logits == 4 * rows  # pp > 1: the teacher pass keeps every micro-batch's logits
    assert s0.logits_and_kl == s0.teacher_logits == 0
    assert s1.peak == 2593920 - (2 * full_logits + rows + kl_work + rows) + s1.logits_and_kl + bwd
    assert s0.peak == 1528832 + bwd
    assert worst_stage(stages) is s1
    # The teacher per micro-batch inside the pipeline schedule: the last stage (1F1B) holds one in flight.
    # Every stage also holds the teacher halves [s_t = 88, b = 2, h = 64] of the activations it receives and
    # sends: min(pp - stage + 1, m) of them on the first and last stage (3 and 2 here), twice that in between.
    half = 88 * 2 * 64 * 2
    first, in_schedule = estimate_memory(SMALL, TP2_PP2_DP2, SMALL_WORK, PlanAssumptions(), distributed_optimizer=True)
    assert in_schedule.teacher_logits == rows + 2 * half and in_schedule.peak == s1.peak - 3 * rows + 2 * half
    assert first.teacher_logits == 3 * half and first.peak == s0.peak + 3 * half
    pp4 = estimate_memory(SMALL, ParallelLayout.resolve(ParallelConfig(tp=1, pp=4), 8), SMALL_WORK,
                          PlanAssumptions(), distributed_optimizer=True)
    assert [st.teacher_logits for st in pp4[:3]] == [4 * half, 2 * 4 * half, 2 * 3 * half]  # m = 4 caps stage 0
    assert pp4[3].teacher_logits == 88 * 1000 * 2 + 2 * half  # V/tp = 1000 at tp 1
    # Several updates per step without teacher_per_microbatch: the pre-pass, whatever the assumption.
    prepass_work = Workload(**{**SMALL_WORK.__dict__, "teacher_per_microbatch": False})
    assert estimate_memory(SMALL, TP2_PP2_DP2, prepass_work, PlanAssumptions(), True)[1].teacher_logits == 4 * rows
    # Interleaved 1F1B (vpp 2): the last stage holds 1 + (pp-1)/(pp*vpp) = 1.25 -> 2 micro-batches' teacher data.
    vpp = ParallelLayout.resolve(ParallelConfig(tp=2, pp=2, vpp=2), 8)
    # (And 2 + 1 activation halves.)
    assert estimate_memory(SMALL, vpp, SMALL_WORK, PlanAssumptions(), True)[1].teacher_logits == 2 * rows + 3 * half


def test_memory_switches():
    base = estimate_memory(SMALL, TP2_PP2_DP2, SMALL_WORK, PlanAssumptions(), True)[1]
    no_distopt = estimate_memory(SMALL, TP2_PP2_DP2, SMALL_WORK, PlanAssumptions(), False)[1]
    assert no_distopt.optimizer == 2 * base.optimizer
    recompute = estimate_memory(ModelConfig(**{**SMALL.__dict__, "recompute": True}), TP2_PP2_DP2, SMALL_WORK,
                                PlanAssumptions(), True)[1]
    layer, bwd = 128 * 544 * 2 + 128 * 2 * 4, 128 * (128 + 64) * 2
    # Two layer inputs kept, one layer re-materialised, its backward transients, the head's inputs.
    assert recompute.activations == 2 * 128 * 64 * 2 + layer + bwd + 2 * 128 * 64 * 2
    grpo = Workload(**{**SMALL_WORK.__dict__, "teacher_forward": False, "reference_model": False})
    plain = estimate_memory(SMALL, TP2_PP2_DP2, grpo, PlanAssumptions(), True)[1]
    assert plain.teacher_logits == 0 and plain.reference_weights == 0
    pp1 = ParallelLayout.resolve(ParallelConfig(tp=2, pp=1), 4)
    inline = estimate_memory(SMALL, pp1, SMALL_WORK, PlanAssumptions(), True)[0]
    assert inline.teacher_logits == 88 * 500 * 2  # pp == 1: inline teacher, one micro-batch at a time
    fp32 = estimate_memory(ModelConfig(**{**SMALL.__dict__, "params_dtype": "float32"}), pp1, SMALL_WORK,
                           PlanAssumptions(), False)[0]
    assert fp32.optimizer == 8 * fp32.params and fp32.weights == 4 * fp32.params


def test_flops_by_hand():
    a = PlanAssumptions(peak_tflops=1000.0, mfu=0.5)
    f = step_flops(SMALL, TP2_PP2_DP2, SMALL_WORK, a)
    # Matmul weights per token: 4 layers x 36864 + LM head 1000*64 = 211456.
    # Student (64 tokens): 2*64*211456 + causal attention 2*4 layers*4 heads*16*64^2 = 29163520.
    # Teacher (88 tokens): 2*88*211456 + 2*4*4*16*88^2 = 41181184.
    assert f.update == 16 * 3 * 29163520
    assert f.teacher == 16 * 41181184
    assert f.reference == 16 * 29163520
    assert f.old_policy == 0
    assert f.bubble == pytest.approx(1 / 4)  # (pp - 1) / m
    assert f.seconds == pytest.approx(f.total / (8 * 1000e12 * 0.5) * 1.25)


def test_workload_follows_the_algorithm_presets():
    sdpg = workload_from_config(load_config(os.path.join(CONFIGS, "sdpg_70b.yaml")))
    assert (sdpg.teacher_forward, sdpg.reference_model) == (True, True)
    assert (sdpg.prompt_tokens, sdpg.teacher_prompt_tokens, sdpg.response_tokens) == (1024, 3072, 4096)
    assert sdpg.sequences_per_step == 64 * 8
    grpo = workload_from_config(load_config(os.path.join(CONFIGS, "sdpg_70b.yaml"), ["algorithm.preset=grpo"]))
    assert (grpo.teacher_forward, grpo.reference_model) == (False, True)
    dapo = workload_from_config(load_config(os.path.join(CONFIGS, "sdpg_70b.yaml"), ["algorithm.preset=dapo"]))
    assert (dapo.teacher_forward, dapo.reference_model) == (False, False)
    opsd = workload_from_config(load_config(os.path.join(CONFIGS, "sdpg_70b.yaml"), ["algorithm.preset=opsd"]))
    assert (opsd.teacher_forward, opsd.reference_model) == (True, True)


def test_planning_model_checks_the_hf_config(tmp_path):
    cfg = load_config(os.path.join(CONFIGS, "sdpg_8b.yaml")).model
    model, source = planning_model(cfg)
    assert source == "the config's model section" and model.hidden_size == 4096
    hf = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
          "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg.hf_dir = str(tmp_path)
    model, source = planning_model(cfg)
    assert source.endswith("config.json") and model.params_dtype == "bfloat16" and model.recompute
    (tmp_path / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 36}))
    with pytest.raises(ConfigError, match=r"model.num_layers: the config says 32 but .* says 36"):
        planning_model(cfg)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "megatron_sdpg.plan", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=REPO)


def test_70b_default_layout_fits_on_80gb_gpus():
    """The 70B script's default layout (8 nodes, TP 8, PP 2) on 80 GB GPUs, with the margin."""
    r = run_plan("--config", os.path.join(CONFIGS, "sdpg_70b.yaml"), "--nodes", "8", "parallel.tp=8", "parallel.pp=2",
                 "--require-fit")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["fits"] is True
    assert summary["layout"] == "tp8 pp2 cp1 ep1 dp4 (world 64)"
    assert 50 < summary["peak_gib_per_gpu"] < summary["usable_gib"] == pytest.approx(74.6)
    assert summary["margin_gib"] == pytest.approx(summary["usable_gib"] - summary["peak_gib_per_gpu"], abs=1e-2)
    assert "FITS with" in r.stdout and "stage 1" in r.stdout
    # Without the distributed optimizer the same layout does not fit.
    assert summary["variants_gib"]["distopt=off,recompute=on"] > 80


def test_plan_reports_a_layout_that_does_not_fit():
    r = run_plan("--config", os.path.join(CONFIGS, "sdpg_70b.yaml"), "--nodes", "1", "parallel.pp=1",
                 "--require-fit")
    assert r.returncode == 1
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["fits"] is False and summary["margin_gib"] < 0
    assert "DOES NOT FIT" in r.stdout


def test_plan_config_error_is_one_line():
    r = run_plan("--config", os.path.join(CONFIGS, "sdpg_70b.yaml"), "--nodes", "3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == \
        "config error: parallel.tp: tp*pp*cp=16 (tp=8, pp=2, cp=1) does not divide world size 24"
    r = run_plan("--config", os.path.join(CONFIGS, "sdpg_70b.yaml"), "parallel.tp=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "config error: model.num_attention_heads: tp=3 does not divide 64 heads"
    r = run_plan("--config", os.path.join(CONFIGS, "sdpg_70b.yaml"), "parallel.cp=2")
    assert r.returncode == 2
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        "config error: parallel.cp: context parallelism (cp=2) is not implemented: sequences are not split per "
        "CP rank; set parallel.cp=1"]


@pytest.mark.parametrize("size", ["8b", "32b", "70b"])
def test_plan_without_flags_plans_what_the_script_launches(size, tmp_path):
    """``plan --config`` alone plans the layout ``run_sdpg_<size>.sh`` launches: both read parallel.nodes."""
    config = os.path.join(CONFIGS, f"sdpg_{size}.yaml")
    r = run_plan("--config", config)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TP", "PP", "DP", "TRAIN_NODES",
                                                                     "GPUS_PER_NODE"))}
    env.update(DRY_RUN="1", RUN_DIR=str(tmp_path / "run"), MEGATRON_DIR=str(tmp_path / "m"))
    dry = subprocess.run(["bash", os.path.join(REPO, "examples", f"run_sdpg_{size}.sh")], env=env,
                         capture_output=True, text=True, timeout=60, cwd=str(tmp_path))
    assert dry.returncode == 0, dry.stderr
    m = re.search(r"^# train: .*\((\d+) nodes x (\d+) GPUs = (\d+) ranks\): tp (\d+) pp (\d+) dp (\d+)$", dry.stdout,
                  re.M)
    assert m, dry.stdout
    nodes, gpus, world, tp, pp, dp = map(int, m.groups())
    assert summary["layout"] == f"tp{tp} pp{pp} cp1 ep1 dp{dp} (world {world})"
    if size == "70b":
        assert (nodes, gpus, dp) == (8, 8, 4) and summary["fits"] is True


def test_fused_output_memory_by_hand():
    """algorithm.fused_output: no [T, V/tp] buffers; the teacher keeps [T, h] hidden states."""
    fused = Workload(**{**SMALL_WORK.__dict__, "fused_output": True})
    s1 = estimate_memory(SMALL, TP2_PP2_DP2, fused, PlanAssumptions(teacher_in_schedule=False), True)[1]
    # T = 88 rows, V/tp = 500, h = 64, bf16; chunk = min(88, 224) = 88 tokens.
    work = 2 * 88 * 500 * 4 + 88 * 500 * 2 + 3 * 88 * 500 * 4
    grads = 500 * 64 * 4 + 500 * 64 * 2 + 88 * 64 * 4
    assert s1.logits_and_kl == 128 * 64 * 2 + 88 * 64 * 2 + work + grads
    assert s1.teacher_logits == 4 * 88 * 64 * 2 + 500 * 64 * 2  # m = 4 micro-batches + the output shard copy
    pp1 = ParallelLayout.resolve(ParallelConfig(tp=2, pp=1), 4)
    assert estimate_memory(SMALL, pp1, fused, PlanAssumptions(), True)[0].teacher_logits == 88 * 64 * 2
    # In the pipeline schedule: one micro-batch's hidden states, no copy of the output shard.
    # (Plus the last stage's two [88, 2, 64] teacher activation halves.)
    assert (estimate_memory(SMALL, TP2_PP2_DP2, fused, PlanAssumptions(), True)[1].teacher_logits
            == 88 * 64 * 2 + 2 * 88 * 2 * 64 * 2)
    cfg = load_config(os.path.join(CONFIGS, "sdpg_70b.yaml"))
    assert cfg.algorithm.fused_output and workload_from_config(cfg).fused_output  # the default
    assert not workload_from_config(load_config(os.path.join(CONFIGS, "sdpg_70b.yaml"),
                                                ["algorithm.fused_output=false"])).fused_output


def test_workload_follows_the_trainers_teacher_and_fused_output_rules():
    path = os.path.join(CONFIGS, "sdpg_70b.yaml")
    assert workload_from_config(load_config(path)).teacher_per_microbatch  # one update per step
    several = ["train.mini_batches=2"]
    assert not workload_from_config(load_config(path, several)).teacher_per_microbatch  # the paper's pre-pass
    assert workload_from_config(load_config(path, several + ["algorithm.teacher_per_microbatch=true"])
                                ).teacher_per_microbatch
    opsd = load_config(path, ["algorithm.preset=opsd"])  # the frozen initial policy: the pre-pass
    assert opsd.algorithm.teacher_source == "initial" and not workload_from_config(opsd).teacher_per_microbatch
    # Sequence parallelism rules the fused op out: the trainer and the planner take the logits path.
    sp = load_config(path, ["parallel.sequence_parallel=true"])
    assert sp.algorithm.fused_output and "parallel.sequence_parallel" in sp.fused_output_off_reason()
    assert not workload_from_config(sp).fused_output
    assert load_config(path).fused_output_off_reason() is None
    assert load_config(path, ["parallel.sequence_parallel=true", "algorithm.fused_output=false"]
                       ).fused_output_off_reason() is None


def test_70b_fits_on_4_nodes_dp2_with_the_teacher_per_microbatch_and_fused_output():
    """Issue 19's goal: half the training GPUs (TP 8 x PP 2 x DP 2); the pre-pass on logits does not fit."""
    from megatron_sdpg.plan import make_plan

    path = os.path.join(CONFIGS, "sdpg_70b.yaml")
    now = make_plan(load_config(path), 32, PlanAssumptions())
    assert now["layout"].dp == 2 and now["work"].fused_output and now["work"].teacher_per_microbatch
    assert now["worst"].peak / 2**30 < PlanAssumptions().usable_gib
    # One micro-batch's [T, h] bf16 (64 MiB) and the in-flight teacher activation halves: 0.33 GiB at most
    # (the pre-pass kept 15.66 GiB).
    assert max(st.teacher_logits for st in now["stages"]) < 0.35 * 2**30
    before = make_plan(load_config(path, ["algorithm.fused_output=false"]), 32,
                       PlanAssumptions(teacher_in_schedule=False))
    assert before["worst"].peak / 2**30 > PlanAssumptions().usable_gib + 15  # 93.1 GiB: every micro-batch's logits
