"""Throughput of the project's trainer against Hugging Face TRL's GRPOTrainer on the same work.

Same model (``artifacts/tiny_model``: the project trains its Megatron conversion, TRL the HF
checkpoint through transformers), same student prompts in the same order (the synthetic task's
train split as the project renders and batches it), 16 prompts x 8 samples, up to 48 new
tokens, temperature 1, lr 3e-5 (constant, no warm-up, no weight decay, grad clip 1), k3
reference KL with alpha = beta = 1e-3, the project's verifier as the reward. Every run is a
child of this process (project, TRL, project, TRL, ...), so both see the same machine state.

Configurations, each followed by its own TRL run (TRL: strictly on-policy GRPO every time):

- ``grpo_on_policy``: ``algorithm.preset=grpo``, ``rollout.off_policy_steps`` not set (0);
- ``grpo_off_policy_1``: the same with ``rollout.off_policy_steps=1`` (skipped, with a line saying
  why, when the installed trainer refuses the field);
- ``sdpg``: the embedded default (``examples/configs/tiny_cpu.yaml`` as it stands).

One JSON line per configuration: medians over steps 3..N of s/step, train tokens/s (prompt +
completion tokens of every sample, per step) and the step split (generation; forward +
backward + optimizer; reference pass; the rest), ``throughput_ratio`` = project / TRL train
tokens/s, and on the ``sdpg`` line ``sdpg_grpo_ratio`` = project SDPG s/step / project GRPO
(on-policy) s/step. Differences that remain between the two sides are listed in ``notes``.
This VM's speed drifts by 20-40% within minutes (TRL's own s/step moved 0.63 -> 0.89 between two
runs of the same command): ``--pairs N`` runs the whole alternation N times and reports, per
configuration, the pair with the median ratio, every pair's ratio (``throughput_ratio_pairs``) and
the median ``sdpg_grpo_ratio`` over pairs (``sdpg_grpo_ratio_pairs``).
In an off-policy run the batch a step trains on was generated during the previous step, so its
``generation_s`` is the step's wait for the next batch (``time/next_batch_wait_s``, generation
that outlasted the step's own work) and ``generation_overlapped_s`` the batch's whole generation
time; the split's parts then still add up to the step.

Usage::

    pip install -e '.[bench]'      # TRL (and accelerate), never in the main install
    python benchmarks/bench_vs_trl.py [--steps 25] [--pairs 3] [--quick] [--configs grpo_on_policy,sdpg]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
CONFIGS = ("grpo_on_policy", "grpo_off_policy_1", "sdpg")
FIRST_TIMED_STEP = 3  # 1-based: steps 1 and 2 are warm-up
NOTES = [
    "TRL: loss_type=dapo (token mean over the whole batch = the project's token-mean), scale_rewards=group "
    "(std-normalised group advantages, as the project), epsilon 0.2 both sides, one update per batch",
    "TRL generates with transformers generate() (no vLLM) in its own process with --trl-threads torch threads "
    "(default 2); the project runs its embedded layout (torchrun ranks + the CPU rollout server, "
    "OMP_NUM_THREADS=1 each)",
    "TRL updates on the 128 completions in one batch, the project in micro-batches of train.micro_batch_size; "
    "TRL calls the verifier in-process, the project through its verifier worker pool",
    "TRL is strictly on-policy in every pair; it has no off-policy overlap without vLLM",
    "TRL has no SDPG: the sdpg line compares project SDPG with TRL GRPO",
    "the project's split also has weight sync and rollout overhead (verifier, batching, broadcast), TRL's the "
    "reward and advantage glue: both under other_s",
    "off-policy project runs: generation_s is the wait for the overlapped next batch, generation_overlapped_s "
    "its whole generation time",
]


def _free_port() -> int:
    from megatron_sdpg.testing.distributed import free_port

    return free_port()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _die_with_parent():
    from megatron_sdpg.rollout.launcher import _die_with_parent as make

    return make(os.getpid())


def _run_child(cmd: list[str], env: dict, timeout_s: float, log_path: str) -> int:
    """Runs ``cmd`` in its own session (killed with it on timeout or interrupt); returns its rc."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True, preexec_fn=_die_with_parent())
        try:
            return proc.wait(timeout=timeout_s)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this child leads: torchrun, its ranks, the server
            proc.wait()
            raise


