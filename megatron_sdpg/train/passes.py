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

The teacher view of a micro-batch is normally not a pass of its own: it runs
inside the student's pipeline schedule, right before the student view of the
same micro-batch (:func:`forward_with_teacher`). Each stage runs the teacher rows
without gradient and the student rows with it, and sends both on, concatenated
along the sequence: ``[s + s_t, b, h]``, the teacher part detached. The last
stage keeps the teacher's ``[T, V/tp]`` logits (``[T, h]`` hidden states with
``algorithm.fused_output``) only until that micro-batch's backward: teacher
memory is O(micro-batches in flight), not O(micro-batches per step). The teacher
chunk may be another model (the frozen initial policy of OPSD).

:func:`teacher_pass` (the pre-pass) remains for the one case that needs the
teacher of weights that no longer exist when the student runs: several updates
per step with the teacher of the step's starting weights (the paper's setting,
``algorithm.teacher_per_microbatch=False``). It keeps every micro-batch's
teacher data on the last stage until the step ends.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_sdpg.models.builder import mask_padded_vocab
from megatron_sdpg.models.output_hidden import is_last_stage, output_weight, select_output_rows, unwrap
from megatron_sdpg.train.teacher_memory import TeacherMemory


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


def _stash_teacher(weights: dict, memory: TeacherMemory | None, mb: dict, logits: torch.Tensor):
    key = "teacher_logits"
    if mb.get("emit_hidden"):  # [b, s, h] hidden states; the output shard as of this pass, copied once
        if "w" not in weights:
            weights["w"] = mb["output_weight"].detach().clone()
        mb["_source"]["teacher_output_weight"] = weights["w"]
        key = "teacher_hidden"
    mb["_source"][key] = response_logits(logits, mb).detach()
    if memory is not None:
        memory.track(mb["_source"][key])
    return _zero_loss(logits)


def log_prob_pass(model, microbatches: list[dict], key: str, temperature: float) -> None:
    """Stores ``mb[key]`` = ``[T]`` response log-probs under ``model`` (last stage only).

    Args:
        model: A :class:`~megatron_sdpg.train.step.PolicyModel` (policy or reference).
        microbatches: From :func:`~megatron_sdpg.train.batch.plan_microbatches`.
        key: ``ref_log_probs`` or ``old_log_probs``.
        temperature: Sampling temperature (log-probs of the scaled distribution).
    """
    views = [dict(mb, _source=mb, emit_hidden=False, inline_teacher=False) for mb in microbatches]
    model.forward_only(views, partial(_stash_log_probs, key, model.groups.tp_group_or_none, temperature))


def teacher_pass(model, microbatches: list[dict], hidden: bool = False, memory: TeacherMemory | None = None) -> None:
    """Stores ``mb['teacher_logits']`` ``[T, V/tp]`` from the teacher view of each micro-batch.

    With ``hidden`` (``algorithm.fused_output``) it stores ``mb['teacher_hidden']``
    ``[T, h]`` instead, and ``mb['teacher_output_weight']``: one copy of the last
    stage's ``[V/tp, h]`` output shard as it is now, shared by every micro-batch
    (later updates of the step must not change the teacher). ``memory`` counts
    what is kept (all micro-batches of the call, until the caller drops them).
    """
    views = [
        dict(mb, tokens=mb["teacher_tokens"], position_ids=mb["teacher_position_ids"],
             attention_mask=mb.get("teacher_attention_mask"), resp_rows=mb["teacher_resp_rows"], _source=mb,
             emit_hidden=hidden, inline_teacher=False)
        for mb in microbatches
    ]
    model.forward_only(views, partial(_stash_teacher, {}, memory))


def view_forward(model_chunk, tokens: torch.Tensor, position_ids: torch.Tensor, hidden: bool,
                 rows: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, bool]:
    """One view through this stage's chunk.

    ``attention_mask``: ``None`` (causal) or ``[b, 1, s, s]`` bool, True where a
    position may not attend (packed rows, :func:`~megatron_sdpg.train.batch.collate`).

    Returns:
        ``(output, selected)``: on the last stage ``[b, s, V/tp]`` logits (``[b, s, h]``
        hidden states with ``hidden``), or ``[1, T, ...]`` at the ``[T]`` flat ``rows``
        only when ``selected`` (see :func:`~megatron_sdpg.models.output_hidden.select_output_rows`);
        ``[s, b, h]`` activations elsewhere (``selected`` False).
    """
    with select_output_rows(model_chunk, rows, hidden=hidden) as selected:
        return model_chunk(tokens, position_ids, attention_mask), selected


