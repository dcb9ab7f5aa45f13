"""What the planner assumes about the hardware and the kernels (not part of a run's config)."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.config.errors import require


@dataclass(frozen=True)
class PlanAssumptions:
    """Hardware and implementation assumptions of a plan.

    Attributes:
        gpu_memory_gib: Memory of one GPU. 79.6 GiB is what ``nvidia-smi`` reports
            (81559 MiB) for an H100/A100 "80 GB".
        reserve_gib: Kept free for the CUDA context, NCCL buffers and allocator
            fragmentation; a layout fits when ``peak + reserve <= gpu_memory``.
        peak_tflops: Dense bf16 peak of one GPU (H100 SXM: 989).
        mfu: Model FLOPs utilisation assumed for the training passes.
        fused_kernels: transformer-engine's layer (GPU): fused attention keeping no
            ``s x s`` scores, fused RMSNorm+linear, fused SwiGLU. False models
            megatron's local layer spec with torch ops (CPU): unfused attention
            (K/V expanded to every head, fp32 ``s x s`` softmax kept), a composite
            RMSNorm that also keeps its normalised output, SwiGLU keeping its SiLU output.
        colocated_engine_fraction: Share of each GPU held by a colocated SGLang engine
            (its ``--mem-fraction-static``) while the trainer runs; 0 for dedicated nodes.
        fused_optimizer: A fused multi-tensor Adam (TE/apex on GPU) with no temporaries.
            False models torch's single-tensor AdamW (CPU), whose step allocates two
            temporaries the size of the largest parameter.
        teacher_in_schedule: At ``pp > 1`` the teacher view of each micro-batch runs inside
            the pipeline schedule right before its student view (issue 19, item 1), so the
            last stage keeps the teacher data of its in-flight micro-batches only. False
            models the pre-pass through every stage, which keeps every micro-batch's
            teacher data of the step on the last stage (``plan --teacher-prepass``).
    """

    gpu_memory_gib: float = 79.6
    reserve_gib: float = 5.0
    peak_tflops: float = 989.0
    mfu: float = 0.35
    fused_kernels: bool = True
    fused_optimizer: bool = True
    colocated_engine_fraction: float = 0.0
    teacher_in_schedule: bool = True

    def validate(self) -> None:
        require(self.gpu_memory_gib > 0, "--gpu-memory-gib", f"must be > 0, got {self.gpu_memory_gib}")
        require(0 <= self.reserve_gib < self.gpu_memory_gib, "--reserve-gib",
                f"must be in [0, gpu memory {self.gpu_memory_gib}), got {self.reserve_gib}")
        require(self.peak_tflops > 0, "--peak-tflops", f"must be > 0, got {self.peak_tflops}")
        require(0 < self.mfu <= 1, "--mfu", f"must be in (0, 1], got {self.mfu}")
        require(0 <= self.colocated_engine_fraction < 1, "--colocated-engine-fraction",
                f"must be in [0, 1), got {self.colocated_engine_fraction}")

    @property
    def usable_gib(self) -> float:
        """What the trainer may use: capacity less the reserve and a colocated engine's share."""
        return self.gpu_memory_gib * (1 - self.colocated_engine_fraction) - self.reserve_gib
