"""Generation tokens/s of the CPU server's engine against Hugging Face ``generate``.

Usage::

    PYTHONPATH=$PWD python benchmarks/bench_generation.py                 # 16 prompts x 8, 48 new tokens
    PYTHONPATH=$PWD python benchmarks/bench_generation.py --quick         # seconds

Both sides run in this one process on the same model (``artifacts/tiny_model``,
fp32), the same batch (``--prompts`` student prompts of the model's task, each
repeated ``--samples`` times, left-padded) and the same sampling (temperature
``--temperature``, whole vocabulary, up to ``--max-new-tokens``), with the same
torch intra-op thread count (and the server's default OpenMP waits, ``--omp-wait spin``; set
``OMP_WAIT_POLICY=PASSIVE`` for the other choice),
alternated ``--reps`` times after one warm-up each:

- project: ``BatchGenerator.generate`` (what ``/generate`` runs; it also returns
  the log-prob of every sampled token, as the trainer asks);
- hf: ``model.generate(do_sample=True, top_k=0, top_p=1.0)`` on the 128 rows.

Cases: ``eos`` (rows stop at EOS, as in training) and ``ignore_eos`` (every row
runs to ``--max-new-tokens``), for each ``--threads`` value. A row's tokens count
up to and including its EOS. Prints one JSON line per case: median
``project_tokens_per_s``, ``hf_tokens_per_s``, ``ratio`` (project / hf) and the
median wall and CPU seconds (``process_time``) of each side. On a shared machine
the wall figures are noisy; the CPU seconds show the work each side does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_sdpg.rollout.server.openmp import apply_omp_wait  # noqa: E402

apply_omp_wait("spin")  # the CPU server's default --omp-wait (before torch loads libgomp); the environment wins

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def student_prompts(hf_dir: str, tokenizer, count: int, vocab_size: int) -> list[list[int]]:
    """Token ids of the first ``count`` training prompts of the model's recorded task
    (``sdpg_task.json``); seeded random ids of 8-24 tokens for a model without one."""
    if not os.path.isfile(os.path.join(hf_dir, "sdpg_task.json")):
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(8, 25, (count,), generator=gen).tolist()
        return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]
    from megatron_sdpg.data.prompts import PromptBuilder
    from megatron_sdpg.data.tasks import get_task
    from megatron_sdpg.data.templates import get_template
    from megatron_sdpg.eval import read_task_metadata

    meta = read_task_metadata(hf_dir)
    task = get_task(meta.get("task", "synthetic"), **meta.get("task_options", {}))
    builder = PromptBuilder(tokenizer, get_template(meta.get("template", "paper")))
    return [builder.student_ids(p) for p in task.problems("train", count, seed=0)]


def run_project(generator, prompts, samples, max_new, temperature, ignore_eos, seed) -> int:
    from megatron_sdpg.rollout.server.requests import SampleRequest

    reqs = [SampleRequest(rid=f"g{g}-s{k}", input_ids=p, temperature=temperature, top_k=0, top_p=1.0,
                          max_new_tokens=max_new, ignore_eos=ignore_eos, seed=seed + g * samples + k,
                          return_logprob=True)
            for g, p in enumerate(prompts) for k in range(samples)]
    return sum(len(r.output_ids) for r in generator.generate(reqs))


def run_hf(model, prompts, samples, max_new, temperature, ignore_eos, eos, pad) -> int:
    rows = [p for p in prompts for _ in range(samples)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(rows):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                         top_p=1.0, max_new_tokens=max_new, min_new_tokens=max_new if ignore_eos else 0,
                         eos_token_id=eos, pad_token_id=pad)
    total = 0
    for row in out[:, width:].tolist():
        total += row.index(eos) + 1 if (eos in row and not ignore_eos) else len(row)
    return total


def timed(fn) -> tuple[float, float, int]:
    """``(wall seconds, CPU seconds of this process, tokens)`` of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=os.path.join(ROOT, "artifacts", "tiny_model"))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch intra-op threads, one case each")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="2 prompts x 4, 8 tokens, 1 rep")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.samples, args.max_new_tokens, args.reps = 2, 4, 8, 1
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        sys.exit(f"--model-dir: {args.model_dir} has no config.json")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sdpg.rollout.server.generator import BatchGenerator

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id
    pad = eos if pad is None else pad
    prompts = student_prompts(args.model_dir, tokenizer, args.prompts, model.config.vocab_size)
    generator = BatchGenerator(model, {eos}, None, seed=0, pad_id=pad)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for case, ignore_eos in (("eos", False), ("ignore_eos", True)):
            sides = {
                "project": lambda rep: run_project(generator, prompts, args.samples, args.max_new_tokens,
                                                   args.temperature, ignore_eos, seed=1000 * rep),
                "hf": lambda rep: (torch.manual_seed(rep), run_hf(model, prompts, args.samples, args.max_new_tokens,
                                                                    args.temperature, ignore_eos, eos, pad))[1],
            }
            times: dict[str, list[float]] = {k: [] for k in sides}
            cpu_times: dict[str, list[float]] = {k: [] for k in sides}
            rates: dict[str, list[float]] = {k: [] for k in sides}
            for rep in range(args.reps + 1):  # rep 0 warms up
                for name, fn in sides.items():
                    with torch.no_grad():
                        seconds, cpu, tokens = timed(lambda: fn(rep))
                    if rep:
                        times[name].append(seconds)
                        cpu_times[name].append(cpu)
                        rates[name].append(tokens / seconds)
            proj, hf = statistics.median(rates["project"]), statistics.median(rates["hf"])
            print(json.dumps({
                "case": case, "threads": threads, "rows": args.prompts * args.samples,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "reps": args.reps,
                "project_tokens_per_s": round(proj, 1), "hf_tokens_per_s": round(hf, 1), "ratio": round(proj / hf, 3),
                "project_s": round(statistics.median(times["project"]), 4),
                "hf_s": round(statistics.median(times["hf"]), 4),
                "project_cpu_s": round(statistics.median(cpu_times["project"]), 4),
                "hf_cpu_s": round(statistics.median(cpu_times["hf"]), 4),
            }), flush=True)


if __name__ == "__main__":
    main()
