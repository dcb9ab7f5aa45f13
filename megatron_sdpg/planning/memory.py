"""Per-GPU memory of an SDPG training step, term by term, for every pipeline stage.

The model (bytes; ``e`` = 2 for bf16, 4 for fp32; ``P`` = this GPU's parameters):

* weights ``e*P``; gradients ``4*P`` (megatron's DDP reduces into fp32 ``main_grad``);
* optimizer: Adam moments ``8*P`` plus, for bf16, fp32 master weights ``4*P``;
  divided by ``dp*cp`` with the distributed optimizer;
* reference weights ``e*P`` when a frozen copy is kept (reference KL, OPSD teacher);
* activations of one micro-batch ``[b, s]`` per layer, as saved for backward by a
  Llama/Qwen layer without dropout: the two RMSNorm inputs and the two linear
  inputs after them (``4h``), q/k/v (``(H+2K)d/tp``), the attention output
  (``Hd/tp``), the gated-MLP ``fc1`` output and ``fc2`` input (``3f/tp``), plus the
  ``s x s`` softmax per head without fused attention; with full recomputation only
  each layer's input (``h``) is kept, and one layer is re-materialised at a time.
  Stage ``i`` of a 1F1B pipeline holds ``min(m, pp - i)`` micro-batches in flight,
  plus one layer's transient gradients during backward;
* logits and KL buffers on the last stage: the output layer runs on the ``[T]`` response
  rows only (``models/output_hidden.py``), so the ``[T, V/tp]`` logits and, in the loss,
  the fused KL kernel's three ``[chunk, V/tp]`` fp32 work buffers; in backward the kernel
  writes the rows' gradient in place (``inplace_backward``) (measured on CPU:
  tests/dist/test_planner_vs_measured.py; before the row selection the ``[b, s, V/tp]``
  logits of every position and their transposed copy were also alive);
* the teacher's ``[T, V/tp]`` logits: those of the last stage's in-flight micro-batches
  (one under 1F1B) when the teacher view of each micro-batch is computed right before
  its student view (inline at ``pp == 1``; inside the pipeline schedule at ``pp > 1``,
  ``PlanAssumptions.teacher_in_schedule``), every micro-batch of the step when a
  pre-pass precedes the update (several updates per step without
  ``teacher_per_microbatch``, the frozen initial teacher; train/passes.py);
* with the teacher inside the pipeline schedule (``pp > 1``), the teacher halves of the
  ``[s + s_t, b, h]`` activations every stage receives and sends: ``min(pp - i + 1, m)``
  ``[s_t, b, h]`` halves on the first and last stage ``i`` (the in-flight micro-batches
  plus the previous one, still referenced while the next arrives; rounded-up in-flight
  count + 1 under the interleaved schedule), twice that on a middle
  stage (received and sent); measured at PP2 in tests/dist/test_teacher_in_schedule.py.
  Counted with the full ``h`` (an upper bound under sequence parallelism, ``h / tp``).

With ``fused_output`` (ops/fused_output.py) the last stage holds instead: the
``[b, s, h]`` hidden states' transposed copy and the ``[T, h]`` response rows;
the op's two ``[c, V/tp]`` fp32 logits chunks (``c`` = 224 tokens), the bf16
product of one chunk, the inner ops' three ``[chunk, V/tp]`` buffers, the fp32
``[V/tp, h]`` weight-gradient accumulator and its cast, and the fp32 ``[T, h]``
hidden-state gradient; the teacher keeps ``[T, h]`` hidden states per micro-batch
kept (as above), plus, with the pre-pass, one copy of the ``[V/tp, h]`` output shard.

A GPU's peak is ``static + max(step working set, optimizer temporaries)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.planning.assumptions import PlanAssumptions
from megatron_sdpg.planning.params import stage_params
from megatron_sdpg.planning.workload import FUSED_CHUNK_TOKENS, Workload
from megatron_sdpg.platform.layout import ParallelLayout

GIB = 2**30
FP32 = 4


def _elem_bytes(cfg: ModelConfig) -> int:
    return 2 if cfg.params_dtype == "bfloat16" else 4


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage ``stage``.

    Attributes:
        stage: Pipeline stage index.
        params: Parameters on this GPU.
        weights, gradients, optimizer, reference_weights: Static terms.
        activations: Saved activations of the micro-batches in flight.
        logits_and_kl: Logits, response rows and KL kernel buffers (last stage).
        teacher_logits: Teacher data kept for the student pass: logits or hidden states (last stage),
            and the teacher halves of pipeline activations (every stage, teacher in the schedule).
        optimizer_temp: Temporaries of an unfused optimizer step.
        in_flight: Micro-batches whose activations are held at once.
    """

    stage: int
    params: int
    weights: int
    gradients: int
    optimizer: int
    reference_weights: int
    activations: int
    logits_and_kl: int
    teacher_logits: int
    optimizer_temp: int
    in_flight: float

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.reference_weights

    @property
    def working(self) -> int:
        return self.activations + self.logits_and_kl + self.teacher_logits

    @property
    def peak(self) -> int:
        return self.static + max(self.working, self.optimizer_temp)


