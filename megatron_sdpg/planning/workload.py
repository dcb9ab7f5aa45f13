"""The SDPG step a plan is made for: sequence lengths, batch shapes and extra passes."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.config.errors import require

GPU_CHUNK_TOKENS = 128  # = ops.vocab_shard.GPU_CHUNK_TOKENS (the planner stays torch-free)
FUSED_CHUNK_TOKENS = 224  # = ops.fused_output.FUSED_CHUNK_TOKENS

PAD_MULTIPLE = 8  # micro-batches are padded to a multiple of 8 tokens (train/batch.py)


def _pad(n: int) -> int:
    return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


@dataclass(frozen=True)
class Workload:
    """One training step's shape, at its worst case (every sequence at its maximum length).

    Attributes:
        prompt_tokens: Longest student prompt.
        teacher_prompt_tokens: Longest teacher prompt (student prompt + privileged context).
        response_tokens: Longest response (``rollout.sampling.max_new_tokens``).
        sequences_per_step: Responses per optimizer step (prompts x samples per prompt).
        micro_batch_size: Most sequences in one micro-batch.
        max_tokens_per_microbatch: Token budget of a micro-batch (0 = none).
        teacher_forward: SDPG's teacher pass (the current or frozen weights on the
            privileged prompt) is run.
        reference_model: A frozen copy of the initial weights is kept (reference KL, or
            OPSD's frozen teacher).
        old_logprob_pass: A forward for the pre-update log-probs (more than one update per
            rollout batch).
        update_passes: Forward+backward passes over the batch (``train.ppo_epochs``).
        kl_chunk_size: Tokens per chunk of the vocab-parallel KL / log-prob kernels.
        fused_output: ``algorithm.fused_output``: the vocabulary terms come from hidden
            states in chunks (no ``[T, V/tp]`` logits; the teacher keeps ``[T, h]``).
        teacher_per_microbatch: The teacher view of each micro-batch is computed right
            before its student view, so the last stage keeps the teacher data of the
            micro-batches in flight only (train/trainer.py: ``algorithm.teacher_per_microbatch``
            or one update per step, with the current weights as the teacher); False: a
            pre-pass keeps every micro-batch's teacher data of the step until the update.
    """

    prompt_tokens: int
    teacher_prompt_tokens: int
    response_tokens: int
    sequences_per_step: int
    micro_batch_size: int
    max_tokens_per_microbatch: int = 0
    teacher_forward: bool = True
    reference_model: bool = True
    old_logprob_pass: bool = False
    update_passes: int = 1
    kl_chunk_size: int = 128
    fused_output: bool = False
    teacher_per_microbatch: bool = True

    def validate(self) -> None:
        for name in ("prompt_tokens", "response_tokens", "sequences_per_step", "micro_batch_size",
                     "update_passes", "kl_chunk_size"):
            require(getattr(self, name) >= 1, f"workload.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.teacher_prompt_tokens >= self.prompt_tokens, "workload.teacher_prompt_tokens",
                f"must be >= prompt_tokens {self.prompt_tokens}, got {self.teacher_prompt_tokens}")
        longest = max(self.student_len, self.teacher_len)
        require(self.max_tokens_per_microbatch == 0 or self.max_tokens_per_microbatch >= longest,
                "train.max_tokens_per_microbatch",
                f"{self.max_tokens_per_microbatch} tokens cannot hold one padded sequence of {longest}")

    @property
    def student_len(self) -> int:
        """Padded student sequence length (prompt + response)."""
        return _pad(self.prompt_tokens + self.response_tokens)

    @property
    def teacher_len(self) -> int:
        """Padded teacher sequence length (0 without a teacher pass)."""
        return _pad(self.teacher_prompt_tokens + self.response_tokens) if self.teacher_forward else 0

    @property
    def sequences_per_microbatch(self) -> int:
        """``b``: sequences in a micro-batch (the packer pads all to the longest view)."""
        if not self.max_tokens_per_microbatch:
            return self.micro_batch_size
        return max(1, min(self.micro_batch_size,
                          self.max_tokens_per_microbatch // max(self.student_len, self.teacher_len)))

    @property
    def response_tokens_per_microbatch(self) -> int:
        """``T``: response tokens of a micro-batch, the rows of its logits buffers."""
        return self.sequences_per_microbatch * self.response_tokens

    def sequences_per_rank(self, dp: int) -> int:
        return -(-self.sequences_per_step // dp)

    def microbatches_per_rank(self, dp: int) -> int:
        return -(-self.sequences_per_rank(dp) // self.sequences_per_microbatch)


def workload_from_config(cfg) -> Workload:
    """The workload of a loaded :class:`~megatron_sdpg.config.schema.SDPGConfig`.

    Lengths are the configured maxima: ``data.max_prompt_tokens``,
    ``data.max_teacher_prompt_tokens`` and ``rollout.sampling.max_new_tokens``.
    The passes follow the trainer (train/setup.py, train/trainer.py): a teacher forward when
    ``beta_base > 0`` (the schedule's peak) or the objective is OPSD, a frozen
    reference copy when the reference KL is on (``alpha > 0``, not OPSD) or the
    teacher is the initial policy, an old-policy pass when
    ``ppo_epochs * mini_batches > 1``; the teacher per micro-batch when the trainer
    inlines it (``teacher_per_microbatch`` or one update, current-weights teacher; the
    frozen initial teacher takes the pre-pass); ``fused_output`` unless the config rules
    it out (``SDPGConfig.fused_output_off_reason``: sequence parallelism).
    """
    algo, train = cfg.algorithm, cfg.train
    teacher = algo.beta_base > 0 or algo.objective == "opsd"
    updates = train.ppo_epochs * train.mini_batches
    return Workload(
        prompt_tokens=cfg.data.max_prompt_tokens,
        teacher_prompt_tokens=cfg.data.max_teacher_prompt_tokens if teacher else cfg.data.max_prompt_tokens,
        response_tokens=cfg.rollout.sampling.max_new_tokens,
        sequences_per_step=train.prompts_per_step * cfg.rollout.n_samples,
        micro_batch_size=train.micro_batch_size,
        max_tokens_per_microbatch=train.max_tokens_per_microbatch,
        teacher_forward=teacher,
        reference_model=(algo.alpha > 0 and algo.objective != "opsd") or algo.teacher_source == "initial",
        old_logprob_pass=updates > 1,
        update_passes=train.ppo_epochs,
        kl_chunk_size=algo.vocab_chunk_size or GPU_CHUNK_TOKENS,  # the planner sizes GPU memory
        fused_output=algo.fused_output and cfg.fused_output_off_reason() is None,
        teacher_per_microbatch=(algo.teacher_per_microbatch or updates == 1) and algo.teacher_source == "current",
    )
