"""Batched sampling with a KV cache on a ``transformers`` causal LM (the CPU server's engine).

A batch of prompts is left-padded, prefilled once, then decoded one token per
step for every unfinished row with the model's KV cache. Log-probs follow
sglang 0.5.23 (``Sampler.forward`` and the input-logprob path):

* output tokens: ``log_softmax(logits / temperature)`` over the full vocabulary,
  before top-k/top-p filtering, in fp32 (greedy requests have temperature 1);
* prompt tokens (``logprob_start_len >= 0``): ``log_softmax(logits)`` of the raw
  logits, temperature not applied; position 0 has no log-prob (``None``).

Every decode step samples all rows at once (``sampling.sample``): a row's draw
at output position ``t`` is a Gumbel-max over noise hashed from its
``sampling_seed``, ``t`` and the token id, so a seeded sample does not depend on
the other rows of its batch. Stop ids, EOS and ``max_new_tokens`` are tensor
masks; only stop strings need Python (decoding the rows that have them).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_sdpg.rollout.server.requests import SampleRequest
from megatron_sdpg.rollout.server.kv_cache import new_cache
from megatron_sdpg.rollout.server.sampling import sample, seed_key


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


_RUNNING, _LENGTH, _STOP_TOKEN, _STOP_STR, _ABORT = 0, 1, 2, 3, 4  # finish codes of a row
_RESERVE = 256  # completion positions the KV cache reserves up front (long completions rarely run to the end)


@dataclass
class _Rows:
    """The per-row sampling settings of the rows in the model's batch, as tensors.

    Attributes:
        temps: ``[b, 1]`` fp32 temperatures.
        top_k: ``[b]`` int64 (0: whole vocabulary, 1: greedy).
        top_p: ``[b]`` fp32.
        keys: ``[b]`` int64 seed keys (``sampling.seed_key``).
        max_new: ``[b]`` int64.
        stop_ids: ``[b, s]`` int64 ids that end a row (stop ids, and EOS unless ignored), padded with -1.
        filtered: Whether any row needs the top-k/top-p mask.
    """

    temps: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    keys: torch.Tensor
    max_new: torch.Tensor
    stop_ids: torch.Tensor
    filtered: bool

    @classmethod
    def of(cls, reqs: list[SampleRequest], eos_ids: set[int], seeds: list[int]) -> "_Rows":
        stops = [sorted(set(r.stop_token_ids) | (set() if r.ignore_eos else eos_ids)) for r in reqs]
        width = max(1, max(len(s) for s in stops))
        return cls(
            temps=torch.tensor([r.temperature for r in reqs], dtype=torch.float32)[:, None],
            top_k=torch.tensor([r.top_k for r in reqs], dtype=torch.long),
            top_p=torch.tensor([r.top_p for r in reqs], dtype=torch.float32),
            keys=torch.tensor([seed_key(s) for s in seeds], dtype=torch.long),
            max_new=torch.tensor([r.max_new_tokens for r in reqs], dtype=torch.long),
            stop_ids=torch.tensor([s + [-1] * (width - len(s)) for s in stops], dtype=torch.long),
            filtered=any(r.top_k > 1 or r.top_p < 1.0 for r in reqs),
        )

    def select(self, idx: torch.Tensor) -> "_Rows":
        """The rows ``idx`` (``[n]`` int64)."""
        return _Rows(self.temps[idx], self.top_k[idx], self.top_p[idx], self.keys[idx], self.max_new[idx],
                     self.stop_ids[idx], self.filtered)


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

    def _forward(self, ids, mask, pos, cache, keep: int):
        kwargs = {self._cache_kw: cache}
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep, **kwargs
        ).logits.float()

    @torch.no_grad()
    def generate(self, reqs: list[SampleRequest], aborted: Callable[[str], bool] | None = None,
                 abort_pending: Callable[[], bool] = lambda: True) -> list[SampleResult]:
        """Generates every request in one batch.

        Each decode step is a handful of tensor ops over all rows: one forward, the
        batched draw (``sampling.sample``), the log-probs, and the stop conditions
        (stop ids, EOS, ``max_new_tokens``) as masks. Only rows with stop strings
        are decoded in Python, and only while they run.

        Args:
            reqs: The samples; prompts may differ in length.
            aborted: Tells whether a rid was aborted; asked for each unfinished row
                before a decode step when ``abort_pending()`` says an abort may concern
                this batch. ``None``: nothing is aborted.
            abort_pending: Cheap check run before every decode step.

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
        steps = max(r.max_new_tokens for r in reqs)
        cache = new_cache(self.model.config, width + min(steps, _RESERVE))  # grows by doubling past that
        logits = self._forward(ids, mask, pos, cache, keep=0 if want_prompt_lp else 1)
        results = [SampleResult() for _ in reqs]
        if want_prompt_lp:
            self._prompt_logprobs(reqs, results, logits, width)
        rows = _Rows.of(reqs, self.eos_ids, [r.seed if r.seed is not None else self._draw_seed() for r in reqs])
        out_ids = torch.full((bsz, max(steps, 1)), self.pad_id, dtype=torch.long)
        out_lp = torch.zeros((bsz, max(steps, 1)), dtype=torch.float32)
        length = torch.zeros(bsz, dtype=torch.long)
        reason = torch.where(rows.max_new == 0, _LENGTH, _RUNNING)  # [b] int64 finish codes
        matched_str: dict[int, str] = {}
        stop_rows = [b for b, r in enumerate(reqs) if r.stop and self.decode is not None]
        live = torch.arange(bsz)  # the rows in the model's batch (finished rows are dropped now and then)
        last, cur_pos = logits[:, -1, :], pos[:, -1]
        for t in range(steps):
            if aborted is not None and abort_pending():
                for b in live.tolist():
                    if reason[b] == _RUNNING and aborted(reqs[b].rid):
                        reason[b] = _ABORT
            running = reason[live] == _RUNNING
            n_running = int(running.sum())
            if n_running == 0:
                break
            if n_running <= len(live) * 7 // 8:  # drop finished rows: less attention and MLP work per step
                keep = running.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                live, rows, running = live[keep], rows.select(keep), running[keep]
                last, mask, cur_pos = last[keep], mask[keep], cur_pos[keep]
            scaled = last / rows.temps
            tok = sample(scaled, rows.keys, torch.tensor(t), rows.top_k, rows.top_p, rows.filtered)
            tok = torch.where(running, tok, self.pad_id)
            out_ids[live, t] = tok
            out_lp[live, t] = scaled.gather(1, tok[:, None])[:, 0] - torch.logsumexp(scaled, dim=-1)
            length[live] += running
            code = reason[live]
            if stop_rows:  # SGLang's order: stop string, then stop token / EOS, then length
                code = torch.where(self._stop_strings(reqs, stop_rows, reason, out_ids[:, : t + 1], matched_str)[live],
                                   _STOP_STR, code)
            code = torch.where((code == _RUNNING) & (tok[:, None] == rows.stop_ids).any(-1), _STOP_TOKEN, code)
            code = torch.where((code == _RUNNING) & (length[live] >= rows.max_new), _LENGTH, code)
            reason[live] = code
            if t + 1 < steps and bool((code == _RUNNING).any()):
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
                cur_pos = cur_pos + 1
                last = self._forward(tok.unsqueeze(1), mask, cur_pos.unsqueeze(1), cache, keep=1)[:, -1, :]
        self._fill_results(reqs, results, length, reason, out_ids, out_lp, matched_str)
        return results

    def _stop_strings(self, reqs, stop_rows: list[int], reason: torch.Tensor, out_ids: torch.Tensor,
                      matched: dict[int, str]) -> torch.Tensor:
        """Running rows whose decoded output ``[b, t]`` now contains a stop string: ``[b]`` bool; fills ``matched``."""
        hit = torch.zeros(len(reqs), dtype=torch.bool)
        for b in stop_rows:
            if reason[b] == _RUNNING:
                text = self.decode(out_ids[b].tolist())
                found = next((s for s in reqs[b].stop if s in text), None)
                if found is not None:
                    matched[b], hit[b] = found, True
        return hit

    @staticmethod
    def _fill_results(reqs, results, length, reason, out_ids, out_lp, matched_str) -> None:
        """Each row's ids and log-probs ``[:length]`` and finish reason, from the ``[b, steps]`` buffers."""
        for b, (r, res, n, code, toks, lps) in enumerate(
                zip(reqs, results, length.tolist(), reason.tolist(), out_ids.tolist(), out_lp.tolist())):
            res.output_ids = toks[:n]
            res.output_logprobs = lps[:n] if r.return_logprob else []
            if code == _ABORT:
                res.finish_reason = {"type": "abort", "message": "Aborted by /abort_request"}
            elif code == _STOP_STR:
                res.finish_reason = {"type": "stop", "matched": matched_str[b]}
            elif code == _STOP_TOKEN:
                res.finish_reason = {"type": "stop", "matched": toks[n - 1]}
            else:
                res.finish_reason = {"type": "length", "length": r.max_new_tokens}

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
