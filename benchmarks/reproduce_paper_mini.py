"""The paper's claim in miniature: GRPO, OPSD and SDPG (+ ablations) on the synthetic task.

Each method is one real trainer run (``torchrun -m megatron_sdpg.train``, 2 ranks, the tiny
model, ``examples/configs/tiny_cpu.yaml``) with explicit ``algorithm.*`` overrides: the YAML
file sets SDPG's beta/alpha/gate/windows; a preset named on the command line outranks the file
for the fields it sets (file < preset < other CLI values), and every method names every field it
depends on anyway. All methods share
the steps, prompts x samples, seed list and one learning rate (``--lr``): "hyperparameters
tuned equally" here means one shared lr/batch chosen before the comparison, not a per-method
sweep.

After each run, mean@k at the task config's rollout temperature (1.0 for ``synthetic``, 0.7 for
``synthetic-long``) is computed with ``python -m megatron_sdpg.eval`` on
the last weights synced to disk (``rollout.sync_strategy=disk`` writes
``RUN_DIR/weight_sync/v<step>`` with config and tokenizer files after every update; the
newest complete one holds the final weights).

Writes ``OUT/results.json``, ``OUT/results.md`` (a Table-1-like table: last and best held-out
greedy accuracy, accuracy with the privileged context, mean@k; mean +- sd over seeds) and
``OUT/plots/*.png`` (Figure-3-like curves over steps, one line per method, mean over seeds).

Usage::

    python benchmarks/reproduce_paper_mini.py --quick           # 1 seed, GRPO/OPSD/SDPG
    python benchmarks/reproduce_paper_mini.py --full            # 3 seeds, every method + ablations
    python benchmarks/reproduce_paper_mini.py --decomposition   # 3 seeds, what carries OPSD's lead
    python benchmarks/reproduce_paper_mini.py --aggregate-only  # rebuild tables/plots from OUT/runs
    python benchmarks/reproduce_paper_mini.py --task synthetic-long    # (= --full for this task)
        # 3 seeds, 50 steps: GRPO/OPSD/SDPG/SDPG gated + the decomposition's best variant (the frozen
        # initial teacher) on the long task, artifacts/tiny_model_long (--variant adds one more)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(ROOT, "artifacts", "tiny_model")  # what examples/run_tiny_cpu.sh builds
# --task: the trainer config and the default --model-dir of each task.
TASKS: dict[str, dict[str, str]] = {
    "synthetic": dict(config=os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml"), model_dir=DEFAULT_MODEL),
    "synthetic-long": dict(config=os.path.join(ROOT, "examples", "configs", "tiny_cpu_long.yaml"),
                           model_dir=os.path.join(ROOT, "artifacts", "tiny_model_long")),
}

# Fields the YAML sets (beta_base, windows, gate, alpha) plus the ones a method changes:
# every method states all of them so that nothing leaks from the file or a preset.
SDPG_URKL = dict(preset="sdpg", beta_base=0.1, beta_warmup_steps=0, beta_decay_steps=0, distill_gate=False,
                 alpha=1e-3, ref_kl_mode="urkl", distill_mask_after_divergence=False)
# OPSD as the preset defines it, every field it differs from SDPG-URKL in stated.
OPSD = dict(preset="opsd", beta_base=1.0, beta_warmup_steps=0, beta_decay_steps=0, distill_gate=False, alpha=0.0)
METHODS: dict[str, dict] = {
    # GRPO: no distillation, k3 reference KL in the loss with the same alpha.
    "grpo": dict(preset="grpo", beta_base=0.0, beta_warmup_steps=0, beta_decay_steps=0, distill_gate=False,
                 alpha=1e-3, ref_kl_mode="k3"),
    # OPSD: no reward, JSD(0.5) to the frozen initial policy with the context, no reference KL.
    "opsd": dict(OPSD),
    "sdpg-urkl": dict(SDPG_URKL),
    "sdpg-ufkl": dict(SDPG_URKL, ref_kl_mode="ufkl"),
    # Ablations of sdpg-urkl, one change each.
    "sdpg-beta0": dict(SDPG_URKL, beta_base=0.0),  # = GRPO with SDPG's alpha / URKL / SG[rho]
    "sdpg-alpha0": dict(SDPG_URKL, alpha=0.0),
    "sdpg-gated": dict(SDPG_URKL, distill_gate=True),
    "sdpg-schedule": dict(SDPG_URKL, beta_warmup_steps="WARM", beta_decay_steps="DECAY"),
    # No distillation after the first response token that is not the teacher's greedy choice.
    "sdpg-maskwrong": dict(SDPG_URKL, distill_mask_after_divergence=True),
    # Post hoc (after the full comparison showed OPSD ahead): SDPG with OPSD's distillation weight.
    "sdpg-beta1": dict(SDPG_URKL, beta_base=1.0),
    # Decomposition of OPSD's lead (--decomposition): from SDPG-URKL, one of OPSD's differences at a time ...
    "sdpg-initial": dict(SDPG_URKL, teacher_source="initial"),  # the frozen initial policy as the teacher
    "sdpg-jsd": dict(SDPG_URKL, distill_divergence="jsd", jsd_beta=0.5),  # JSD(0.5) for the reverse KL
    "sdpg-nopg": dict(SDPG_URKL, policy_gradient_term=False),  # distillation + reference KL, no PG term
    # ... and from OPSD, one of SDPG's at a time.
    "opsd-current": dict(OPSD, teacher_source="current"),  # the current weights as the teacher
    "opsd-rkl": dict(OPSD, distill_divergence="reverse_kl"),  # the reverse KL for JSD(0.5)
}
POST_HOC = ("sdpg-beta1",)  # run only when named with --methods; not part of --full
# --decomposition: SDPG-URKL and OPSD, each one-change variant between them, and GRPO as the floor.
DECOMPOSITION_VARIANTS = ("sdpg-initial", "sdpg-jsd", "sdpg-nopg", "opsd-current", "opsd-rkl")
DECOMPOSITION_METHODS = ("sdpg-urkl", "opsd", *DECOMPOSITION_VARIANTS[:3], "sdpg-beta1", *DECOMPOSITION_VARIANTS[3:],
                         "grpo")
QUICK_METHODS = ("grpo", "opsd", "sdpg-urkl")
# --task synthetic-long: GRPO, OPSD, SDPG ungated and gated, and the decomposition's best variant of SDPG
# (frozen initial teacher, 24.9 vs SDPG's 25.7 at step 120; chosen before any long-task run) (+ --variant).
LONG_METHODS = ("grpo", "opsd", "sdpg-urkl", "sdpg-gated", "sdpg-initial")
# --task synthetic-long --full: 50 steps, evaluations at 0 / 25 / 50, so that 15 runs (5 methods x 3 seeds) with
# mean@4 on 500 problems fit in ~90 minutes of this 2-core machine (a step costs ~3.5x the synthetic task's).
LONG_FULL_STEPS, LONG_EVAL_EVERY = 50, 25
LABELS = {"grpo": "GRPO", "opsd": "OPSD", "sdpg-urkl": "SDPG-URKL", "sdpg-ufkl": "SDPG-UFKL",
          "sdpg-beta0": "SDPG beta=0", "sdpg-alpha0": "SDPG alpha=0", "sdpg-gated": "SDPG gated",
          "sdpg-schedule": "SDPG schedule", "sdpg-maskwrong": "SDPG KL masked after 1st wrong token",
          "sdpg-beta1": "SDPG beta=1", "sdpg-initial": "SDPG, frozen initial teacher",
          "sdpg-jsd": "SDPG, JSD(0.5)", "sdpg-nopg": "SDPG, no PG term", "opsd-current": "OPSD, current teacher",
          "opsd-rkl": "OPSD, reverse KL"}
# Training signals averaged over each run's last SIGNAL_STEPS steps (signals_table).
SIGNALS, SIGNAL_STEPS = ("reward", "entropy", "response_length"), 10
# Figure-3 panels: (file stem, title, metric key).
CURVES = (("heldout_accuracy", "Held-out greedy accuracy", "eval/accuracy"),
          ("heldout_accuracy_with_context", "Held-out accuracy with the context", "eval/accuracy_with_context"),
          ("reward", "Reward", "reward"), ("entropy", "Entropy", "entropy"),
          ("response_length", "Response length (tokens)", "response_length"),
          ("distill_kl", "Distillation divergence (OPSD: JSD)", "distill_kl"))


def method_overrides(name: str, steps: int) -> list[str]:
    """Dotted ``algorithm.*`` overrides of one method.

    The schedule ablation scales the paper's windows (T_warm 50, T_decay 350 of 400 steps)
    to ``steps``.

    Raises:
        KeyError: an unknown method name (the message lists the known ones).
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    scaled = {"WARM": max(1, round(steps * 50 / 400)), "DECAY": max(1, round(steps * 350 / 400))}
    out = []
    for key, value in METHODS[name].items():
        value = scaled.get(value, value) if isinstance(value, str) else value
        out.append(f"algorithm.{key}={value}")
    return out


