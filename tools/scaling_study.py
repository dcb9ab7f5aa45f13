"""Scaling study: one config at several rank (local) or node (Slurm) counts.

Three modes, one output (``scaling.csv``, ``throughput.png``, ``step_split.png``
in ``--out``):

* local (default): runs the real trainer (``torchrun -m megatron_sdpg.train``)
  once per count of ``--ranks`` on this machine's CPUs, data-parallel by default
  (``parallel.tp=1``) or at a fixed ``--tp``, then collects the runs;
* ``--slurm``: submits ``--script`` once per count of ``--nodes`` with
  ``sbatch`` (``TRAIN_NODES``, ``RUN_DIR`` and the allocation size set per job;
  see ``examples/lib/launch.sh``) and writes ``manifest.json`` with the job ids;
  nothing is collected until the jobs have finished, unless ``--wait``: then it
  waits for every job to end (``scontrol show job``) and collects them at once;
* ``--collect RUN_DIR... | --manifest FILE``: reads finished runs.

Per run, after dropping ``--warmup`` steps: training tokens/s (prompt + completion
tokens of the step over ``step_s``, summed over steps), rollout tokens/s
(completion tokens over generation time) and the mean step-time split
(generation, log-prob passes, update, weight sync, the rest). Scaling efficiency
is ``throughput(N) / (N / N0 * throughput(N0))`` against the smallest count N0.
The global batch is fixed across counts (strong scaling) unless ``--weak``,
which scales ``train.prompts_per_step`` with ``N / N0``.

Usage::

    python tools/scaling_study.py --ranks 1 2 4 --out runs/scaling
    python tools/scaling_study.py --ranks 2 4 --tp 2 --weak
    python tools/scaling_study.py --slurm --nodes 2 4 8 --script examples/run_sdpg_70b.sh --out /shared/scaling
    python tools/scaling_study.py --manifest /shared/scaling/manifest.json
    python tools/scaling_study.py --slurm --wait --nodes 1 2 --rollout-nodes 1 --config examples/configs/tiny_cluster.yaml \
        --env ENGINE=cpu --env HF_DIR=/tmp/tiny --label "shared-core CPU, local Slurm: not a scaling result"
    python tools/scaling_study.py --collect 2=runs/a 4=runs/b
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_sdpg.plot import PlotError, load_records  # noqa: E402

# Step-time split: CSV column -> metrics.jsonl key.
PHASES = {"gen_s": "rollout/gen_time_s", "logprob_s": "time/logprob_passes_s", "update_s": "time/update_s",
          "sync_s": "time/sync_s"}
COLUMNS = ["count", "ranks", "layout", "run_dir", "steps_timed", "prompts_per_step", "tokens_per_s",
           "rollout_tokens_per_s", *PHASES, "other_s", "step_s", "ideal_tokens_per_s", "efficiency"]
DEFAULT_CONFIG = os.path.join(ROOT, "examples", "configs", "tiny_cpu.yaml")
DEFAULT_MODEL = os.path.join(ROOT, "artifacts", "tiny_model")


class StudyError(RuntimeError):
    """A bad input or a failed run, said in one line."""


# ----------------------------------------------------------------- aggregation

def summarize(records: list[dict], warmup: int, where: str) -> dict:
    """Throughput and mean step-time split of one run's step records.

    Args:
        records: ``metrics.jsonl`` records (one per step; the ``final`` eval record is skipped).
        warmup: Leading steps dropped.
        where: Named in errors (the run directory).

    Returns:
        ``steps_timed``, ``tokens_per_s``, ``rollout_tokens_per_s``, the phases of
        :data:`PHASES`, ``other_s`` (step time no phase accounts for) and ``step_s``.
    """
    steps = [r for r in records if not r.get("final")][warmup:]
    if not steps:
        raise StudyError(f"{where}: no step records left after dropping {warmup} warm-up step(s)")
    needed = ["step_s", "rollout/prompt_tokens", "rollout/completion_tokens", *PHASES.values()]
    for rec in steps:
        for key in needed:
            if not isinstance(rec.get(key), (int, float)):
                raise StudyError(f"{where}: step {rec.get('step')} has no numeric {key!r}")
    total_s = sum(r["step_s"] for r in steps)
    gen_s = sum(r["rollout/gen_time_s"] for r in steps)
    tokens = sum(r["rollout/prompt_tokens"] + r["rollout/completion_tokens"] for r in steps)
    out = {"steps_timed": len(steps), "tokens_per_s": tokens / total_s if total_s > 0 else 0.0,
           "rollout_tokens_per_s": sum(r["rollout/completion_tokens"] for r in steps) / gen_s if gen_s > 0 else 0.0}
    for col, key in PHASES.items():
        out[col] = sum(r[key] for r in steps) / len(steps)
    out["step_s"] = total_s / len(steps)
    out["other_s"] = max(out["step_s"] - sum(out[c] for c in PHASES), 0.0)
    return out


def _world_size(run_dir: str) -> int | None:
    """World size recorded by the trainer in ``summary.json`` (``... (world N)``), if any."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        match = re.search(r"\(world (\d+)\)", str(json.load(f).get("layout", "")))
    return int(match.group(1)) if match else None


