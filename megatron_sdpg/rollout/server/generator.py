"""Batched sampling with a KV cache on a ``transformers`` causal LM (the CPU server's engine).

A batch of prompts is left-padded, prefilled once, then decoded one token per
step for every unfinished row with the model's KV cache. Log-probs follow
sglang 0.5.23 (``Sampler.forward`` and the input-logprob path):

* output tokens: ``log_softmax(logits / temperature)`` over the full vocabulary,
  before top-k/top-p filtering, in fp32 (greedy requests have temperature 1);
* prompt tokens (``logprob_start_len >= 0``): ``log_softmax(logits)`` of the raw
  logits, temperature not applied; position 0 has no log-prob (``None``).

Each sample draws from its own ``torch.Generator`` seeded with its
``sampling_seed``, so a seeded sample does not depend on the other rows.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_sdpg.rollout.server.requests import SampleRequest


@dataclass
class SampleResult:
    """What the server reports for one sample.

    Attributes:
        output_ids: Generated ids ``[c]``.
        output_logprobs: Log-prob of each generated id ``[c]``.
        input_logprobs: Prompt log-probs from ``logprob_start_len`` on (``None`` at position 0).
        finish_reason: SGLang's finish reason dict.
    """

    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    input_logprobs: list[float | None] = field(default_factory=list)
    finish_reason: dict | None = None


def _filtered_probs(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling distribution of one row after top-k and top-p, ``[v] -> [v]``."""
    probs = torch.softmax(scaled, dim=-1)
    if top_k > 0:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        drop = (cum - sorted_p) > top_p * cum[-1]  # keep the smallest prefix reaching top_p
        sorted_p = torch.where(drop, torch.zeros_like(sorted_p), sorted_p)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return probs / probs.sum()


class BatchGenerator:
    """Samples completions for batches of ``SampleRequest`` with one ``transformers`` model.

    Args:
        model: A causal LM in eval mode (fp32 recommended: log-probs are compared in fp32).
        eos_ids: Token ids that end a sample unless ``ignore_eos``.
        decode: ``list[int] -> str`` for stop strings and ``text``, or ``None``.
        seed: Seeds the generator that gives unseeded samples their seeds.
        pad_id: Token fed in padded or finished positions (never attended to).
    """

    def __init__(self, model, eos_ids: set[int], decode: Callable[[list[int]], str] | None, seed: int, pad_id: int = 0):
        self.model = model
        self.eos_ids = set(eos_ids)
        self.decode = decode
        self.pad_id = pad_id
        self._seed_gen = torch.Generator().manual_seed(seed)
        params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values to cache.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:
            return DynamicCache()

    def _forward(self, ids, mask, pos, cache, keep: int):
        kwargs = {self._cache_kw: cache}
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep, **kwargs
        ).logits.float()

    @torch.no_grad()
    def generate(self, reqs: list[SampleRequest], aborted: Callable[[str], bool] = lambda rid: False) -> list[SampleResult]:
        """Generates every request in one batch.

        Args:
            reqs: The samples; prompts may differ in length.
            aborted: Checked for each unfinished rid before every decode step.

        Returns:
            One ``SampleResult`` per request, in order.
        """
        bsz = len(reqs)
        width = max(len(r.input_ids) for r in reqs)
        ids = torch.full((bsz, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, width), dtype=torch.long)
        for b, r in enumerate(reqs):
            ids[b, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[b, width - len(r.input_ids):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        want_prompt_lp = any(r.return_logprob and r.logprob_start_len >= 0 for r in reqs)
        cache = self._new_cache()
        logits = self._forward(ids, mask, pos, cache, keep=0 if want_prompt_lp else 1)
        results = [SampleResult() for _ in reqs]
        if want_prompt_lp:
            self._prompt_logprobs(reqs, results, logits, width)
        last = logits[:, -1, :]
        gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else self._draw_seed()) for r in reqs]
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32).unsqueeze(-1)
        done = [False] * bsz
        for b, r in enumerate(reqs):
            if r.max_new_tokens == 0:
                self._finish(results[b], r, {"type": "length", "length": 0})
                done[b] = True
        cur_pos = pos[:, -1]
        while not all(done):
            scaled = last / temps
            logprobs = torch.log_softmax(scaled, dim=-1)
            next_ids = torch.full((bsz,), self.pad_id, dtype=torch.long)
            for b, r in enumerate(reqs):
                if done[b]:
                    continue
                if aborted(r.rid):
                    self._finish(results[b], r, {"type": "abort", "message": "Aborted by /abort_request"})
                    done[b] = True
                    continue
                if r.top_k == 1:
                    tok = int(torch.argmax(scaled[b]))
                else:
                    probs = _filtered_probs(scaled[b], r.top_k, r.top_p)
                    tok = int(torch.multinomial(probs, 1, generator=gens[b]))
                next_ids[b] = tok
                res = results[b]
                res.output_ids.append(tok)
                if r.return_logprob:
                    res.output_logprobs.append(float(logprobs[b, tok]))
                reason = self._check_finished(r, res)
                if reason is not None:
                    self._finish(res, r, reason)
                    done[b] = True
            if all(done):
                break
            mask = torch.cat([mask, torch.ones((bsz, 1), dtype=torch.long)], dim=1)
            cur_pos = cur_pos + 1
            last = self._forward(next_ids.unsqueeze(1), mask, cur_pos.unsqueeze(1), cache, keep=1)[:, -1, :]
        return results

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seed_gen))

    def _prompt_logprobs(self, reqs, results, logits: torch.Tensor, width: int) -> None:
        """Fills ``input_logprobs`` from the prefill logits ``[b, width, v]``."""
        raw = torch.log_softmax(logits, dim=-1)
        for b, r in enumerate(reqs):
            if not (r.return_logprob and r.logprob_start_len >= 0):
                continue
            p = len(r.input_ids)
            off = width - p
            out: list[float | None] = []
            for j in range(r.logprob_start_len, p):
                out.append(None if j == 0 else float(raw[b, off + j - 1, r.input_ids[j]]))
            results[b].input_logprobs = out

    def _check_finished(self, r: SampleRequest, res: SampleResult) -> dict | None:
        """SGLang's order: stop string, then stop token / EOS, then length."""
        tok = res.output_ids[-1]
        if r.stop and self.decode is not None:
            text = self.decode(res.output_ids)
            for s in r.stop:
                if s in text:
                    return {"type": "stop", "matched": s}
        if tok in r.stop_token_ids or (not r.ignore_eos and tok in self.eos_ids):
            return {"type": "stop", "matched": tok}
        if len(res.output_ids) >= r.max_new_tokens:
            return {"type": "length", "length": r.max_new_tokens}
        return None

    def _finish(self, res: SampleResult, r: SampleRequest, reason: dict) -> None:
        res.finish_reason = reason
        if not r.return_logprob:
            res.output_logprobs = []
