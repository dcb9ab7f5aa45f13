#!/usr/bin/env python
"""Fill a problem file's privileged context (worked solutions) through an OpenAI-compatible chat endpoint.

    python tools/generate_solutions.py --input data/math/dapo17k.jsonl --out data/math/train.jsonl \\
        --base-url http://127.0.0.1:30000/v1 --model Qwen/Qwen3-32B --concurrency 64 \\
        --samples-per-problem 4 --max-tries 2

For every problem without a solution, up to ``--max-tries`` requests of
``--samples-per-problem`` completions each are made; the first completion whose
final answer the project's verifier (``megatron_sdpg.rewards``, ``--verifier``)
accepts against the problem's answer becomes its ``solution`` (a Qwen3
``<think>...</think>`` block is dropped). Problems with no accepted completion
keep an empty solution. SGLang, vLLM, a hosted API or the CPU rollout server
(``python -m megatron_sdpg.rollout.server``) all serve ``/v1/chat/completions``.

Resumable: each finished problem is appended (one fsynced JSON line) to
``OUT.progress.jsonl``; after a kill, rerunning the same command skips every
problem recorded there and loses none (a torn last line is redone). ``--out`` is
written atomically at the end (all input rows, solutions filled). The progress file
stays as the record of the run: rerunning a finished command sends no request;
delete it (or use another ``--out``) to try the unsolved problems again. A tqdm bar shows coverage on stderr;
the last stdout line is a JSON summary (``coverage`` = problems with a solution /
problems). Exit status 0 when every problem was attempted, 1 if requests kept
failing (rerun to retry those), 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_sdpg.data.files import BadRowError, Columns, read_rows, row_to_problem  # noqa: E402
from megatron_sdpg.data.problem import Problem  # noqa: E402
from megatron_sdpg.data.templates import BUILTIN_TEMPLATES, check_custom_template  # noqa: E402
from megatron_sdpg.data.write import write_rows  # noqa: E402

_THINK = re.compile(r"^.*?</think>\s*", re.DOTALL)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="problem file (.jsonl/.parquet) from tools/prepare_data.py")
    p.add_argument("--out", required=True, help="output problem file (.jsonl/.parquet)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible API root, e.g. http://127.0.0.1:30000/v1")
    p.add_argument("--model", required=True, help="model name sent with each request")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", ""), help="default: $OPENAI_API_KEY")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--samples-per-problem", type=int, default=4, help="completions per request (n)")
    p.add_argument("--max-tries", type=int, default=2, help="requests per problem before giving up (k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=None, help="request i of a problem sends seed + i (if set)")
    p.add_argument("--template", default="paper", help=f"student template of the request: {sorted(BUILTIN_TEMPLATES)}")
    p.add_argument("--prompt", default="", help="custom request message (str.format, {question} {answer}); "
                   "overrides --template")
    p.add_argument("--chat-template-kwargs", default="", help='JSON, e.g. \'{"enable_thinking": false}\'')
    p.add_argument("--verifier", default="math", help="math, numeric, exact_match or module:function")
    p.add_argument("--verifier-timeout", type=float, default=10.0)
    p.add_argument("--verifier-workers", type=int, default=4, help="verifier processes")
    p.add_argument("--overwrite", action="store_true", help="also regenerate problems that have a solution")
    p.add_argument("--skip-bad-rows", action="store_true", help="leave bad rows untouched instead of failing")
    p.add_argument("--request-timeout", type=float, default=1800.0)
    p.add_argument("--retries", type=int, default=3, help="retries of a failed request (connection, 5xx, 429)")
    p.add_argument("--no-progress-bar", action="store_true")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"generate_solutions: {message}", file=sys.stderr)
    return 2


def read_progress(path: str) -> dict[str, dict]:
    """Finished problems of an earlier run by id; a torn (unterminated) last line is ignored."""
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is torn or empty
        if line.strip():
            record = json.loads(line)
            done[record["id"]] = record
    return done


class ProgressLog:
    """Append-only record of finished problems, one fsynced line each (``read_progress`` reads it)."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one writer at a time: a second run on the same --out would redo and interleave
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise RuntimeError(f"{path}: another generate_solutions run is writing it") from None
        with open(path, "rb") as f:  # drop a torn tail so the next append starts on a fresh line
            data = f.read()
        if data and not data.endswith(b"\n"):
            os.truncate(path, data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class ChatClient:
    """POSTs ``/chat/completions`` with retries (connection errors, 5xx, 429)."""

    def __init__(self, args: argparse.Namespace):
        import aiohttp

        self.url = args.base_url.rstrip("/") + "/chat/completions"
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        timeout = aiohttp.ClientTimeout(total=args.request_timeout)
        self.session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        self.args = args
        self.requests = 0
        self.kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else {}

    async def complete(self, message: str, seed: int | None) -> list[str]:
        """``--samples-per-problem`` completions of one user message."""
        import aiohttp

        body = {"model": self.args.model, "messages": [{"role": "user", "content": message}],
                "n": self.args.samples_per_problem, "temperature": self.args.temperature,
                "top_p": self.args.top_p, "max_tokens": self.args.max_tokens}
        if seed is not None:
            body["seed"] = seed
        if self.kwargs:
            body["chat_template_kwargs"] = self.kwargs
        for attempt in range(self.args.retries + 1):
            self.requests += 1
            try:
                async with self.session.post(self.url, json=body) as resp:
                    text = await resp.text()
                    if resp.status == 200:
                        return [c["message"]["content"] or "" for c in json.loads(text)["choices"]]
                    if resp.status != 429 and resp.status < 500:
                        raise RuntimeError(f"{self.url}: HTTP {resp.status}: {text[:300]}")
                    error = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                error = f"{type(e).__name__}: {e}"
            if attempt < self.args.retries:
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * (0.5 + random.random()))
        raise RuntimeError(f"{self.url}: failed after {self.args.retries + 1} attempts ({error})")

    async def close(self) -> None:
        await self.session.close()