def run_overrides(method: str, seed: int, steps: int, lr: float, run_dir: str, model_dir: str, layout: str,
                  prompts: int, samples: int, eval_every: int, eval_n: int) -> list[str]:
    """Every command-line override of one trainer run (shared settings, then the method's)."""
    tp = {"tp2": 2, "dp2": 1}[layout]
    megatron_dir = model_dir.rstrip("/") + ".megatron"
    shared = [f"model.hf_dir={model_dir}", f"train.run_dir={run_dir}", f"train.steps={steps}", f"train.seed={seed}",
              f"train.prompts_per_step={prompts}", f"rollout.n_samples={samples}", f"optimizer.lr={lr}",
              f"train.eval_every={eval_every}", f"train.eval_n={eval_n}", f"parallel.tp={tp}",
              "rollout.sync_strategy=disk", "logging.progress_bar=false"]
    if os.path.isfile(os.path.join(megatron_dir, "megatron_sdpg_model.json")):
        shared.append(f"model.megatron_dir={megatron_dir}")
    return shared + method_overrides(method, steps)


def rollout_temperature(config_path: str) -> float:
    """``rollout.sampling.temperature`` of a trainer YAML, as the trainer resolves it (defaults included)."""
    from megatron_sdpg.config.loader import load_config

    return load_config(config_path).rollout.sampling.temperature


