"""The no-gradient passes of an SDPG step: reference, old-policy and teacher.

Each pass runs the model through megatron's pipeline schedule with
``forward_only=True`` and a "loss" function that, on the last pipeline stage,
stores what later passes need into the micro-batch dict itself:

* ``ref_log_probs`` / ``old_log_probs``: ``[T]`` fp32 log-probs of the response
  tokens under the reference / pre-update policy (vocab-parallel, never gathered);
* ``teacher_logits``: ``[T, V/tp]`` logits of the *current* weights on the
  teacher sequence (privileged prompt + the same response), detached; with
  ``algorithm.fused_output`` the ``[T, h]`` hidden states ``teacher_hidden``
  instead (and the output shard they are scored with).

With pipeline parallelism the teacher must go through every stage, so it is a
separate pass whose logits are kept until the student pass (memory: ``T x V/tp``
per micro-batch on the last stage). Without pipeline parallelism the teacher
forward runs inline, right before the student forward of the same micro-batch
(:func:`inline_teacher_forward`), so only one micro-batch of teacher logits is
alive at a time.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_sdpg.models.builder import mask_padded_vocab
from megatron_sdpg.models.output_hidden import select_output_rows


def response_logits(logits: torch.Tensor, mb: dict, rows_key: str = "resp_rows") -> torch.Tensor:
    """The ``[T, V/tp]`` logits (or ``[T, h]`` hidden states) predicting the response tokens.

    Args:
        logits: The model output of micro-batch ``mb``: ``[1, T, V/tp]`` when the
            forward selected the rows (``mb['rows_selected']``), else ``[b, s, V/tp]``.
        mb: The micro-batch (or pass view) the forward ran on.
        rows_key: Its ``[T]`` flat row indices into ``[b*s]``.

    Returns:
        A view of ``logits`` when the rows were selected, else an ``index_select`` copy.
    """
    rows = mb[rows_key]
    flat = logits.reshape(-1, logits.shape[-1])
    if mb.get("rows_selected"):
        if flat.shape[0] != rows.numel():
            raise ValueError(f"{flat.shape[0]} selected rows for {rows.numel()} response tokens")
        return flat
    return flat.index_select(0, rows.to(logits.device))


def _zero_loss(logits: torch.Tensor):
    zero = logits.new_zeros(())
    return zero, torch.tensor(0, dtype=torch.int), {}


def _stash_log_probs(key: str, tp_group, temperature: float, mb: dict, logits: torch.Tensor):
    from megatron_sdpg.ops.vocab_parallel import token_log_probs

    resp = response_logits(logits, mb)
    lp = token_log_probs(resp, mb["target"].to(resp.device), tp_group=tp_group, temperature=temperature)
    mb["_source"][key] = lp.detach().float()
    return _zero_loss(logits)


def _stash_teacher(weights: dict, mb: dict, logits: torch.Tensor):
    if mb.get("emit_hidden"):  # [b, s, h] hidden states; the output shard as of this pass, copied once
        if "w" not in weights:
            weights["w"] = mb["output_weight"].detach().clone()
        mb["_source"]["teacher_hidden"] = response_logits(logits, mb).detach()
        mb["_source"]["teacher_output_weight"] = weights["w"]
        return _zero_loss(logits)
    mb["_source"]["teacher_logits"] = response_logits(logits, mb).detach()
    return _zero_loss(logits)


def log_prob_pass(model, microbatches: list[dict], key: str, temperature: float) -> None:
    """Stores ``mb[key]`` = ``[T]`` response log-probs under ``model`` (last stage only).

    Args:
        model: A :class:`~megatron_sdpg.train.step.PolicyModel` (policy or reference).
        microbatches: From :func:`~megatron_sdpg.train.batch.plan_microbatches`.
        key: ``ref_log_probs`` or ``old_log_probs``.
        temperature: Sampling temperature (log-probs of the scaled distribution).
    """
    views = [dict(mb, _source=mb, emit_hidden=False) for mb in microbatches]
    model.forward_only(views, partial(_stash_log_probs, key, model.groups.tp_group_or_none, temperature))


def teacher_pass(model, microbatches: list[dict], hidden: bool = False) -> None:
    """Stores ``mb['teacher_logits']`` ``[T, V/tp]`` from the teacher view of each micro-batch.

    With ``hidden`` (``algorithm.fused_output``) it stores ``mb['teacher_hidden']``
    ``[T, h]`` instead, and ``mb['teacher_output_weight']``: one copy of the last
    stage's ``[V/tp, h]`` output shard as it is now, shared by every micro-batch
    (later updates of the step must not change the teacher).
    """
    views = [
        dict(mb, tokens=mb["teacher_tokens"], position_ids=mb["teacher_position_ids"],
             resp_rows=mb["teacher_resp_rows"], _source=mb, emit_hidden=hidden, inline_teacher=False)
        for mb in microbatches
    ]
    model.forward_only(views, partial(_stash_teacher, {}))


def inline_teacher_forward(model_chunk, mb: dict, true_vocab: int, tp_rank: int, select_rows: bool = True) -> None:
    """Teacher forward for one micro-batch, just before its student forward (PP=1).

    Stores ``mb['teacher_logits']`` ``[T, V/tp]`` (no gradient); with ``mb['emit_hidden']``
    (``algorithm.fused_output``) ``mb['teacher_hidden']`` ``[T, h]`` instead. With
    ``select_rows`` the output layer runs on the ``T`` response rows only.
    """
    rows = mb["teacher_resp_rows"] if select_rows else None
    hidden = bool(mb.get("emit_hidden"))
    with torch.no_grad():
        with select_output_rows(model_chunk, rows, hidden=hidden) as selected:
            out = model_chunk(mb["teacher_tokens"], mb["teacher_position_ids"], None)
        view = {"rows": mb["teacher_resp_rows"], "rows_selected": selected}
        if hidden:
            mb["teacher_hidden"] = response_logits(out, view, "rows")
            return
        mask_padded_vocab(out, true_vocab, tp_rank)
        mb["teacher_logits"] = response_logits(out, view, "rows")