def solution_text(response: str) -> str:
    """The response without a leading ``<think>...</think>`` block."""
    return _THINK.sub("", response, count=1).strip() if "</think>" in response else response.strip()


async def solve_all(args, problems: list[Problem], render, pool, log: ProgressLog, bar) -> tuple[int, list[str], int]:
    """Runs every problem; returns (accepted samples, errors of unfinished problems, requests sent)."""
    client = ChatClient(args)
    sem = asyncio.Semaphore(args.concurrency)
    accepted, errors = [0], []

    async def one(problem: Problem) -> None:
        async with sem:
            solution, tries = None, 0
            try:
                for tries in range(1, args.max_tries + 1):
                    seed = None if args.seed is None else args.seed + (tries - 1) * args.samples_per_problem
                    texts = await client.complete(render(problem), seed)
                    scored = await asyncio.to_thread(pool.score, texts, [problem.answer] * len(texts))
                    accepted[0] += sum(scored.correct)
                    good = [t for t, ok in zip(texts, scored.correct) if ok]
                    if good:
                        solution = solution_text(good[0])
                        break
            except RuntimeError as e:
                errors.append(str(e))
                return
            log.append({"id": problem.id, "solution": solution, "tries": tries})
            bar.update(1, solution is not None)

    try:
        await asyncio.gather(*(one(p) for p in problems))
    finally:
        await client.close()
    return accepted[0], errors, client.requests