def forward_with_teacher(model_chunk, teacher_chunk, mb: dict, true_vocab: int, tp_rank: int,
                         sequence_parallel_tp: int = 1, memory: TeacherMemory | None = None,
                         select_rows: bool = True) -> torch.Tensor:
    """One micro-batch on this pipeline stage: its teacher view (no gradient), then its student view.

    Megatron's schedule has set the stage's input from the previous stage:
    ``[s + s_t, b, h]``, the student rows then the teacher rows (each divided by
    TP under sequence parallelism), or None on the first stage. It must have
    been told ``seq_length = s + s_t`` (:meth:`PolicyModel._run` does).

    Args:
        model_chunk: The student's chunk of this stage (DDP-wrapped or bare).
        teacher_chunk: The teacher's chunk of the same stage: ``model_chunk``
            itself (current weights) or another model's (the frozen initial policy).
        mb: The micro-batch: ``tokens``/``position_ids`` ``[b, s]``,
            ``teacher_tokens``/``teacher_position_ids`` ``[b, s_t]``,
            ``teacher_resp_rows`` ``[T]``, ``emit_hidden``.
        true_vocab: The unpadded vocabulary (padded logits are masked).
        tp_rank: This rank's TP rank (which vocabulary shard it holds).
        sequence_parallel_tp: TP size when sequence parallelism splits the
            activations' sequence over TP, else 1.
        memory: Counts the teacher data this stage holds.
        select_rows: Run the last stage's output layer on the response rows only
            (``teacher_resp_rows`` for the teacher, ``resp_rows`` for the student;
            ``mb['rows_selected']`` says whether the student's were).

    Returns:
        On the last stage the student's ``[b, s, V/tp]`` logits (``[b, s, h]``
        with ``emit_hidden``), and ``mb['teacher_logits']`` ``[T, V/tp]`` (padded
        vocabulary masked) or ``mb['teacher_hidden']`` ``[T, h]`` (plus
        ``mb['teacher_output_weight']`` when the teacher is another model) for the
        loss. Elsewhere ``[s + s_t, b, h]``: the student's activations (with their
        graph) and the teacher's (detached) for the next stage.
    """
    student, teacher = unwrap(model_chunk), unwrap(teacher_chunk)
    hidden = bool(mb.get("emit_hidden"))
    received = student.decoder.input_tensor if not student.pre_process else None
    x_s = x_t = None
    if received is not None:
        rows = mb["tokens"].shape[1] // sequence_parallel_tp
        x_s, x_t = received[:rows], received[rows:]
        if memory is not None:
            memory.track(received, x_t.numel() * x_t.element_size())
    last = is_last_stage(student)
    with torch.no_grad():
        teacher.set_input_tensor(x_t)
        t_rows = mb["teacher_resp_rows"] if select_rows else None
        t_out, t_selected = view_forward(teacher_chunk, mb["teacher_tokens"], mb["teacher_position_ids"], hidden,
                                         t_rows, mb.get("teacher_attention_mask"))
        if last:  # keep the response rows only: any full [b, s_t, V/tp] logits go before the student's exist
            if not hidden:
                mask_padded_vocab(t_out, true_vocab, tp_rank)
            kept = response_logits(t_out, {"rows": mb["teacher_resp_rows"], "rows_selected": t_selected}, "rows")
            del t_out
            mb["teacher_hidden" if hidden else "teacher_logits"] = kept
            if hidden and teacher is not student:
                mb["teacher_output_weight"] = output_weight(teacher_chunk).detach()
            if memory is not None:
                memory.track(kept)
    student.set_input_tensor(x_s)
    s_out, mb["rows_selected"] = view_forward(model_chunk, mb["tokens"], mb["position_ids"], hidden,
                                              mb.get("resp_rows") if select_rows else None, mb.get("attention_mask"))
    # The chunks would keep the received tensor alive until the next micro-batch; the graph holds what backward needs.
    student.set_input_tensor(None)
    teacher.set_input_tensor(None)
    if last:
        return s_out
    out = torch.cat([s_out, t_out], dim=0)
    if memory is not None:
        memory.track(out, t_out.numel() * t_out.element_size())
    return out

