"""Held-out evaluation: mean@k and pass@k of a Hugging Face model on a task.

Usage::

    python -m megatron_sdpg.eval --hf-dir artifacts/tiny --task synthetic --n 500
    python -m megatron_sdpg.eval --hf-dir DIR --task synthetic --samples 4 --temperature 1.0 --with-context
    python -m megatron_sdpg.eval --hf-dir DIR --files data/eval/aime24.jsonl data/eval/amc23.jsonl \
        --base-url http://127.0.0.1:30000 --chat-template thinking

``--files`` evaluates prepared benchmark files (``tools/prepare_data.py``): mean@k and
unbiased pass@k per file at the paper's settings by default (32 samples, temperature
1.0, top-p 1.0, 4096 new tokens), through an engine URL (``--base-url``: SGLang or the
CPU rollout server) or the model in-process (``megatron_sdpg/eval_files.py``).

Prints one JSON line. With ``--samples 1 --temperature 0`` (the defaults) mean@1 is
greedy accuracy. ``--with-context`` adds the same metrics under the teacher prompt
(keys prefixed ``context/``). Task options and the prompt template default to those
recorded in ``DIR/sdpg_task.json`` by ``tools/make_tiny_model.py``.

The trainer calls :func:`evaluate` directly for periodic held-out evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.data.prompts import PromptBuilder, encode
from megatron_sdpg.data.templates import get_template
from megatron_sdpg.rewards.config import RewardConfig
from megatron_sdpg.rewards.pool import VerifierPool

TASK_METADATA = "sdpg_task.json"


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[str], samples: int, temperature: float, max_new_tokens: int, batch_size: int
) -> list[tuple[str, int, bool]]:
    """Generates ``samples`` responses per prompt with left padding, in batches.

    Returns:
        ``len(prompts) * samples`` tuples ``(text, num_tokens, finished)``, prompt-major;
        ``finished`` is False when the response hit ``max_new_tokens`` without EOS.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return _generate(model, tokenizer, prompts, samples, temperature, max_new_tokens, batch_size, eos, pad)
    finally:
        tokenizer.padding_side = side


def _generate(model, tokenizer, prompts, samples, temperature, max_new_tokens, batch_size, eos, pad):
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out: list[tuple[str, int, bool]] = []
    per_batch = max(1, batch_size // samples)
    for start in range(0, len(prompts), per_batch):
        enc = tokenizer(prompts[start : start + per_batch], add_special_tokens=False, padding=True, return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, num_return_sequences=samples,
            eos_token_id=eos, pad_token_id=pad, **sampling,
        )
        for row in gen[:, enc["input_ids"].shape[1] :].tolist():
            finished = eos in row
            tokens = row[: row.index(eos) + 1] if finished else row
            out.append((tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finished))
    return out


def response_budget(tokenizer, task, problems, margin: int = 4) -> int:
    """Generation cap for a generated task: its longest reference response (+EOS) plus a margin.

    Covers ``task.reference_response`` and, where the task has one,
    ``task.teacher_reference_response`` (the target under the teacher prompt), over the
    first 512 of ``problems``.
    """
    refs = {task.reference_response, getattr(task, "teacher_reference_response", task.reference_response)}
    return max(len(encode(tokenizer, ref(p))) for ref in refs for p in problems[:512]) + 1 + margin


def evaluate(
    model,
    tokenizer,
    task,
    n: int = 500,
    samples: int = 1,
    temperature: float = 0.0,
    with_context: bool = False,
    *,
    builder: PromptBuilder | None = None,
    pool: VerifierPool | None = None,
    split: str = "heldout",
    max_new_tokens: int = 64,
    batch_size: int = 256,
    seed: int = 0,
) -> dict:
    """mean@k and pass@k over the first ``n`` problems of a split.

    Args:
        model: A causal LM (e.g. ``AutoModelForCausalLM``), put in eval mode here.
        tokenizer: Its tokenizer (with a chat template and a pad token).
        task: A task (``megatron_sdpg.data.tasks``).
        n: Problems evaluated.
        samples: k, responses per problem.
        temperature: 0 = greedy (then use samples=1).
        with_context: Also evaluate under the teacher prompt (keys prefixed ``context/``).
        builder: Prompt builder; default: the ``paper`` template.
        pool: Verifier pool; default: one with the task's verifier, closed on return.
        split: Which split.
        max_new_tokens: Response length cap.
        batch_size: Sequences generated together.
        seed: Seed of the sampling.

    Returns:
        ``{"mean@k", "pass@k", "mean_response_tokens", "truncated", ...}`` for the student
        prompt, and the same under ``context/`` with ``with_context``.
    """
    start = time.perf_counter()
    builder = builder or PromptBuilder(tokenizer, get_template("paper"))
    own_pool = pool is None
    pool = pool or VerifierPool(task.default_verifier, RewardConfig())
    was_training = model.training
    model.eval()
    problems = task.problems(split, n)
    torch.manual_seed(seed)
    result = {"task": task.name, "split": split, "n": len(problems), "samples": samples, "temperature": temperature}
    try:
        modes = [("", builder.student_text)] + ([("context/", builder.teacher_text)] if with_context else [])
        for prefix, render in modes:
            prompts = [render(p) for p in problems]
            gens = generate_responses(model, tokenizer, prompts, samples, temperature, max_new_tokens, batch_size)
            answers = [p.answer for p in problems for _ in range(samples)]
            scored = pool.score([g[0] for g in gens], answers)
            correct = torch.tensor(scored.correct, dtype=torch.float64).view(len(problems), samples)
            result[f"{prefix}mean@{samples}"] = correct.mean().item()
            result[f"{prefix}pass@{samples}"] = (correct.amax(dim=1) > 0).double().mean().item()
            result[f"{prefix}mean_response_tokens"] = sum(g[1] for g in gens) / len(gens)
            result[f"{prefix}truncated"] = sum(not g[2] for g in gens) / len(gens)
            result[f"{prefix}verifier_failures"] = scored.timeouts + scored.errors
    finally:
        if own_pool:
            pool.close()
        model.train(was_training)
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


class EvalInputError(ValueError):
    """A bad command-line value or an unreadable input of ``python -m megatron_sdpg.eval`` (one line, exit 2)."""


def read_task_metadata(hf_dir: str) -> dict:
    """``sdpg_task.json`` of a model directory (task, options, template), or {}."""
    path = os.path.join(hf_dir, TASK_METADATA)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as err:  # JSON or UTF-8
        raise EvalInputError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("task_options", {}), dict):
        raise EvalInputError(f"{path}: expected an object with a task_options object")
    return meta


