"""Proving a conversion by logits: Megatron forward vs ``transformers`` on greedy decodes.

:func:`megatron_logits` runs the pipeline schedule forward-only on any TP/PP
layout and returns the full-vocabulary logits on global rank 0.
:func:`compare_with_hf` greedy-decodes prompts with the HF model, scores the
decoded sequences with both models and reports, per prompt, the maximum
absolute logit difference, the KL divergence KL(HF || Megatron) of the
next-token distributions, and whether Megatron's greedy choices agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sdpg.platform.distributed import ParallelGroups


@torch.no_grad()
def megatron_logits(chunks: list, groups: ParallelGroups, tokens: torch.Tensor, true_vocab: int) -> torch.Tensor | None:
    """Full-vocabulary logits of ``tokens`` (causal, positions ``0..s-1``).

    Every rank calls it with the same ``tokens``; data-parallel replicas compute
    redundantly.

    Args:
        chunks: This rank's bare ``GPTModel`` chunks (one chunk: no virtual stages).
        groups: Process groups of this rank.
        tokens: ``[b, s]`` token ids.
        true_vocab: Unpadded vocabulary size; padded columns are dropped.

    Returns:
        ``[b, s, true_vocab]`` float32 logits on global rank 0, ``None`` elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if len(chunks) != 1:
        raise ValueError("megatron_logits supports one model chunk per rank (no virtual pipeline stages)")
    model = chunks[0]
    model.eval()
    device = next(model.parameters()).device
    b, s = tokens.shape
    batch = {"tokens": tokens.to(device), "position_ids": torch.arange(s, device=device).expand(b, s)}

    def forward_step(data_iterator, chunk):
        mb = next(data_iterator)
        out = chunk(mb["tokens"], mb["position_ids"], None)

        def keep_logits(logits):
            return logits.sum() * 0, torch.tensor(1, dtype=torch.int), {"logits": logits.detach().float()}

        return out, keep_logits

    fb = get_forward_backward_func(groups.layout.pp, None)
    store = fb(forward_step_func=forward_step, data_iterator=iter([batch]), model=model, num_microbatches=1,
               seq_length=s, micro_batch_size=b, forward_only=True)
    tp, pp = groups.layout.tp, groups.layout.pp
    out = None
    if groups.is_last_stage:
        local = store[0]["logits"].contiguous()
        pieces = [local]
        if tp > 1:
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local, group=groups.tp)
        out = torch.cat(pieces, dim=-1)[..., :true_vocab].contiguous()
    if pp > 1 and groups.dp_rank == 0 and groups.tp_rank == 0:
        if groups.is_last_stage:
            dist.send(out, dst=dist.get_global_rank(groups.pp, 0), group=groups.pp)
        elif groups.pp_rank == 0:
            out = torch.empty(b, s, true_vocab, dtype=torch.float32, device=device)
            dist.recv(out, src=dist.get_global_rank(groups.pp, pp - 1), group=groups.pp)
    return out.cpu() if dist.get_rank() == 0 else None


@dataclass
class PromptReport:
    """Agreement on one greedy-decoded prompt."""

    prompt: int
    tokens: int
    max_abs_diff: float
    kl_mean: float
    kl_max: float
    greedy_agree: bool


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(softmax(ref) || softmax(logits)) in float64: ``[..., v] -> [...]``."""
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


def greedy_decode_hf(hf_model, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Greedy continuations of each ``[s]`` prompt (no EOS stop): ``[s + new_tokens]`` each."""
    out = []
    for prompt in prompts:
        seq = prompt.view(1, -1)
        for _ in range(new_tokens):
            nxt = hf_model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq[0])
    return out


@torch.no_grad()
def compare_with_hf(chunks: list, groups: ParallelGroups, hf_model, prompts: list[torch.Tensor],
                    new_tokens: int, true_vocab: int) -> list[PromptReport] | None:
    """Greedy-decodes with ``hf_model`` (rank 0) and scores each sequence with both models.

    Every rank calls it; ``hf_model`` is only used on global rank 0 (pass ``None``
    elsewhere). Sequences are broadcast from rank 0.

    Returns:
        One :class:`PromptReport` per prompt on global rank 0, ``None`` elsewhere.
    """
    rank0 = dist.get_rank() == 0
    seqs = greedy_decode_hf(hf_model, prompts, new_tokens) if rank0 else None
    box = [seqs]
    dist.broadcast_object_list(box, src=0)
    reports = []
    for i, (prompt, seq) in enumerate(zip(prompts, box[0])):
        mlogits = megatron_logits(chunks, groups, seq.view(1, -1), true_vocab)
        if not rank0:
            continue
        hlogits = hf_model(input_ids=seq.view(1, -1)).logits.float()
        kl = kl_divergence(hlogits, mlogits)
        start = prompt.numel() - 1
        greedy = mlogits[0, start:-1].argmax(-1)
        reports.append(PromptReport(
            prompt=i, tokens=seq.numel(), max_abs_diff=(hlogits - mlogits).abs().max().item(),
            kl_mean=kl.mean().item(), kl_max=kl.max().item(),
            greedy_agree=bool(torch.equal(greedy, seq[start + 1:])),
        ))
    return reports if rank0 else None


def format_reports(reports: list[PromptReport]) -> str:
    """A fixed-width table of the reports."""
    lines = [f"{'prompt':>6} {'tokens':>6} {'max|dlogit|':>12} {'KL mean':>10} {'KL max':>10} {'greedy':>6}"]
    for r in reports:
        lines.append(f"{r.prompt:>6} {r.tokens:>6} {r.max_abs_diff:>12.3e} {r.kl_mean:>10.3e} {r.kl_max:>10.3e} "
                     f"{'same' if r.greedy_agree else 'DIFF':>6}")
    return "\n".join(lines)
