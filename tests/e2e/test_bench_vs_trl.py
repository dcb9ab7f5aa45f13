"""benchmarks/bench_vs_trl.py end to end in its quick mode (3 steps per run), when TRL is installed.

The project (torchrun, gloo, CPU rollout server) and TRL's GRPOTrainer train the test-size tiny
model on the same prompts; the JSON lines must be complete and self-consistent: the same prompt
tokens on both sides at every timed step, the ratios recomputable from the figures, a step
split that does not exceed the step. No timing is asserted. Bad arguments fail with one line.
"""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "bench_vs_trl.py")


def _bench(*args, timeout=900):
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def _check_side(side: dict, steps: int) -> None:
    assert side["steps"] == steps and side["steps_timed"] == 1
    for key in ("step_s", "generation_s", "update_s", "reference_s"):
        assert side[key] > 0, key
    # The split's named parts fit in the step (the rest, other_s, is what is left of it).
    assert side["generation_s"] + side["update_s"] + side["reference_s"] <= side["step_s"] * (1 + 1e-6)
    assert math.isclose(side["generation_s"] + side["update_s"] + side["reference_s"] + side["other_s"],
                        side["step_s"], rel_tol=1e-6)
    assert side["train_tokens"] == side["prompt_tokens"] + side["completion_tokens"]
    assert 128 <= side["completion_tokens"] <= 128 * 48  # 16 prompts x 8 samples, 1..48 new tokens each
    assert math.isclose(side["train_tokens_per_s"], side["train_tokens"] / side["step_s"], rel_tol=1e-6)


# Two project runs and two TRL runs of 3 steps each: a few minutes; the limits leave room for a
# loaded machine (9.7 minutes here with the load average at 30 on 2 cores).
@pytest.mark.timeout(1500)
def test_quick_mode_end_to_end(tiny_task_model):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]'")
    proc = _bench("--quick", "--model-dir", tiny_task_model[0], "--configs", "grpo_on_policy,sdpg",
                  "--timeout-s", "600", timeout=1400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = {d["config"]: d for d in map(json.loads, proc.stdout.strip().splitlines())}
    assert set(lines) == {"grpo_on_policy", "sdpg"}
    for line in lines.values():
        project, trl = line["project"], line["trl"]
        _check_side(project, 3)
        _check_side(trl, 3)
        assert trl["prompt_ids_mismatched"] == 0  # TRL tokenises the project's prompt text to the same ids
        assert trl["prompts_in_project_order"]  # step k of TRL trained on the project's step-k prompts
        assert project["prompt_tokens"] == trl["prompt_tokens"]  # same prompts at the timed step
        assert math.isclose(line["throughput_ratio"], project["train_tokens_per_s"] / trl["train_tokens_per_s"])
    ratio = lines["sdpg"]["sdpg_grpo_ratio"]
    assert math.isclose(ratio, lines["sdpg"]["project"]["step_s"] / lines["grpo_on_policy"]["project"]["step_s"])
    assert "sdpg_grpo_ratio" not in lines["grpo_on_policy"]


def test_off_policy_refused_value_is_skipped_with_a_line(tiny_task_model):
    pytest.importorskip("trl", reason="TRL is the bench extra: pip install -e '.[bench]'")
    # 7 is no value rollout.off_policy_steps takes (0|1), whether or not this trainer has the field.
    proc = _bench("--quick", "--model-dir", tiny_task_model[0], "--configs", "grpo_off_policy_1",
                  "--off-policy-steps", "7", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip())
    assert line["config"] == "grpo_off_policy_1" and "rollout.off_policy_steps" in line["skipped"]


@pytest.mark.parametrize("args, field", [
    (["--configs", "grpo_on_policy,dapo"], "--configs"),
    (["--steps", "0"], "--steps"),
    (["--pairs", "0"], "--pairs"),
    (["--model-dir", "/nonexistent/model"], "--model-dir"),
    (["--workdir", "{tmp}"], "--workdir"),  # not empty: runs there would resume or mix
])
def test_bad_arguments_fail_with_one_line(args, field, tmp_path):
    (tmp_path / "earlier_file").write_text("kept")
    proc = _bench(*[a.format(tmp=tmp_path) for a in args], timeout=120)
    assert (tmp_path / "earlier_file").read_text() == "kept"
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and field in proc.stderr and "Traceback" not in proc.stderr


def test_median_pair_reports_the_middle_pair_and_every_ratio():
    sys.path.insert(0, ROOT)
    from benchmarks.bench_vs_trl import median_pair

    def line(ratio, step_s):
        return {"config": "x", "throughput_ratio": ratio, "project": {"step_s": step_s}, "trl": {}}

    pairs = {"grpo_on_policy": [line(0.9, 1.0), line(0.7, 2.0), line(1.1, 1.0)],
             "sdpg": [line(0.6, 1.2), line(0.8, 2.2), line(0.5, 1.5)]}
    grpo = median_pair("grpo_on_policy", pairs)
    assert grpo["throughput_ratio"] == 0.9 and grpo["throughput_ratio_pairs"] == [0.9, 0.7, 1.1]
    assert "sdpg_grpo_ratio" not in grpo
    sdpg = median_pair("sdpg", pairs)
    assert sdpg["throughput_ratio"] == 0.6 and sdpg["project"]["step_s"] == 1.2
    assert sdpg["sdpg_grpo_ratio_pairs"] == [1.2, 1.1, 1.5] and sdpg["sdpg_grpo_ratio"] == 1.2
    even = median_pair("grpo_on_policy", {"grpo_on_policy": [line(0.9, 1.0), line(0.7, 1.0)]})
    assert even["throughput_ratio"] == 0.7  # the lower middle of an even count
    single = median_pair("grpo_on_policy", {"grpo_on_policy": [line(0.9, 1.0)]})
    assert "throughput_ratio_pairs" not in single