def collect_run(run_dir: str, count: int | None, warmup: int) -> dict:
    """One CSV row (without efficiency) from a finished run directory.

    ``count`` is the scaled quantity (ranks locally, nodes on Slurm); when None,
    the world size from the run's ``summary.json``.
    """
    try:
        records = load_records(run_dir)
    except PlotError as exc:
        raise StudyError(str(exc)) from exc
    ranks = _world_size(run_dir)
    if count is None:
        if ranks is None:
            raise StudyError(f"{run_dir}: no summary.json with the world size; pass COUNT={run_dir}")
        count = ranks
    layout = ""
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            layout = str(json.load(f).get("layout", ""))
    row = {"count": count, "ranks": ranks if ranks is not None else "", "layout": layout,
           "run_dir": os.path.abspath(run_dir), "prompts_per_step": _prompts_per_step(run_dir),
           **summarize(records, warmup, run_dir)}
    return row


def _prompts_per_step(run_dir: str) -> int | str:
    """``train.prompts_per_step`` of the run's resolved ``config.yaml`` ('' when absent)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        return ""
    from omegaconf import OmegaConf

    return OmegaConf.load(path).get("train", {}).get("prompts_per_step", "")


def add_efficiency(rows: list[dict]) -> list[dict]:
    """Sorts rows by count and adds ``ideal_tokens_per_s`` and ``efficiency``.

    Ideal throughput at N is ``N / N0 * throughput(N0)``, N0 the smallest count;
    efficiency is measured over ideal (1.0 at N0).
    """
    if not rows:
        raise StudyError("no runs to compare")
    rows = sorted(rows, key=lambda r: r["count"])
    counts = [r["count"] for r in rows]
    if len(set(counts)) != len(counts):
        raise StudyError(f"two runs share a count: {counts}")
    base = rows[0]
    for row in rows:
        row["ideal_tokens_per_s"] = row["count"] / base["count"] * base["tokens_per_s"]
        row["efficiency"] = row["tokens_per_s"] / row["ideal_tokens_per_s"] if row["ideal_tokens_per_s"] > 0 else 0.0
    return rows


# ----------------------------------------------------------------- outputs

def _atomic_path(path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".", suffix=".tmp")
    os.close(fd)
    return tmp


def write_csv(rows: list[dict], path: str) -> None:
    """Writes the rows (columns :data:`COLUMNS`, floats to 4 significant digits) atomically."""
    tmp = _atomic_path(path)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)


def write_json(obj, path: str) -> None:
    """Writes ``obj`` as indented JSON atomically."""
    tmp = _atomic_path(path)
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def plot(rows: list[dict], out_dir: str, unit: str, label: str = "") -> list[str]:
    """``throughput.png`` (measured and ideal tokens/s vs count, efficiency annotated) and
    ``step_split.png`` (stacked mean step time per phase), ``label`` above both titles. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["count"] for r in rows]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(counts, [r["tokens_per_s"] for r in rows], "o-", label="measured (training tokens/s)")
    ax.plot(counts, [r["ideal_tokens_per_s"] for r in rows], "--", color="grey", label="ideal linear scaling")
    for r in rows:
        ax.annotate(f"{r['efficiency']:.0%}", (r["count"], r["tokens_per_s"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_xlabel(unit)
    ax.set_ylabel("tokens / s")
    ax.set_title((label + "\n" if label else "") + "throughput (labels: scaling efficiency)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(out_dir, "throughput.png")))
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(rows)
    labels = [str(c) for c in counts]
    for col in [*PHASES, "other_s"]:
        values = [r[col] for r in rows]
        ax.bar(labels, values, bottom=bottom, label=col[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel(unit)
    ax.set_ylabel("mean step time (s)")
    ax.set_title((label + "\n" if label else "") + "step-time split", fontsize=9)
    ax.legend(fontsize=8)
    paths.append(_save(fig, os.path.join(out_dir, "step_split.png")))
    plt.close("all")
    return paths


def _save(fig, path: str) -> str:
    tmp = _atomic_path(path)
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def finish(rows: list[dict], out_dir: str, unit: str, label: str = "") -> list[dict]:
    """Efficiency, CSV and plots into ``out_dir``; prints one JSON line per count."""
    rows = add_efficiency(rows)
    os.makedirs(out_dir, exist_ok=True)
    write_csv(rows, os.path.join(out_dir, "scaling.csv"))
    plot(rows, out_dir, unit, label)
    for row in rows:
        print(json.dumps({k: row[k] for k in COLUMNS if k != "run_dir"}), flush=True)
    return rows


# ----------------------------------------------------------------- local runs

def local_command(n: int, tp: int, run_dir: str, config: str, overrides: list[str], master_port: int,
                  base_port: int) -> list[str]:
    """The ``torchrun`` argv of one local run with ``n`` ranks at tensor parallelism ``tp``."""
    if n % tp:
        raise StudyError(f"--tp {tp} does not divide --ranks {n}")
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={master_port}",
            "-m", "megatron_sdpg.train", "--config", config, f"train.run_dir={run_dir}", f"parallel.tp={tp}",
            f"rollout.base_port={base_port}", "logging.progress_bar=false", *overrides]


def scaled_overrides(args, count: int, base_count: int) -> list[str]:
    """The study's overrides for one count: fixed global batch, or scaled with ``--weak``."""
    prompts = args.prompts_per_step * count // base_count if args.weak else args.prompts_per_step
    if args.weak and args.prompts_per_step * count % base_count:
        raise StudyError(f"--weak: prompts_per_step {args.prompts_per_step} x {count}/{base_count} is not whole")
    out = [f"train.steps={args.steps}", f"train.prompts_per_step={prompts}"]
    if args.n_samples:
        out.append(f"rollout.n_samples={args.n_samples}")
    return out + list(args.override)


def run_local(args) -> list[dict]:
    from megatron_sdpg.testing.distributed import free_port

    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise StudyError(f"--model-dir: no config.json in {args.model_dir} (build one with tools/make_tiny_model.py)")
    base = min(args.ranks)
    rows = []
    for n in sorted(args.ranks):
        run_dir = os.path.join(args.out, f"ranks{n}")
        overrides = [f"model.hf_dir={args.model_dir}", "train.eval_every=0", "train.eval_n=8",
                     *scaled_overrides(args, n, base)]
        cmd = local_command(n, args.tp, run_dir, args.config, overrides, free_port(), free_port())
        env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(args.threads_per_rank)}
        print(f"# {n} ranks: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with open(os.path.join(args.out, f"ranks{n}.log"), "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.timeout)
        if proc.returncode:
            raise StudyError(f"{n}-rank run failed (exit {proc.returncode}); see {log.name}")
        print(f"# {n} ranks done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        rows.append(collect_run(run_dir, n, args.warmup))
    return rows


# ----------------------------------------------------------------- Slurm

def _script_default(script: str, name: str) -> int | None:
    """The ``: "${NAME:=V}"`` default a run script sets, if any."""
    with open(script) as f:
        match = re.search(r':\s*"\$\{' + name + r':=(\d+)\}"', f.read())
    return int(match.group(1)) if match else None


def sbatch_command(args, nodes: int, run_dir: str, rollout_nodes: int, overrides: list[str]) -> list[str]:
    """The ``sbatch`` argv submitting ``--script`` with ``nodes`` training nodes."""
    env = {"TRAIN_NODES": str(nodes), "RUN_DIR": run_dir}
    if args.colocate:
        env["COLOCATE"] = "1"
    else:
        env["ROLLOUT_NODES"] = str(rollout_nodes)
    if args.config_given:
        env["CONFIG"] = os.path.abspath(args.config)
    for item in args.env:
        key, _, value = item.partition("=")
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", key) or not _:
            raise StudyError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    for key, value in env.items():
        if "," in value:
            raise StudyError(f"{key}={value!r}: sbatch --export cannot carry a comma")
    export = ",".join(["ALL", *(f"{k}={v}" for k, v in env.items())])
    return ["sbatch", f"--nodes={nodes + (0 if args.colocate else rollout_nodes)}",
            f"--job-name=scaling-{nodes}n", f"--output={run_dir}.out", f"--export={export}",
            os.path.abspath(args.script), *overrides]


def submit_slurm(args) -> dict:
    """Submits one job per node count; writes and returns ``OUT/manifest.json``."""
    if not os.path.isfile(args.script):
        raise StudyError(f"--script: no such file: {args.script}")
    rollout_nodes = args.rollout_nodes
    if rollout_nodes is None and not args.colocate:
        rollout_nodes = _script_default(args.script, "ROLLOUT_NODES") or 0
    base = min(args.nodes)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    jobs = []
    for n in sorted(args.nodes):
        run_dir = os.path.join(out, f"nodes{n}")
        overrides = [f"train.steps={args.steps}"] + list(args.override)
        if args.weak:
            if args.prompts_per_step * n % base:
                raise StudyError(f"--weak: prompts_per_step {args.prompts_per_step} x {n}/{base} is not whole")
            overrides.append(f"train.prompts_per_step={args.prompts_per_step * n // base}")
        cmd = sbatch_command(args, n, run_dir, rollout_nodes or 0, overrides)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        match = re.search(r"Submitted batch job (\d+)", proc.stdout)
        if proc.returncode or not match:
            raise StudyError(f"sbatch for {n} nodes failed (exit {proc.returncode}): "
                             f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        jobs.append({"nodes": n, "job_id": match.group(1), "run_dir": run_dir, "argv": cmd})
        print(f"# {n} nodes: job {match.group(1)} -> {run_dir}", file=sys.stderr, flush=True)
    manifest = {"mode": "slurm", "script": os.path.abspath(args.script), "weak": args.weak,
                "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "jobs": jobs}
    write_json(manifest, os.path.join(out, "manifest.json"))
    return manifest


def wait_for_jobs(manifest: dict, poll_s: float = 5.0) -> None:
    """Blocks until every job of ``manifest`` has ended; raises unless each one COMPLETED."""
    failed = []
    for job in manifest["jobs"]:
        while True:
            proc = subprocess.run(["scontrol", "show", "job", job["job_id"]], capture_output=True, text=True)
            match = re.search(r"JobState=(\S+)", proc.stdout)
            if proc.returncode or not match:
                raise StudyError(f"scontrol show job {job['job_id']}: {(proc.stderr or proc.stdout).strip()[-200:]}")
            if match.group(1) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                break
            time.sleep(poll_s)
        print(f"# {job['nodes']} nodes: job {job['job_id']} {match.group(1)}", file=sys.stderr, flush=True)
        if match.group(1) != "COMPLETED":
            failed.append(f"job {job['job_id']} ({job['nodes']} nodes) {match.group(1)}, see {job['run_dir']}.out")
    if failed:
        raise StudyError("; ".join(failed))


def collect_manifest(path: str, warmup: int) -> list[dict]:
    """Rows of every job in a ``manifest.json`` (count = training nodes)."""
    try:
        with open(path) as f:
            jobs = json.load(f)["jobs"]
        pairs = [(int(j["nodes"]), j["run_dir"]) for j in jobs]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StudyError(f"{path}: not a scaling manifest ({exc})") from exc
    return [collect_run(d, n, warmup) for n, d in pairs]


def _parse_collect(items: list[str]) -> list[tuple[int | None, str]]:
    out = []
    for item in items:
        count, sep, run_dir = item.partition("=")
        if sep and count.isdigit():
            out.append((int(count), run_dir))
        else:
            out.append((None, item))
    return out


# ----------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--slurm", action="store_true", help="submit one sbatch job per --nodes count")
    mode.add_argument("--collect", nargs="+", metavar="[COUNT=]RUN_DIR", help="collect finished runs")
    mode.add_argument("--manifest", help="collect every job of a --slurm manifest.json")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="local rank counts")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism of every local run (default 1: pure DP)")
    p.add_argument("--nodes", type=int, nargs="+", help="Slurm training node counts")
    p.add_argument("--script", default=os.path.join(ROOT, "examples", "run_sdpg_70b.sh"), help="Slurm run script")
    p.add_argument("--rollout-nodes", type=int, help="ROLLOUT_NODES of every job (default: the script's)")
    p.add_argument("--colocate", action="store_true", help="COLOCATE=1: engines on the training nodes")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra variable for the jobs")
    p.add_argument("--wait", action="store_true", help="with --slurm: wait for the jobs, then collect them")
    p.add_argument("--label", default="", help="a line above both figures' titles (e.g. what the machine was)")
    p.add_argument("--config", default=None, help="training YAML (local default: examples/configs/tiny_cpu.yaml)")
    p.add_argument("--model-dir", default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1, help="leading steps dropped")
    p.add_argument("--prompts-per-step", type=int, default=16, help="global batch at the smallest count")
    p.add_argument("--n-samples", type=int, default=8, help="rollout.n_samples (local; 0 keeps the config's)")
    p.add_argument("--weak", action="store_true", help="scale prompts_per_step with the count (weak scaling)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of local ranks")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per local run")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "scaling_study"))
    p.add_argument("override", nargs="*", help="dotted trainer overrides for every run")
    args = p.parse_args(argv)
    args.config_given = args.config is not None
    args.config = args.config or DEFAULT_CONFIG
    counts = args.nodes if args.slurm else args.ranks
    if args.slurm and not args.nodes:
        p.error("--slurm needs --nodes")
    if not args.collect and not args.manifest and (not counts or min(counts) < 1):
        p.error("counts must be >= 1")
    if args.warmup < 0 or args.steps <= args.warmup:
        p.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.slurm:
            manifest = submit_slurm(args)
            path = os.path.join(os.path.abspath(args.out), "manifest.json")
            print(json.dumps({"manifest": path, "jobs": {j["nodes"]: j["job_id"] for j in manifest["jobs"]}}))
            if not args.wait:
                return 0
            wait_for_jobs(manifest)
            finish(collect_manifest(path, args.warmup), args.out, "training nodes", args.label)
            return 0
        if args.manifest:
            rows, unit, out = collect_manifest(args.manifest, args.warmup), "training nodes", args.out
        elif args.collect:
            rows = [collect_run(d, n, args.warmup) for n, d in _parse_collect(args.collect)]
            unit, out = "count", args.out
        else:
            os.makedirs(args.out, exist_ok=True)
            rows, unit, out = run_local(args), f"CPU ranks (tp {args.tp})", args.out
        finish(rows, out, unit, args.label)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