def _tail(path: str, n: int = 3000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]


# ----------------------------------------------------------------------------------------------- project


def project_overrides(name: str, off_policy_steps: int) -> list[str]:
    """The dotted overrides of one project configuration (on top of tiny_cpu.yaml)."""
    common = ["algorithm.alpha=1e-3", "optimizer.lr=3e-5", "rollout.sampling.temperature=1.0",
              "rollout.sampling.max_new_tokens=48", "rollout.n_samples=8", "train.prompts_per_step=16"]
    if name == "sdpg":
        return common
    grpo = [*common, "algorithm.preset=grpo", "algorithm.beta_base=0.0", "algorithm.ref_kl_mode=k3"]
    if name == "grpo_off_policy_1":
        grpo.append(f"rollout.off_policy_steps={off_policy_steps}")
    return grpo


def off_policy_refusal(off_policy_steps: int) -> str | None:
    """None when this trainer accepts ``rollout.off_policy_steps``; else its one-line refusal."""
    from megatron_sdpg.config.errors import ConfigError
    from megatron_sdpg.config.loader import load_config

    try:
        load_config(CONFIG, project_overrides("grpo_off_policy_1", off_policy_steps))
    except ConfigError as err:
        return str(err).splitlines()[0]
    return None


def run_project(name: str, args, workdir: str, megatron_dir: str, tag: str = "") -> dict:
    """One project run of ``args.steps`` steps; per-step figures from its ``metrics.jsonl``."""
    run_dir = os.path.join(workdir, f"project_{name}{tag}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={_free_port()}", "-m", "megatron_sdpg.train", "--config", CONFIG,
           f"model.hf_dir={args.model_dir}", f"model.megatron_dir={megatron_dir}", f"train.run_dir={run_dir}",
           f"train.steps={args.steps}", "train.eval_n=8", "train.eval_every=0", "checkpoint.save_every=0",
           f"rollout.base_port={_free_port()}", "logging.progress_bar=false",
           *project_overrides(name, args.off_policy_steps)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    log = os.path.join(workdir, f"project_{name}{tag}.log")
    rc = _run_child(cmd, env, args.timeout_s, log)
    if rc:
        raise RuntimeError(f"project run {name} failed (rc {rc}):\n{_tail(log)}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return summarise(project_steps(records))


def project_steps(records: list[dict]) -> list[dict]:
    """Per-step figures of a project run from its ``metrics.jsonl`` records, in step order."""
    steps = []
    for r in sorted((r for r in records if not r.get("final")), key=lambda r: r["step"]):
        gen, ref, upd = r["rollout/gen_time_s"], r.get("time/logprob_passes_s", 0.0), r["time/update_s"]
        overlap = {}
        if r.get("rollout/staleness", 0) >= 1:  # off-policy: generated while the previous step trained
            overlap, gen = {"generation_overlapped_s": gen}, 0.0
        # off-policy: after its own update a step waits for the next batch, generation that outlasted its work
        gen += r.get("time/next_batch_wait_s", 0.0)
        steps.append({"step_s": r["step_s"], "generation_s": gen, "reference_s": ref, "update_s": upd,
                      "other_s": r["step_s"] - gen - ref - upd, **overlap,
                      "train_tokens": r["rollout/prompt_tokens"] + r["rollout/completion_tokens"],
                      "prompt_tokens": r["rollout/prompt_tokens"],
                      "completion_tokens": r["rollout/completion_tokens"], "reward": r.get("reward")})
    return steps


# ----------------------------------------------------------------------------------------------- TRL


def summarise(steps: list[dict]) -> dict:
    """Medians over steps FIRST_TIMED_STEP..N (all steps when there are fewer)."""
    timed = steps[FIRST_TIMED_STEP - 1:] or steps
    out = {"steps": len(steps), "steps_timed": len(timed)}
    for key in ("step_s", "generation_s", "update_s", "reference_s", "other_s", "train_tokens", "prompt_tokens",
                "completion_tokens"):
        out[key] = _median([s[key] for s in timed])
    if all("generation_overlapped_s" in s for s in timed):
        out["generation_overlapped_s"] = _median([s["generation_overlapped_s"] for s in timed])
    out["train_tokens_per_s"] = _median([s["train_tokens"] / s["step_s"] for s in timed])
    out["mean_reward"] = _median([s["reward"] for s in timed if s.get("reward") is not None])
    return out


def run_trl(args, workdir: str, index: int) -> dict:
    """One TRL run in a child process (this script with ``--trl-worker``)."""
    out = os.path.join(workdir, f"trl_{index}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--trl-worker", out, "--steps", str(args.steps),
           "--model-dir", args.model_dir, "--trl-threads", str(args.trl_threads)]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(args.trl_threads),
           "TOKENIZERS_PARALLELISM": "false"}
    log = os.path.join(workdir, f"trl_{index}.log")
    rc = _run_child(cmd, env, args.timeout_s, log)
    if rc:
        raise RuntimeError(f"TRL run {index} failed (rc {rc}):\n{_tail(log)}")
    with open(out) as f:
        return json.load(f)


def trl_worker(out_path: str, model_dir: str, steps: int, threads: int) -> None:
    """Trains the HF model with TRL's GRPOTrainer on the project's prompts; writes per-step timings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_sdpg.config.loader import load_config
    from megatron_sdpg.data.build import build_prompt_builder, build_prompt_source
    from megatron_sdpg.data.tasks import build_task
    from megatron_sdpg.rewards.registry import resolve_verifier

    torch.set_num_threads(threads)
    cfg = load_config(CONFIG, [f"model.hf_dir={model_dir}", *project_overrides("grpo_on_policy", 0)])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    builder = build_prompt_builder(tokenizer, cfg.data)
    task = build_task(cfg.data)
    source = build_prompt_source(task, cfg.data, batch_size=cfg.train.prompts_per_step)
    problems = [p for _ in range(steps) for p in source.next_batch()]  # the project's order, step by step
    texts = [builder.student_text(p) for p in problems]
    mismatched = sum(tokenizer(t)["input_ids"] != builder.student_ids(p) for t, p in zip(texts, problems))
    dataset = Dataset.from_dict({"prompt": texts, "answer": [p.answer for p in problems]})
    verify = resolve_verifier(cfg.reward.verifier or task.default_verifier)
    right, wrong = cfg.reward.correct_reward, cfg.reward.wrong_reward

    timing: list[dict] = []  # one record per optimizer step
    seen: list[list[str]] = []  # the prompts TRL trained on, per step

    def reward(completions, answer, **_):
        scores = [right if verify(c, a) else wrong for c, a in zip(completions, answer)]
        timing[-1]["reward"] = sum(scores) / len(scores)
        return scores

    n = cfg.rollout.n_samples
    trl_args = GRPOConfig(
        output_dir=os.path.join(os.path.dirname(out_path), "trl_output"), use_cpu=True, bf16=False, seed=cfg.train.seed,
        max_steps=steps, per_device_train_batch_size=cfg.train.prompts_per_step * n, gradient_accumulation_steps=1,
        num_generations=n, max_completion_length=cfg.rollout.sampling.max_new_tokens,
        temperature=cfg.rollout.sampling.temperature, top_p=1.0, top_k=0, beta=cfg.algorithm.alpha,
        loss_type="dapo", scale_rewards="group", epsilon=0.2, num_iterations=1, shuffle_dataset=False,
        learning_rate=cfg.optimizer.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=cfg.optimizer.clip_grad,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        use_vllm=False, log_completions=False,
    )

    class Timed(GRPOTrainer):
        """GRPOTrainer with its phases timed into the current step's record."""

        def _add(self, key: str, value: float) -> None:
            timing[-1][key] = timing[-1].get(key, 0.0) + value

        def _generate(self, prompts):
            t0 = time.perf_counter()
            result = super()._generate(prompts)
            self._add("generation_s", time.perf_counter() - t0)
            return result

        def _get_per_token_logps_and_entropies(self, model, *a, **kw):
            t0 = time.perf_counter()
            result = super()._get_per_token_logps_and_entropies(model, *a, **kw)
            if model is self.ref_model:
                self._add("reference_s", time.perf_counter() - t0)
            return result

        def _generate_and_score_completions(self, inputs):
            seen.append(sorted(x["prompt"] for x in inputs))
            t0 = time.perf_counter()
            batch = super()._generate_and_score_completions(inputs)
            self._add("prepare_s", time.perf_counter() - t0)
            completion, prompt = float(batch["completion_mask"].sum()), float(batch["prompt_mask"].sum())
            self._add("completion_tokens", completion)
            self._add("prompt_tokens", prompt)
            self._add("train_tokens", completion + prompt)
            return batch

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            timing.append({"t0": time.perf_counter()})

        def on_step_end(self, *_, **__):
            timing[-1]["step_s"] = time.perf_counter() - timing[-1].pop("t0")

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = Timed(model=model, reward_funcs=reward, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                    callbacks=[StepClock()])
    trainer.train()
    steps_out = []
    for rec in timing:
        gen, ref = rec.get("generation_s", 0.0), rec.get("reference_s", 0.0)
        update = rec["step_s"] - rec.get("prepare_s", 0.0)  # forward + backward + optimizer
        steps_out.append({**rec, "generation_s": gen, "reference_s": ref, "update_s": update,
                          "other_s": rec["step_s"] - gen - ref - update})
    per_step = cfg.train.prompts_per_step
    expected = [sorted(texts[k * per_step:(k + 1) * per_step] * n) for k in range(steps)]
    result = {**summarise(steps_out), "prompt_ids_mismatched": mismatched, "prompts_in_project_order": seen == expected,
              "trl_version": _version("trl"), "threads": threads}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ----------------------------------------------------------------------------------------------- driver


def convert(model_dir: str, workdir: str, timeout_s: float) -> str:
    """The Megatron conversion the project trains (as examples/run_tiny_cpu.sh makes it)."""
    out = os.path.join(workdir, "tiny_model.megatron")
    log = os.path.join(workdir, "convert.log")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "convert_hf_to_megatron.py"), "--hf-dir", model_dir,
           "--megatron-dir", out]
    rc = _run_child(cmd, {**os.environ, "PYTHONPATH": ROOT}, timeout_s, log)
    if rc:
        raise RuntimeError(f"conversion failed (rc {rc}):\n{_tail(log)}")
    return out


