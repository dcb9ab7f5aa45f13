#!/usr/bin/env python
"""Build the tiny tokenizer + Llama for the synthetic task and warm-start it on CPU.

    python tools/make_tiny_model.py --out artifacts/tiny                  # ~1M params, <= ~5 min
    python tools/make_tiny_model.py --out /tmp/t --size test --steps 20   # seconds (tests)
    python tools/make_tiny_model.py --task synthetic-long --out artifacts/tiny_model_long \
        --target-accuracy 0.10 0.35 --eval-every 50 --eval-n 100 --steps 1500 --max-minutes 14 \
        --teacher-fraction 0.5   # ~370 CPU-s; docs/synthetic_task.md

Writes an HF directory loadable by AutoModelForCausalLM / AutoTokenizer, plus
``sdpg_task.json`` (task, options, template, warm-start figures). Prints one JSON
line with the held-out greedy accuracy without and with the privileged context.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdpg.data.prompts import PromptBuilder  # noqa: E402
from megatron_sdpg.data.tasks import get_task, parse_task_options  # noqa: E402
from megatron_sdpg.data.templates import BUILTIN_TEMPLATES, get_template  # noqa: E402
from megatron_sdpg.eval import evaluate, response_budget  # noqa: E402
from megatron_sdpg.tiny.model import SIZES, build_model, num_parameters, save_hf_dir  # noqa: E402
from megatron_sdpg.tiny.tokenizer import build_tokenizer  # noqa: E402
from megatron_sdpg.tiny.warm_start import WarmStartConfig, warm_start  # noqa: E402


def tokenizer_corpus(task, n: int = 300) -> list[str]:
    """Every text the tokenizer must cover: prompts under all built-in templates, responses."""
    corpus = []
    for problem in task.problems("train", n, seed=12345):
        corpus.append(task.reference_response(problem))
        for template in BUILTIN_TEMPLATES.values():
            corpus += [template.render_student(problem), template.render_teacher(problem),
                       template.render_teacher(problem, context="")]
    return corpus


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output HF directory")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=1500, help="most warm-start steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-accuracy", type=float, nargs=2, default=(0.15, 0.5), metavar=("LO", "HI"),
                        help="band of no-context greedy accuracy for the kept checkpoint")
    parser.add_argument("--template", default=None, choices=sorted(BUILTIN_TEMPLATES),
                        help="prompt template the model is trained for (default: the task's, else compact: "
                             "4-5x shorter than paper)")
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher-fraction", type=float, default=0.25,
                        help="share of each batch under the teacher prompt (the rest under the student prompt)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-n", type=int, default=200, help="valid problems per checkpoint evaluation")
    parser.add_argument("--report-n", type=int, default=500, help="held-out problems in the final report")
    parser.add_argument("--max-minutes", type=float, default=5.0, help="warm-start budget in CPU minutes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    try:
        task = get_task(args.task, **parse_task_options(args.task_option))
        task.problems("heldout", args.report_n)  # enough held-out problems for the report
    except (TypeError, ValueError) as err:
        print(f"error: --task {args.task} / --task-option: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    args.template = args.template or getattr(task, "default_template", "compact")
    tokenizer = build_tokenizer(tokenizer_corpus(task))
    model = build_model(args.size, tokenizer, seed=args.seed)
    builder = PromptBuilder(tokenizer, get_template(args.template))
    cfg = WarmStartConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, eval_every=args.eval_every,
        teacher_fraction=args.teacher_fraction,
        eval_n=args.eval_n, target=tuple(args.target_accuracy), max_cpu_seconds=60 * args.max_minutes, seed=args.seed,
    )
    result = warm_start(model, tokenizer, task, builder, cfg)
    model.load_state_dict(result.state_dict)
    t0 = time.perf_counter()
    heldout = task.problems("heldout", args.report_n)
    report = evaluate(model, tokenizer, task, args.report_n, with_context=True, builder=builder,
                      max_new_tokens=response_budget(tokenizer, task, heldout))
    summary = {
        "out": os.path.abspath(args.out),
        "size": args.size,
        "parameters": num_parameters(model),
        "vocab_size": len(tokenizer),
        "template": args.template,
        **task.describe(),
        "chosen_step": result.step,
        "in_band": result.in_band,
        "warm_start_seconds": round(result.seconds, 1),
        "warm_start_cpu_seconds": round(result.cpu_seconds, 1),
        "threads": args.threads,
        "heldout_n": report["n"],
        "heldout_accuracy": report["mean@1"],
        "heldout_context_accuracy": report["context/mean@1"],
        "valid_accuracy": result.accuracy,
        "valid_context_accuracy": result.context_accuracy,
        "report_seconds": round(time.perf_counter() - t0, 1),
    }
    metadata = {**summary, "history": result.history, "target_accuracy": list(args.target_accuracy)}
    save_hf_dir(model, tokenizer, args.out, metadata)
    if not result.in_band:
        logging.warning("no checkpoint landed in the target band %s; kept the closest", args.target_accuracy)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
