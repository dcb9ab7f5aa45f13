"""Benchmark evaluation of prepared problem files: mean@k and unbiased pass@k per file.

``python -m megatron_sdpg.eval --files ...`` lands here (see ``eval.py``). Every file
(e.g. ``aime24.jsonl`` from ``tools/prepare_data.py``) is one benchmark named by its
file name. Each problem gets ``samples`` responses to its student prompt (the
tokenizer's chat template, ``data.chat_template`` mode, the ``paper`` template by
default), generated through an engine URL (SGLang or the CPU rollout server,
``/generate``) or, without one, by the Hugging Face model in-process. Defaults are
the paper's evaluation settings: 32 samples, temperature 1.0, top-p 1.0, 4096 new tokens.

Metrics per benchmark: ``mean@n`` (mean accuracy over all samples, the paper's
"mean@32"), ``pass@k`` for k = 1, 2, 4, ... up to n with the unbiased estimator
``1 - C(n - c, k) / C(n, k)`` averaged over problems (Chen et al., 2021), computed
exactly in integers.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction

from megatron_sdpg.data.files import Columns, load_problem_file, read_rows
from megatron_sdpg.data.prompts import PromptBuilder
from megatron_sdpg.data.write import write_rows


def pass_at_k(correct: list[int], n: int, k: int) -> float:
    """Unbiased pass@k over problems with ``correct[i]`` right answers out of ``n`` samples each."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    total = sum((Fraction(1) - Fraction(math.comb(n - c, k), math.comb(n, k)) for c in correct), Fraction(0))
    return float(total / max(len(correct), 1))


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else ks + [n]


@dataclass
class FilesEvalSettings:
    """How to sample (the paper's evaluation defaults)."""

    samples: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    batch_size: int = 256


def _generate_engine(url: str, builder: PromptBuilder, problems, s: FilesEvalSettings, timeout_s: float) -> list[str]:
    from megatron_sdpg.rollout.blocking_client import RolloutClient
    from megatron_sdpg.rollout.config import SamplingConfig

    sampling = SamplingConfig(temperature=s.temperature, top_p=s.top_p, top_k=-1, max_new_tokens=s.max_new_tokens)
    prompts = [builder.student_ids(p) for p in problems]
    with RolloutClient([url], sampling=sampling, request_timeout_s=timeout_s) as client:
        groups, _ = client.generate(prompts, n=s.samples, seed=s.seed, return_logprob=False)
    tok = builder.tokenizer
    return [o.text if o.text is not None else tok.decode(o.output_ids, skip_special_tokens=True)
            for g in groups for o in g]


def _generate_local(model, builder: PromptBuilder, problems, s: FilesEvalSettings) -> list[str]:
    import torch

    from megatron_sdpg.eval import generate_responses

    if s.top_p != 1.0:
        raise ValueError("--top-p: in-process generation samples the whole distribution; use an engine URL")
    torch.manual_seed(s.seed)
    model.eval()
    prompts = [builder.student_text(p) for p in problems]
    gens = generate_responses(model, builder.tokenizer, prompts, s.samples, s.temperature, s.max_new_tokens,
                              s.batch_size)
    return [g[0] for g in gens]


def evaluate_files(files: list[str], builder: PromptBuilder, pool, settings: FilesEvalSettings, *,
                   engine_url: str = "", model=None, timeout_s: float = 3600.0,
                   responses_out: str = "") -> dict:
    """mean@n and pass@k of every file.

    Args:
        files: Prepared problem files (question, answer[, id]); one benchmark each.
        builder: Student prompts (tokenizer, template, chat-template mode).
        pool: ``VerifierPool`` scoring responses against answers.
        settings: Sampling settings.
        engine_url: Generate through this engine; else ``model`` generates in-process.
        model: A Hugging Face causal LM (when no engine URL).
        timeout_s: Per-request timeout of the engine client.
        responses_out: Optional jsonl of every sample (benchmark, id, sample, response, correct).

    Returns:
        ``{"benchmarks": {name: {"n", "mean@n", "pass@1", ...}}, ...settings}``.
    """
    start = time.perf_counter()
    out: dict = {"samples": settings.samples, "temperature": settings.temperature, "top_p": settings.top_p,
                 "max_new_tokens": settings.max_new_tokens, "engine": engine_url or "in-process",
                 "benchmarks": {}}
    dump: list[dict] = []
    for path in files:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in out["benchmarks"]:
            raise ValueError(f"--files: two files are named {name!r}; benchmarks are named by file")
        rows = read_rows(path)
        problems, _ = load_problem_file(path, Columns(context="", id="id" if rows and "id" in rows[0] else ""))
        if engine_url:
            texts = _generate_engine(engine_url, builder, problems, settings, timeout_s)
        else:
            texts = _generate_local(model, builder, problems, settings)
        n = settings.samples
        scored = pool.score(texts, [p.answer for p in problems for _ in range(n)])
        correct = [sum(scored.correct[i * n:(i + 1) * n]) for i in range(len(problems))]
        result = {"n": len(problems), f"mean@{n}": sum(correct) / (n * max(len(problems), 1))}
        result.update({f"pass@{k}": pass_at_k(correct, n, k) for k in ks_up_to(n)})
        result["verifier_failures"] = scored.timeouts + scored.errors
        out["benchmarks"][name] = result
        if responses_out:
            dump += [{"benchmark": name, "id": p.id, "sample": j, "answer": p.answer,
                      "response": texts[i * n + j], "correct": bool(scored.correct[i * n + j])}
                     for i, p in enumerate(problems) for j in range(n)]
    if responses_out:
        write_rows(responses_out, dump)
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out