def compare(name: str, project: dict, trl: dict) -> dict:
    """One configuration's JSON line."""
    ratio = project["train_tokens_per_s"] / trl["train_tokens_per_s"] if trl["train_tokens_per_s"] else None
    return {"config": name, "throughput_ratio": ratio, "project": project, "trl": trl}


def median_pair(name: str, pairs: dict[str, list[dict]]) -> dict:
    """The configuration's line of the pair with the median ``throughput_ratio`` (the lower middle one
    of an even count), with every pair's ratio, and ``sdpg_grpo_ratio`` as the median over pairs."""
    runs = pairs[name]
    ranked = sorted(range(len(runs)), key=lambda k: runs[k]["throughput_ratio"] or 0.0)
    line = dict(runs[ranked[(len(runs) - 1) // 2]])
    if len(runs) > 1:
        line["throughput_ratio_pairs"] = [r["throughput_ratio"] for r in runs]
    if name == "sdpg" and len(pairs.get("grpo_on_policy", [])) == len(runs):
        per_pair = [s["project"]["step_s"] / g["project"]["step_s"] for s, g in zip(runs, pairs["grpo_on_policy"])]
        line["sdpg_grpo_ratio"] = _median(per_pair)
        if len(runs) > 1:
            line["sdpg_grpo_ratio_pairs"] = per_pair
    line["notes"] = NOTES
    return line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=os.path.join(ROOT, "artifacts", "tiny_model"))
    p.add_argument("--steps", type=int, default=25, help="optimizer steps per run (medians of steps 3..N)")
    p.add_argument("--quick", action="store_true", help="3 steps per run (a smoke test of the whole bench)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--off-policy-steps", type=int, default=1, help="rollout.off_policy_steps of grpo_off_policy_1")
    p.add_argument("--nproc", type=int, default=2, help="torchrun ranks of the project runs")
    p.add_argument("--trl-threads", type=int, default=2, help="torch threads of the TRL runs")
    p.add_argument("--pairs", type=int, default=1,
                   help="alternations of every configuration (project, TRL); each line reports the median pair")
    p.add_argument("--timeout-s", type=float, default=3600, help="limit of each child run")
    p.add_argument("--workdir", default="", help="keep run directories and logs here (default: a temp dir)")
    p.add_argument("--trl-worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.steps = 3
    args.model_dir = os.path.abspath(args.model_dir)
    if args.steps < 1:
        p.exit(2, f"error: --steps must be >= 1, got {args.steps}\n")
    if args.pairs < 1:
        p.exit(2, f"error: --pairs must be >= 1, got {args.pairs}\n")
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or not configs:
        p.exit(2, f"error: --configs: unknown {bad or configs!r}; choose from {','.join(CONFIGS)}\n")
    args.configs = configs
    if args.workdir and os.path.isdir(args.workdir) and os.listdir(args.workdir):
        p.exit(2, f"error: --workdir: {args.workdir} is not empty (runs there would resume or mix); give a fresh one\n")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        p.exit(2, f"error: --model-dir: no model in {args.model_dir} (build one with tools/make_tiny_model.py)\n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.trl_worker:
        trl_worker(args.trl_worker, args.model_dir, args.steps, args.trl_threads)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("error: trl is not installed; install the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    configs = list(args.configs)
    if "grpo_off_policy_1" in configs:
        refusal = off_policy_refusal(args.off_policy_steps)
        if refusal:
            configs.remove("grpo_off_policy_1")
            print(json.dumps({"config": "grpo_off_policy_1", "skipped": f"this trainer refuses "
                              f"rollout.off_policy_steps={args.off_policy_steps}: {refusal}"}), flush=True)
    if not configs:
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        workdir = os.path.abspath(args.workdir) if args.workdir else tmp
        os.makedirs(workdir, exist_ok=True)
        try:
            megatron_dir = convert(args.model_dir, workdir, args.timeout_s)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        pairs: dict[str, list[dict]] = {name: [] for name in configs}
        for k in range(args.pairs):  # alternated: project, TRL, project, TRL, ... then again
            for i, name in enumerate(configs):
                tag = f"_pair{k}" if args.pairs > 1 else ""
                try:
                    project = run_project(name, args, workdir, megatron_dir, tag)
                    pairs[name].append(compare(name, project, run_trl(args, workdir, k * len(configs) + i)))
                except RuntimeError as err:  # a child run failed: its log's tail says why
                    print(f"error: {err}", file=sys.stderr)
                    return 1
                if k == args.pairs - 1:  # the configuration's last pair: its line now (grpo_on_policy comes first)
                    print(json.dumps(median_pair(name, pairs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
