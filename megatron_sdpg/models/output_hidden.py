"""The last stage's output layer on the rows the loss reads, or hidden states instead of logits.

:func:`select_output_rows` makes the output layer of a ``GPTModel``'s last stage
see only the hidden states of the positions whose logits the loss reads (those
predicting a response token): ``[T, 1, V/tp]`` logits instead of ``[s, b, V/tp]``,
and no logits, gradient or memory at prompt and padding positions.

Under :func:`emit_hidden_states` (``algorithm.fused_output``) the model's column-parallel output layer passes
its input through, so ``GPTModel.forward`` returns the final hidden states
``[b, s, h]`` (after the final norm, in the slot of the ``[b, s, V/tp]`` logits)
and the loss computes the vocabulary terms from them with
``ops.fused_output`` and :func:`output_weight`. The output layer's parameter
stays in the model (optimizer, DDP buckets and checkpoints are untouched); the
gradient reaches it through the fused op instead of the layer.
"""

from __future__ import annotations

import contextlib

import torch


def unwrap(model):
    """The ``GPTModel`` inside any wrappers (DDP, Float16Module: each has ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def is_last_stage(model) -> bool:
    """Whether this chunk computes the output layer (``post_process``)."""
    return bool(getattr(unwrap(model), "post_process", False))


def output_weight(model) -> torch.Tensor:
    """This rank's ``[V/tp, h]`` vocabulary shard of the output layer (the embedding when tied).

    Args:
        model: A ``GPTModel`` chunk with ``post_process`` (DDP-wrapped or bare).
    """
    m = unwrap(model)
    if m.share_embeddings_and_output_weights:
        return m.shared_embedding_or_output_weight()
    return m.output_layer.weight


def _pass_through(hidden_states, weight=None, runtime_gather_output=None):
    return hidden_states, None


@contextlib.contextmanager
def emit_hidden_states(model):
    """Within the block, ``model`` (a last-stage ``GPTModel`` chunk) returns ``[b, s, h]`` hidden states.

    Chunks without ``post_process`` are unchanged (they return hidden states anyway).

    Raises:
        ValueError: with sequence parallelism, whose hidden states are split over
            TP (the fused op takes them whole); not supported yet.
    """
    m = unwrap(model)
    layer = getattr(m, "output_layer", None) if is_last_stage(m) else None
    if layer is None:
        yield
        return
    if getattr(layer, "sequence_parallel", False):
        raise ValueError("algorithm.fused_output does not support parallel.sequence_parallel yet")
    layer.forward = _pass_through  # the instance attribute shadows ColumnParallelLinear.forward
    try:
        yield
    finally:
        del layer.forward


def _flat_rows_to_seq_major(rows: torch.Tensor, s: int, b: int) -> torch.Tensor:
    """Batch-major flat rows ``i * s + t`` of ``[b, s]`` as seq-major rows ``t * b + i`` of ``[s, b]``."""
    return (rows % s) * b + torch.div(rows, s, rounding_mode="floor")


@contextlib.contextmanager
def select_output_rows(model, rows: torch.Tensor | None, hidden: bool = False):
    """Within the block, ``model``'s last stage runs its output layer on ``rows`` only.

    The output layer receives ``[s, b, h]`` final hidden states; it gets the
    ``[T, 1, h]`` rows ``rows`` instead (in the order of ``rows``), so
    ``GPTModel.forward`` returns ``[1, T, V/tp]`` logits, or with ``hidden``
    (``algorithm.fused_output``) the ``[1, T, h]`` hidden states themselves.
    The gradient flows back to the selected rows only (zero elsewhere), as it
    does when the loss reads those rows of full logits. Chunks without
    ``post_process`` are unchanged.

    With sequence parallelism the output layer's input is split over TP and
    the rows are not selected: the block yields False and the model returns
    full ``[b, s, V/tp]`` logits (``hidden`` is refused there, see
    :func:`emit_hidden_states`).

    Args:
        model: A ``GPTModel`` chunk (DDP-wrapped or bare).
        rows: ``[T]`` flat row indices into ``[b * s]`` (batch-major, as
            :func:`~megatron_sdpg.train.batch.collate` builds them); None keeps
            every position.
        hidden: Return hidden states instead of logits (see :func:`emit_hidden_states`).

    Yields:
        Whether the last stage's output is the selected ``[1, T, ...]`` rows.
    """
    m = unwrap(model)
    layer = getattr(m, "output_layer", None) if is_last_stage(m) else None
    if layer is None or rows is None or getattr(layer, "sequence_parallel", False):
        if hidden:
            with emit_hidden_states(model):
                yield False
        else:
            yield False
        return
    original = layer.forward

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        s, b, h = hidden_states.shape  # [s, b, h]
        index = _flat_rows_to_seq_major(rows.to(hidden_states.device), s, b)
        selected = hidden_states.reshape(s * b, h).index_select(0, index).unsqueeze(1)  # [T, 1, h]
        if hidden:
            return selected, None
        return original(selected, weight=weight, runtime_gather_output=runtime_gather_output)

    layer.forward = forward  # the instance attribute shadows ColumnParallelLinear.forward
    try:
        yield True
    finally:
        del layer.forward