def activation_bytes_per_layer(cfg: ModelConfig, tp: int, b: int, s: int, fused_kernels: bool) -> int:
    """Bytes one layer saves for backward on one micro-batch ``[b, s]`` (no recompute).

    Args:
        cfg: The architecture (``params_dtype`` sets the activation dtype).
        tp: Tensor-parallel size (no sequence parallelism: norms see the full hidden).
        b: Sequences in the micro-batch.
        s: Tokens per sequence on this GPU (after context parallelism).
        fused_kernels: transformer-engine's fused layer (see :class:`PlanAssumptions`);
            False for megatron's local spec with torch ops.
    """
    e = _elem_bytes(cfg)
    h, d, f = cfg.hidden_size, cfg.kv_channels, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads // tp, cfg.kv_heads // tp
    per_token = 4 * h + (heads + 2 * kv) * d + heads * d + 3 * f // tp
    if cfg.arch == "qwen3":
        per_token += (heads + kv) * d  # q/k RMSNorm inputs
    if fused_kernels:
        return b * s * per_token * e + b * s * heads * FP32  # + per-head log-sum-exp
    per_token += 2 * h + f // tp + 2 * (heads - kv) * d  # normalised outputs, SiLU output, expanded K/V
    scores = b * heads * s * s * (FP32 + (e if e < FP32 else 0))  # fp32 softmax (+ its bf16 copy)
    return b * s * per_token * e + scores


