"""Hidden states instead of logits from a ``GPTModel``'s last stage (``algorithm.fused_output``).

Under :func:`emit_hidden_states` the model's column-parallel output layer passes
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
