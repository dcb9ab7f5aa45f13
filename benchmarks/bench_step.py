"""Step time of SDPG against GRPO on the same tiny config, split by phase.

Runs the real trainer (``torchrun -m megatron_sdpg.train``, TP=2 over gloo,
CPU rollout server) twice in one invocation, ``algorithm.preset=grpo`` then
``algorithm.preset=sdpg``, with the same seed, data and sizes, and reads each
run's ``metrics.jsonl``. Prints one JSON line per method with the mean time of
each phase (generation, log-prob passes, update, weight sync, whole step; the
first step is dropped as warm-up) and a final line with the SDPG/GRPO ratios.
Target: ``step_ratio <= 1.5`` (the teacher forward is the only extra pass).

Usage::

    python benchmarks/bench_step.py [--model-dir artifacts/tiny_model] [--steps 12] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHASES = {"generation": "rollout/gen_time_s", "logprob_passes": "time/logprob_passes_s", "update": "time/update_s",
          "sync": "time/sync_s", "step": "step_s"}


def _free_port() -> int:
    sys.path.insert(0, ROOT)
    from megatron_sdpg.testing.distributed import free_port

    return free_port()


def run(preset: str, model_dir: str, steps: int, run_dir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "megatron_sdpg.train", "--config", os.path.join(ROOT, "examples/configs/tiny_cpu.yaml"),
           f"model.hf_dir={model_dir}", f"train.run_dir={run_dir}", f"train.steps={steps}", "train.eval_n=8",
           "train.eval_every=0", f"algorithm.preset={preset}",
           # Explicit beta whatever the YAML or the preset say (the baseline has none).
           f"algorithm.beta_base={0.0 if preset == 'grpo' else 0.1}",
           f"rollout.base_port={_free_port()}", "logging.progress_bar=false", *extra]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{preset} run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps_rec = [r for r in records if not r.get("final")][1:]  # drop the warm-up step
    out = {"method": preset, "steps_timed": len(steps_rec)}
    for name, key in PHASES.items():
        out[f"{name}_s"] = sum(r[key] for r in steps_rec) / len(steps_rec)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.path.join(ROOT, "artifacts", "tiny_model"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="3 steps, 4 prompts x 4 samples")
    args = parser.parse_args()
    extra = []
    steps = args.steps
    if args.quick:
        steps = 3
        extra = ["train.prompts_per_step=4", "rollout.n_samples=4", "rollout.sampling.max_new_tokens=32"]
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"error: no model in {args.model_dir} (build one with tools/make_tiny_model.py)")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("grpo", "sdpg"):
            results[preset] = run(preset, args.model_dir, steps, os.path.join(tmp, preset), extra)
            print(json.dumps(results[preset]), flush=True)
    g, s = results["grpo"], results["sdpg"]
    ratios = {f"{name}_ratio": (s[f"{name}_s"] / g[f"{name}_s"] if g[f"{name}_s"] > 0 else None) for name in PHASES}
    print(json.dumps({"case": "sdpg_vs_grpo", **ratios, "target_step_ratio": 1.5,
                      "meets_target": ratios["step_ratio"] <= 1.5}), flush=True)


if __name__ == "__main__":
    main()