def _check_args(args) -> None:
    import math

    if not os.path.isdir(args.hf_dir):
        raise EvalInputError(f"--hf-dir: {args.hf_dir!r} is not a directory")
    for name in ("n", "samples", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise EvalInputError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise EvalInputError(f"--threads: must be >= 0, got {args.threads}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise EvalInputError(f"--temperature: must be a finite number >= 0, got {args.temperature}")


def _load_inputs(args):
    """``(task, template, tokenizer, builder, model)`` from the command line; EvalInputError names what is wrong."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sdpg.data.tasks import get_task, parse_task_options

    meta = read_task_metadata(args.hf_dir)
    options = dict(meta.get("task_options", {})) if meta.get("task") == args.task else {}
    try:
        options.update(parse_task_options(args.task_option))
    except ValueError as err:
        raise EvalInputError(f"--task-option {err}") from None
    try:
        task = get_task(args.task, **options)
    except (TypeError, ValueError) as err:
        raise EvalInputError(f"--task {args.task} / --task-option: {str(err).splitlines()[0]}") from None
    try:
        task.problems("heldout", args.n)  # enough problems for --n, before loading the model
    except ConfigError as err:
        raise EvalInputError(f"--n: {str(err).split(': ', 1)[-1]}") from None
    try:
        template = get_template(args.template or meta.get("template", "paper"))
    except ValueError as err:
        raise EvalInputError(f"--template: {err}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, JSON errors...
        raise EvalInputError(f"--hf-dir: cannot load the tokenizer from {args.hf_dir!r} ({_first_line(err)})") from None
    from megatron_sdpg.data.prompts import chat_template_kwargs

    try:
        kwargs = chat_template_kwargs(tokenizer, args.chat_template)
    except ValueError as err:
        raise EvalInputError(str(err).replace("data.chat_template", "--chat-template")) from None
    builder = PromptBuilder(tokenizer, template, template_kwargs=kwargs)
    try:  # before the model loads: e.g. a tokenizer without a chat template
        problem = task.problems("heldout", 1)[0]
        builder.student_text(problem)
        builder.teacher_text(problem)
    except ValueError as err:
        raise EvalInputError(f"--hf-dir: cannot build prompts with the tokenizer of {args.hf_dir!r} "
                             f"({_first_line(err)})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    except Exception as err:
        raise EvalInputError(f"--hf-dir: cannot load the model from {args.hf_dir!r} ({_first_line(err)})") from None
    return task, template, tokenizer, builder, model


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def main(argv: list[str] | None = None) -> dict:
    """The command line (see the module docstring); a bad input exits 2 with one line."""
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model directory")
    parser.add_argument("--task", default=None, help="registered task name (e.g. synthetic)")
    parser.add_argument("--files", nargs="+", default=None, help="prepared benchmark files (instead of --task)")
    parser.add_argument("--base-url", default="", help="--files: engine URL (SGLang / CPU server); default in-process")
    parser.add_argument("--top-p", type=float, default=1.0, help="--files: nucleus sampling mass")
    parser.add_argument("--chat-template", default="model", help="model, thinking or no_thinking (Qwen3)")
    parser.add_argument("--verifier", default="math", help="--files: verifier (math, numeric, module:function)")
    parser.add_argument("--responses-out", default="", help="--files: write every sample to this jsonl")
    parser.add_argument("--request-timeout", type=float, default=3600.0, help="--files: engine request timeout")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="task option (JSON value), overrides the model's recorded options")
    parser.add_argument("--template", default=None, help="prompt template (default: recorded, else paper)")
    parser.add_argument("--n", type=int, default=500, help="held-out problems")
    parser.add_argument("--samples", type=int, default=None, help="k: samples per problem (default 1; --files 32)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0; --files 1.0)")
    parser.add_argument("--with-context", action="store_true", help="also evaluate under the teacher prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="default 64 (a generated task: at least its longest reference response + EOS + 4); "
                             "--files 4096")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args(argv)

    if (args.task is None) == (args.files is None):
        parser.error("give exactly one of --task and --files")
    if args.threads < 0:  # before either path: a negative count is refused, never clamped
        parser.exit(2, f"error: --threads: must be >= 0, got {args.threads}\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.files is not None:
        return _main_files(args, parser)
    args.samples = 1 if args.samples is None else args.samples
    args.temperature = 0.0 if args.temperature is None else args.temperature
    default_tokens = args.max_new_tokens is None
    args.max_new_tokens = 64 if default_tokens else args.max_new_tokens
    try:
        _check_args(args)
        task, template, tokenizer, builder, model = _load_inputs(args)
    except ValueError as err:  # EvalInputError
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if default_tokens and hasattr(task, "reference_response"):  # synthetic-long's responses need > 64
        args.max_new_tokens = max(64, response_budget(tokenizer, task, task.problems("heldout", min(args.n, 512))))
    result = evaluate(
        model, tokenizer, task, args.n, args.samples, args.temperature, args.with_context,
        builder=builder, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
    )
    result["template"] = template.name
    result["max_new_tokens"] = args.max_new_tokens
    if hasattr(task, "describe"):
        result["task_options"] = task.describe()["task_options"]
    print(json.dumps(result), flush=True)
    return result


def _main_files(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """``--files``: benchmark files at the paper's sampling settings (``eval_files.py``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sdpg.data.prompts import chat_template_kwargs
    from megatron_sdpg.eval_files import FilesEvalSettings, evaluate_files
    from megatron_sdpg.rollout.protocol import RolloutError

    settings = FilesEvalSettings(
        samples=32 if args.samples is None else args.samples,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_p=args.top_p, max_new_tokens=4096 if args.max_new_tokens is None else args.max_new_tokens,
        seed=args.seed, batch_size=args.batch_size,
    )
    if settings.samples < 1 or not 0.0 < settings.top_p <= 1.0 or settings.temperature < 0:
        parser.error("--samples must be >= 1, --top-p in (0, 1], --temperature >= 0")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, JSON errors...
        parser.exit(2, f"error: --hf-dir: cannot load the tokenizer from {args.hf_dir!r} ({_first_line(err)})\n")
    try:
        kwargs = chat_template_kwargs(tokenizer, args.chat_template)
        template = get_template(args.template or "paper")
    except ValueError as e:
        parser.exit(2, "error: " + str(e).replace("data.chat_template", "--chat-template") + "\n")
    builder = PromptBuilder(tokenizer, template, template_kwargs=kwargs)
    try:
        model = None if args.base_url else AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    except Exception as err:
        parser.exit(2, f"error: --hf-dir: cannot load the model from {args.hf_dir!r} ({_first_line(err)})\n")
    try:
        with VerifierPool(args.verifier, RewardConfig()) as pool:
            result = evaluate_files(args.files, builder, pool, settings, engine_url=args.base_url, model=model,
                                    timeout_s=args.request_timeout, responses_out=args.responses_out)
    except (ValueError, RolloutError) as e:  # a bad file or row (BadRowError), a bad verifier, engine down
        parser.exit(2, f"eval: {e}\n")
    result.update(template=builder.template.name, chat_template=args.chat_template)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