def latest_hf_weights(run_dir: str) -> str | None:
    """The newest complete ``weight_sync/v<N>`` (config.json + safetensors), or None."""
    sync = os.path.join(run_dir, "weight_sync")
    if not os.path.isdir(sync):
        return None
    versions = sorted((int(m.group(1)), d) for d in os.listdir(sync) if (m := re.fullmatch(r"v(\d+)", d)))
    for _, d in reversed(versions):
        path = os.path.join(sync, d)
        files = os.listdir(path)
        if "config.json" in files and any(f.endswith(".safetensors") for f in files):
            return path
    return None


# ------------------------------------------------------------------ aggregation (pure)

def _read_jsonl(path: str) -> list[dict]:
    by_step: dict[tuple[int, bool], dict] = {}
    if not os.path.isfile(path):
        raise ValueError(f"{path}: missing (the run was never trained here)")
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            by_step[(rec["step"], bool(rec.get("final")))] = rec
    return [by_step[k] for k in sorted(by_step)]


def summarize_run(run_dir: str, samples_k: int = 4) -> dict:
    """One run's figures from ``metrics.jsonl``, ``summary.json`` and ``meank.json`` (optional).

    Returns:
        ``{"last", "best", "with_context", "before", "mean@k", "curves": {key: [[step, value], ...]}}``;
        accuracy figures in [0, 1], None where absent. ``best`` is over the evaluations after
        training started (the periodic ones and the final one), not the one before.
    """
    records = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    final = [r for r in records if r.get("final")]
    if not final:
        raise ValueError(f"{run_dir}/metrics.jsonl: no final record (the run did not finish)")
    final = final[-1]
    summary = {}
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    evals = [r["eval/accuracy"] for r in records if r.get("eval/accuracy") is not None]
    curves: dict[str, list[list[float]]] = {}
    for _, _, key in CURVES:
        pts = [[r["step"] + (0 if r.get("final") else 1), r[key]] for r in records
               if r.get(key) is not None and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        curves[key] = pts
    for key, before_key in (("eval/accuracy", "accuracy_before"),
                            ("eval/accuracy_with_context", "accuracy_with_context_before")):
        if summary.get(before_key) is not None:
            curves[key] = [[0, summary[before_key]]] + curves[key]
    meank = None
    path = os.path.join(run_dir, "meank.json")
    if os.path.isfile(path):
        with open(path) as f:
            meank = json.load(f).get(f"mean@{samples_k}")
    late = {key: [v for _, v in curves.get(key, [])][-SIGNAL_STEPS:] for key in SIGNALS}
    return {"last": final.get("eval/accuracy"), "best": max(evals) if evals else None,
            "with_context": final.get("eval/accuracy_with_context"), "before": summary.get("accuracy_before"),
            f"mean@{samples_k}": meank, "curves": curves,
            **{key: statistics.fmean(vals) if vals else None for key, vals in late.items()}}


def signals_table(runs: dict[str, list[dict]]) -> str:
    """Reward, entropy and response length over each run's last ``SIGNAL_STEPS`` training steps,
    in Markdown (mean ± sd over seeds; reward in percent, entropy in nats/token, length in tokens)."""
    lines = ["| method | reward (%) | entropy | response length |", "|---|---|---|---|"]
    for method, rs in runs.items():
        cells = []
        for key, scale, fmt in (("reward", 100, ".1f"), ("entropy", 1, ".3f"), ("response_length", 1, ".1f")):
            stat = mean_sd([r.get(key) for r in rs])
            cells.append("n/a" if stat["mean"] is None else f"{scale * stat['mean']:{fmt}}"
                         + ("" if stat["sd"] is None else f" ± {scale * stat['sd']:{fmt}}"))
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_sd(values: list[float | None]) -> dict:
    """``{"mean", "sd", "n", "values"}`` over the non-None values (sd None for n < 2)."""
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None, "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals), "values": vals}


def aggregate(runs: dict[str, list[dict]], samples_k: int = 4) -> dict:
    """Per method, mean/sd over seeds of each table figure (``runs``: method -> per-seed summaries)."""
    figures = ("before", "last", "best", "with_context", f"mean@{samples_k}")
    return {m: {fig: mean_sd([r.get(fig) for r in rs]) for fig in figures} for m, rs in runs.items()}


def _cell(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    cell = f"{100 * stat['mean']:.1f}"
    if stat["sd"] is not None:
        cell += f" ± {100 * stat['sd']:.1f}"
    return cell


def markdown_table(table: dict, samples_k: int = 4, temperature: float = 1.0) -> str:
    """Table 1 in Markdown: accuracies in percent, mean ± sd over seeds (n seeds)."""
    cols = (("before", "before"), ("last", "last"), ("best", "best"), ("with_context", "with context (last)"),
            (f"mean@{samples_k}", f"mean@{samples_k} T={temperature:g}"))
    lines = ["| method | seeds | " + " | ".join(c for _, c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for method, stats in table.items():
        n = max(s["n"] for s in stats.values())
        lines.append(f"| {LABELS.get(method, method)} | {n} | " + " | ".join(_cell(stats[k]) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def accuracy_by_step_table(runs: dict[str, list[dict]], key: str = "eval/accuracy") -> str:
    """Held-out greedy accuracy (``key``: without or with the context) at every evaluation step all
    of a method's seeds have, in Markdown (percent, mean ± sd over seeds), one row per method."""
    per_method = {}
    for method, rs in runs.items():
        maps = [dict((p[0], p[1]) for p in r["curves"].get(key, [])) for r in rs]
        steps = sorted(set.intersection(*(set(m) for m in maps))) if maps else []
        per_method[method] = {s: mean_sd([m[s] for m in maps]) for s in steps}
    steps = sorted({s for stats in per_method.values() for s in stats})
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for method, stats in per_method.items():
        cells = [_cell(stats[s]) if s in stats else "" for s in steps]
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """Pointwise mean over seeds at the steps every seed has."""
    if not curves:
        return []
    common = set.intersection(*({p[0] for p in c} for c in curves))
    maps = [dict((p[0], p[1]) for p in c) for c in curves]
    return [[s, statistics.fmean(m[s] for m in maps)] for s in sorted(common)]


def method_colors(methods: list[str]) -> dict[str, object]:
    """One distinct matplotlib colour per plotted method (up to 20), in plotting order."""
    import matplotlib.pyplot as plt

    palette = [f"C{i}" for i in range(10)] if len(methods) <= 10 else [plt.cm.tab20(i) for i in range(20)]
    return {method: palette[i % len(palette)] for i, method in enumerate(methods)}


def write_plots(runs: dict[str, list[dict]], out_dir: str) -> list[str]:
    """One PNG per curve and ``figure3.png`` (all panels), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    fig_all, axes = plt.subplots(2, 3, figsize=(15, 8))
    colors = method_colors(list(runs))
    for ax_all, (stem, title, key) in zip(axes.flat, CURVES):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, rs in runs.items():
            pts = mean_curve([r["curves"].get(key, []) for r in rs])
            if pts:
                for a in (ax, ax_all):
                    a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 8 else None,
                           color=colors[method], label=LABELS.get(method, method))
        for a in (ax, ax_all):
            a.set_title(title)
            a.set_xlabel("step")
            a.grid(alpha=0.3)
            if a.get_legend_handles_labels()[0]:  # e.g. no divergence curve for GRPO alone
                a.legend(fontsize=7)
        path = os.path.join(out_dir, f"{stem}.png")
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=100)
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        written.append(path)
    path = os.path.join(out_dir, "figure3.png")
    fig_all.tight_layout()
    fig_all.savefig(path + ".tmp.png", dpi=100)
    os.replace(path + ".tmp.png", path)
    plt.close(fig_all)
    return written + [path]


def model_sha256(model_dir: str) -> str | None:
    """sha256 of the model's ``model.safetensors`` (which start model a table used), or None."""
    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ running

def _free_port() -> int:
    sys.path.insert(0, ROOT)
    from megatron_sdpg.testing.distributed import free_port

    return free_port()


def train_one(method: str, seed: int, args, run_dir: str) -> float:
    """One trainer run; returns its wall time in seconds. Raises RuntimeError on failure."""
    overrides = run_overrides(method, seed, args.steps, args.lr, run_dir, args.model_dir, args.layout,
                              args.prompts, args.samples, args.eval_every, args.eval_n)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "megatron_sdpg.train", "--config", TASKS[args.task]["config"],
           *overrides, f"rollout.base_port={_free_port()}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(run_dir, ignore_errors=True)  # never resume from a stale run's checkpoints
    os.makedirs(run_dir)
    _write_atomic(os.path.join(run_dir, "command.json"), json.dumps(cmd, indent=1))
    start = time.perf_counter()
    from megatron_sdpg.testing.processes import kill_tree

    with open(os.path.join(run_dir, "train.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            proc.wait(timeout=7200)
        finally:  # a timeout or Ctrl-C: torchrun, its ranks and the CPU server go too, by PID
            if proc.poll() is None:
                kill_tree(proc.pid)
    if proc.returncode:
        raise RuntimeError(f"{method} seed {seed} failed (rc {proc.returncode}); see {run_dir}/train.log")
    return time.perf_counter() - start


def meank_done(run_dir: str, temperature: float) -> bool:
    """Whether ``run_dir/meank.json`` exists and was sampled at ``temperature``."""
    try:
        with open(os.path.join(run_dir, "meank.json")) as f:
            return float(json.load(f).get("temperature", 1.0)) == temperature
    except (OSError, ValueError, TypeError, AttributeError):  # missing, not JSON, not an object, no number
        return False


def eval_meank(run_dir: str, args) -> None:
    """mean@k at ``args.meank_temperature`` on the final synced weights -> ``run_dir/meank.json``."""
    hf = latest_hf_weights(run_dir)
    if hf is None:
        raise RuntimeError(f"{run_dir}/weight_sync: no complete HF weights")
    # Synced weights carry the HF side files; the task metadata (sdpg_task.json) comes from the model dir.
    for name in os.listdir(args.model_dir):
        if not name.endswith((".safetensors", ".bin")) and not os.path.exists(os.path.join(hf, name)):
            shutil.copy2(os.path.join(args.model_dir, name), os.path.join(hf, name))
    cmd = [sys.executable, "-m", "megatron_sdpg.eval", "--hf-dir", hf, "--task", args.task, "--n", str(args.eval_n),
           "--samples", str(args.meank), "--temperature", str(args.meank_temperature), "--threads", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
                          timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"mean@k eval of {hf} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["hf_dir"] = hf
    _write_atomic(os.path.join(run_dir, "meank.json"), json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="1 seed, 40 steps, GRPO/OPSD/SDPG-URKL (the default, except for --task synthetic-long, "
                           "whose default is its --full comparison)")
    mode.add_argument("--full", action="store_true", help="3 seeds, 120 steps, every method and ablation")
    mode.add_argument("--decomposition", action="store_true",
                      help="3 seeds, 120 steps: SDPG-URKL, OPSD and one-change variants between them, GRPO")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "paper_mini"))
    parser.add_argument("--task", choices=sorted(TASKS), default="synthetic",
                        help="task: its trainer config and default --model-dir (TASKS)")
    parser.add_argument("--model-dir", default=None, help="default: the task's (artifacts/tiny_model[_long])")
    parser.add_argument("--lr", type=float, default=3e-5, help="one learning rate shared by every method")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=sorted(METHODS))
    parser.add_argument("--variant", default=None, choices=sorted(METHODS),
                        help="one more method appended to the method list (the slot for item 1's best variant)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-n", type=int, default=500)
    parser.add_argument("--meank", type=int, default=4, help="k of mean@k (0 = skip)")
    parser.add_argument("--meank-temperature", type=float, default=None,
                        help="sampling temperature of mean@k (default: the task config's rollout temperature)")
    parser.add_argument("--layout", choices=("tp2", "dp2"), default="dp2",
                        help="2 ranks as TP2 or DP2 (DP2 measured faster on the tiny model: 39 s vs 49 s for 4 steps)")
    parser.add_argument("--no-reuse", dest="reuse", action="store_false",
                        help="retrain runs that already have a summary.json in OUT/runs")
    parser.add_argument("--aggregate-only", action="store_true", help="rebuild results from OUT/runs")
    args = parser.parse_args(argv)
    if args.meank_temperature is not None and not (math.isfinite(args.meank_temperature)
                                                   and args.meank_temperature >= 0):
        parser.error(f"--meank-temperature: must be a finite number >= 0, got {args.meank_temperature}")
    args.model_dir = args.model_dir or TASKS[args.task]["model_dir"]
    explicit_methods = args.methods is not None
    # --task synthetic-long alone reproduces its table (docs/results.md): its comparison is the full mode.
    args.full = args.full or (args.task == "synthetic-long" and not (args.quick or args.decomposition))
    full = args.full or args.decomposition
    long_full = args.task == "synthetic-long" and full
    args.steps = args.steps or (LONG_FULL_STEPS if long_full else 120 if full else 40)
    args.seeds = args.seeds or ([1, 2, 3] if full else [1])
    default_methods = ([m for m in METHODS if m not in POST_HOC + DECOMPOSITION_VARIANTS]
                       if args.full else list(DECOMPOSITION_METHODS) if args.decomposition else list(QUICK_METHODS))
    args.methods = args.methods or default_methods
    if args.task == "synthetic-long" and not explicit_methods:
        args.methods = list(LONG_METHODS)
    if args.variant and args.variant not in args.methods:
        args.methods.append(args.variant)
    args.eval_every = args.eval_every if args.eval_every is not None else (
        LONG_EVAL_EVERY if long_full else 40 if full else 20)
    if args.meank_temperature is None:
        args.meank_temperature = rollout_temperature(TASKS[args.task]["config"])
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"error: --model-dir {args.model_dir}: no config.json (build it with tools/make_tiny_model.py "
                 f"--task {args.task})")

    runs: dict[str, list[dict]] = {}
    timings = {}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = os.path.join(args.out, "runs", f"{method}_seed{seed}")
            done = os.path.isfile(os.path.join(run_dir, "summary.json"))
            timing = {}
            if not args.aggregate_only and not (done and args.reuse):
                timing["train_s"] = round(train_one(method, seed, args, run_dir), 1)
            if not args.aggregate_only and args.meank and not meank_done(run_dir, args.meank_temperature):
                t0 = time.perf_counter()
                eval_meank(run_dir, args)
                timing["meank_s"] = round(time.perf_counter() - t0, 1)
            if timing:
                timings[f"{method}_seed{seed}"] = timing
                print(json.dumps({"run": f"{method}_seed{seed}", **timing}), flush=True)
            try:
                runs.setdefault(method, []).append(summarize_run(run_dir, args.meank))
            except ValueError as e:  # e.g. --aggregate-only over runs that do not exist: one line, rc 2
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
    table = aggregate(runs, args.meank)
    settings = {k: getattr(args, k) for k in ("task", "full", "steps", "seeds", "methods", "lr", "prompts", "samples",
                                              "eval_every", "eval_n", "meank", "meank_temperature", "layout",
                                              "model_dir")}
    settings["overrides"] = {m: method_overrides(m, args.steps) for m in args.methods}
    settings["model_sha256"] = model_sha256(args.model_dir)
    result = {"settings": settings, "table": table, "timings": timings,
              "runs": {m: [{k: v for k, v in r.items() if k != "curves"} for r in rs] for m, rs in runs.items()}}
    os.makedirs(args.out, exist_ok=True)
    _write_atomic(os.path.join(args.out, "results.json"), json.dumps(result, indent=1))
    md = (f"# Paper in miniature ({'decomposition' if args.decomposition else 'full' if full else 'quick'} mode)\n\n"
          f"Task {args.task}; {args.steps} steps, {args.prompts} prompts x {args.samples} samples, lr {args.lr} "
          f"shared by every method, seeds {args.seeds}, {args.layout}; held-out accuracy on {args.eval_n} problems, percent, "
          f"mean ± sd over seeds.\n\n" + markdown_table(table, args.meank, args.meank_temperature)
          + "\nHeld-out greedy accuracy during training (percent, mean ± sd over seeds):\n\n"
          + accuracy_by_step_table(runs)
          + "\nHeld-out greedy accuracy with the privileged context during training:\n\n"
          + accuracy_by_step_table(runs, "eval/accuracy_with_context")
          + f"\nTraining signals, mean of the last {SIGNAL_STEPS} steps:\n\n" + signals_table(runs))
    _write_atomic(os.path.join(args.out, "results.md"), md)
    write_plots(runs, os.path.join(args.out, "plots"))
    print(md, flush=True)
    return result


if __name__ == "__main__":
    # SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so train_one's finally stops the run's whole tree.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
