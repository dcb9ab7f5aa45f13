"""FLOPs of an SDPG training step and the time they take at an assumed MFU.

Forward FLOPs of one sequence of ``s`` tokens (matmuls only; norms, RoPE,
softmax and the vocab-parallel KL are elementwise and left out):

    2 * s * (L * W_layer + V * h)  +  2 * L * H * d * s * s

where ``W_layer`` is a layer's matrix weights (QKV, proj, fc1, fc2) and the
last term is causal attention (``Q K^T`` and ``A V``, half the ``s x s`` square).
A backward pass costs twice its forward; full recomputation adds one more
forward of the layers. An SDPG step runs, per response:

* the update (forward + backward) on the student sequence, ``ppo_epochs`` times;
* the teacher forward on the teacher sequence (when ``beta > 0``);
* the reference forward on the student sequence (when a reference is kept);
* the old-policy forward (when there is more than one update per rollout).

Time = FLOPs / (GPUs x peak x MFU), stretched by the 1F1B pipeline bubble
``(pp - 1) / (m * vpp)`` for ``m`` micro-batches per rank. Rollout generation
(SGLang) and weight sync are not modelled: they are measured by the scaling study.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.planning.assumptions import PlanAssumptions
from megatron_sdpg.planning.params import layer_params
from megatron_sdpg.planning.workload import Workload
from megatron_sdpg.platform.layout import ParallelLayout


def forward_flops(cfg: ModelConfig, seq_len: int, with_head: bool = True) -> float:
    """Forward matmul FLOPs of one sequence of ``seq_len`` tokens (true vocabulary)."""
    layers = cfg.num_layers * layer_params(cfg, tp=1).matmul
    head = cfg.vocab_size * cfg.hidden_size if with_head else 0
    attention = 2 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels * seq_len * seq_len
    return 2.0 * seq_len * (layers + head) + attention


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one step over the whole cluster, by pass, and the time estimate.

    Attributes:
        update, teacher, reference, old_policy: FLOPs of each pass (all sequences).
        bubble: Pipeline-bubble fraction added to the compute time.
        gpus: GPUs sharing the work.
        seconds: Estimated time of the training passes of one step.
    """

    update: float
    teacher: float
    reference: float
    old_policy: float
    bubble: float
    gpus: int
    seconds: float

    @property
    def total(self) -> float:
        return self.update + self.teacher + self.reference + self.old_policy


def step_flops(cfg: ModelConfig, layout: ParallelLayout, work: Workload, assume: PlanAssumptions) -> StepFlops:
    """FLOPs and estimated seconds of the training passes of one step.

    Sequences are taken at their padded maximum length (the packer pads every
    micro-batch of a step to the longest sequence), so this is the worst case.
    """
    n = work.sequences_per_step
    student = forward_flops(cfg, work.student_len)
    recompute = forward_flops(cfg, work.student_len, with_head=False) if cfg.recompute else 0.0
    update = n * work.update_passes * (3 * student + recompute)
    teacher = n * forward_flops(cfg, work.teacher_len) if work.teacher_forward else 0.0
    reference = n * student if work.reference_model else 0.0
    old = n * student if work.old_logprob_pass else 0.0
    m = work.microbatches_per_rank(layout.dp)
    bubble = (layout.pp - 1) / (m * (layout.vpp or 1))
    total = update + teacher + reference + old
    seconds = total / (layout.world_size * assume.peak_tflops * 1e12 * assume.mfu) * (1 + bubble)
    return StepFlops(update=update, teacher=teacher, reference=reference, old_policy=old, bubble=bubble,
                     gpus=layout.world_size, seconds=seconds)