class Bar:
    """tqdm bar of finished problems with the coverage so far."""

    def __init__(self, total: int, covered: int, done: int, disable: bool):
        from tqdm import tqdm

        self.covered, self.done = covered, done
        self.tqdm = tqdm(total=total, initial=done, desc="solutions", unit="problem", disable=disable,
                         file=sys.stderr, dynamic_ncols=True)
        self._postfix()

    def _postfix(self) -> None:
        self.tqdm.set_postfix(coverage=f"{self.covered}/{max(self.done, 1)}")

    def update(self, n: int, covered: bool) -> None:
        self.done += n
        self.covered += int(covered)
        self._postfix()
        self.tqdm.update(n)

    def close(self) -> None:
        self.tqdm.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("concurrency", "samples_per_problem", "max_tries", "verifier_workers"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')}: must be >= 1")
    if args.prompt:
        problem = check_custom_template(args.prompt)
        if problem:
            return _fail(f"--prompt: {problem}")
        fmt = args.prompt
        render = lambda p: fmt.format(question=p.question, answer=p.answer, context="")  # noqa: E731
    elif args.template in BUILTIN_TEMPLATES:
        render = BUILTIN_TEMPLATES[args.template].render_student
    else:
        return _fail(f"--template: {args.template!r} is not one of {sorted(BUILTIN_TEMPLATES)}")
    try:
        json.loads(args.chat_template_kwargs or "{}")
    except json.JSONDecodeError as e:
        return _fail(f"--chat-template-kwargs: not valid JSON ({e})")
    if not args.out.endswith((".jsonl", ".json", ".parquet")):
        return _fail(f"--out: {args.out} must end in .jsonl, .json or .parquet")
    try:
        rows = read_rows(args.input)
    except BadRowError as e:
        return _fail(str(e))
    id_key = "id" if rows and "id" in rows[0] else ""
    columns = Columns(question="question", answer="answer", context="solution", id=id_key)
    problems, row_of = [], {}
    for i, row in enumerate(rows):
        try:
            problem = row_to_problem(row, columns, f"{os.path.basename(args.input)}:{i}")
        except ValueError as e:
            if args.skip_bad_rows:
                continue
            return _fail(f"{args.input}: row {i}: {e}")
        if problem.id in row_of:
            return _fail(f"{args.input}: row {i}: duplicate id {problem.id!r}")
        row_of[problem.id] = i
        problems.append(problem)

    progress_path = args.out + ".progress.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    try:
        log = ProgressLog(progress_path)
    except RuntimeError as e:
        return _fail(str(e))
    try:
        done = read_progress(progress_path)
    except (json.JSONDecodeError, KeyError) as e:
        log.close()
        return _fail(f"{progress_path}: not a progress file of this tool ({e})")
    unknown = sorted(set(done) - set(row_of))
    if unknown:
        log.close()
        return _fail(f"{progress_path}: records problem {unknown[0]!r}, which is not in {args.input}")
    has_solution = {p.id for p in problems if p.context and not args.overwrite}
    todo = [p for p in problems if p.id not in done and p.id not in has_solution]
    resumed = sum(p.id in done for p in problems if p.id not in has_solution)
    covered_before = len(has_solution) + sum(r["solution"] is not None for r in done.values())

    from megatron_sdpg.rewards.config import RewardConfig
    from megatron_sdpg.rewards.pool import VerifierPool

    bar = Bar(len(problems), covered_before, len(problems) - len(todo), args.no_progress_bar)
    try:
        config = RewardConfig(timeout_s=args.verifier_timeout, workers=args.verifier_workers)
        with VerifierPool(args.verifier, config) as pool:
            accepted, errors, requests = asyncio.run(solve_all(args, todo, render, pool, log, bar))
    except ValueError as e:  # bad verifier name
        log.close()
        return _fail(f"--verifier: {e}")
    finally:
        bar.close()

    done = read_progress(progress_path)
    out_rows = []
    for problem in problems:
        row = dict(rows[row_of[problem.id]])
        record = done.get(problem.id)
        if record is not None and record["solution"] is not None:
            row["solution"] = record["solution"]
        if row.get("solution") is None:
            row["solution"] = ""
        out_rows.append(row)
    write_rows(args.out, out_rows)
    log.close()  # holds the lock until --out is written
    complete = not errors
    covered = sum(bool(r["solution"]) for r in out_rows)
    summary = {
        "out": args.out, "problems": len(problems), "covered": covered,
        "coverage": covered / max(len(problems), 1), "had_solution": len(has_solution),
        "resumed": resumed,
        "attempted_now": len(todo) - len(errors), "unfinished": len(errors), "requests": requests,
        "accepted_samples": accepted, "complete": complete,
    }
    if errors:
        print(f"generate_solutions: {len(errors)} problems unfinished (rerun to retry); first: {errors[0]}",
              file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