def backward_working_bytes(cfg: ModelConfig, tp: int, b: int, s: int, fused_kernels: bool) -> int:
    """Transient gradients of one layer's backward: its largest intermediates' gradients.

    The gradient of the ``fc1`` output and input (``2f/tp + h`` per token); with
    unfused attention also the softmax gradient and its input's (twice the
    ``[b, H/tp, s, s]`` fp32 scores).
    """
    e = _elem_bytes(cfg)
    out = b * s * (2 * cfg.intermediate_size // tp + cfg.hidden_size) * e
    if not fused_kernels:
        out += 2 * b * (cfg.num_attention_heads // tp) * s * s * FP32
    return out


def _in_flight(stage: int, pp: int, microbatches: int, vpp: int | None) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak (1F1B)."""
    n = min(microbatches, pp - stage)
    if vpp and vpp > 1:
        n *= 1 + (pp - 1) / (pp * vpp)  # interleaved schedule (Korthikanti et al. 2022)
    return n


def _whole(micro_batches: float) -> int:
    """An in-flight count rounded up to whole micro-batches (to 1e-3, so 2.0000001 stays 2)."""
    return -(-int(micro_batches * 1000) // 1000)


def teacher_per_microbatch(work: Workload, pp: int, assume: PlanAssumptions) -> bool:
    """Whether the last stage keeps the teacher data of its in-flight micro-batches only."""
    return work.teacher_per_microbatch and (pp == 1 or assume.teacher_in_schedule)


def teacher_microbatches_kept(work: Workload, layout: ParallelLayout, assume: PlanAssumptions) -> int:
    """Micro-batches whose teacher data the last stage holds at once (0 without a teacher)."""
    if not work.teacher_forward:
        return 0
    m = work.microbatches_per_rank(layout.dp)
    if not teacher_per_microbatch(work, layout.pp, assume):
        return m
    return min(m, _whole(_in_flight(layout.pp - 1, layout.pp, m, layout.vpp)))


def estimate_memory(cfg: ModelConfig, layout: ParallelLayout, work: Workload, assume: PlanAssumptions,
                    distributed_optimizer: bool) -> list[StageMemory]:
    """Per-GPU memory of every pipeline stage.

    Args:
        cfg: The architecture (``recompute`` and ``params_dtype`` are honoured).
        layout: Parallel degrees (``dp`` shards the distributed optimizer).
        work: The step's shapes and passes.
        assume: Kernel assumptions (fused attention, fused optimizer).
        distributed_optimizer: Shard optimizer states across ``dp * cp`` ranks.

    Returns:
        One :class:`StageMemory` per pipeline stage.
    """
    e = _elem_bytes(cfg)
    tp, pp, cp = layout.tp, layout.pp, layout.cp
    b = work.sequences_per_microbatch
    m = work.microbatches_per_rank(layout.dp)
    s_student = -(-work.student_len // cp)
    s_teacher = -(-work.teacher_len // cp)
    resp_rows = -(-work.response_tokens_per_microbatch // cp)
    vocab = cfg.padded_vocab_size(tp) // tp
    h = cfg.hidden_size
    optimizer_per_param = (8 if e == FP32 else 12)
    shards = layout.dp * cp if distributed_optimizer else 1
    full_layer = activation_bytes_per_layer(cfg, tp, b, s_student, assume.fused_kernels)
    stored_layer = b * s_student * h * e if cfg.recompute else full_layer
    backward = backward_working_bytes(cfg, tp, b, s_student, assume.fused_kernels)
    largest_param = max(2 * cfg.intermediate_size * h // tp, vocab * h)
    out = []
    for sp in stage_params(cfg, tp, pp):
        last = sp.stage == pp - 1
        in_flight = _in_flight(sp.stage, pp, m, layout.vpp)
        activations = int(sp.layers * in_flight * stored_layer) + (full_layer if cfg.recompute else 0) + backward
        logits_kl = teacher = 0
        if last:
            activations += 2 * b * s_student * h * e  # final norm input, output layer input
            kept = teacher_microbatches_kept(work, layout, assume)
            if work.fused_output:
                logits_kl, teacher = _fused_output_bytes(work, b * s_student, resp_rows, vocab, h, e, kept,
                                                         prepass=not teacher_per_microbatch(work, pp, assume))
            else:
                # The output layer runs on the response rows only (models/output_hidden.py:select_output_rows):
                # forward, their [T, V/tp] logits; loss, those and the KL kernel's work buffers; backward, the
                # rows with their gradient written in place.
                rows = resp_rows * vocab * e
                kl_work = 3 * min(work.kl_chunk_size, resp_rows) * vocab * FP32
                logits_kl = rows + kl_work
                teacher = kept * rows
        if pp > 1 and work.teacher_forward and teacher_per_microbatch(work, pp, assume):
            halves = min(m, _whole(in_flight) + 1) * b * s_teacher * h * e
            teacher += halves if sp.stage in (0, pp - 1) else 2 * halves
        params = sp.total
        out.append(StageMemory(
            stage=sp.stage,
            params=params,
            weights=params * e,
            gradients=params * FP32,
            optimizer=-(-params * optimizer_per_param // shards),
            reference_weights=params * e if work.reference_model else 0,
            activations=activations,
            logits_and_kl=logits_kl,
            teacher_logits=teacher,
            optimizer_temp=0 if assume.fused_optimizer else 2 * largest_param * FP32,
            in_flight=in_flight,
        ))
    return out


def _fused_output_bytes(work: Workload, tokens: int, resp_rows: int, vocab: int, h: int, e: int, kept: int,
                        prepass: bool) -> tuple[int, int]:
    """``(logits_and_kl, teacher)`` bytes of the last stage with ``fused_output`` (module docstring)."""
    chunk = min(resp_rows, FUSED_CHUNK_TOKENS)
    work_bytes = (2 * chunk * vocab * FP32 + (chunk * vocab * e if e != FP32 else 0)
                  + 3 * min(work.kl_chunk_size, chunk) * vocab * FP32)
    grads = vocab * h * FP32 + (vocab * h * e if e != FP32 else 0) + resp_rows * h * FP32
    logits_kl = tokens * h * e + resp_rows * h * e + work_bytes + grads
    teacher = kept * resp_rows * h * e
    if kept and prepass:
        teacher += vocab * h * e  # the output shard as of the pre-pass (later updates must not change it)
    return logits_kl, teacher


def worst_stage(stages: list[StageMemory]) -> StageMemory:
    """The stage with the highest peak (the one that decides whether a layout fits)."""
    return max(stages, key=lambda st: st.peak)
