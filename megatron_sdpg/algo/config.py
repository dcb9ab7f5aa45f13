"""The ``algorithm`` config section: every knob of the SDPG objective and its baselines.

Defaults are the paper's (SDPG, Qwen3-4B): clip (0.2, 0.2), alpha = beta_base = 1e-3,
T_warm 50, T_decay 350 over 400 steps, positive-advantage gating, URKL reference
KL, 1/0 rewards, SG[rho] importance factors on the beta and alpha terms
(appendix A.3), token-mean aggregation, distillation KL clamped at 20. Switches
off the paper's path default to it: ``sg_rho_cap`` (None), ``teacher_temperature_scaling``
(``both``; the authors' code: ``student_only``), ``max_refill_rounds`` (0).

Presets (``apply_preset(name)``) are field overrides of those defaults:

- ``sdpg``: the paper's defaults.
- ``sdpg-authors``: the authors' scripts: clip high 0.28, dual clip 10, no beta
  windows, no gating, URKL, +1/-1 rewards, no SG[rho] factors, teacher
  recomputed per micro-batch.
- ``grpo``: beta = 0, k3 reference KL in the loss, clip (0.2, 0.2).
- ``dapo``: beta = 0, clip-higher 0.28, dual clip 10, no reference KL, token-mean,
  dynamic sampling (drop all-equal groups).
- ``opsd``: no reward, generalised JSD (beta 0.5) to the frozen initial policy
  with the privileged context, no reference KL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_sdpg.config.errors import ConfigError, require

REF_KL_MODES = ("ufkl", "urkl", "fkl", "rkl", "k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")
REWARD_SCHEMES = ("zero_one", "plus_minus_one")
OBJECTIVES = ("policy_gradient", "opsd")
DISTILL_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
TEACHER_SOURCES = ("current", "initial")
TEACHER_TEMPERATURE_SCALINGS = ("both", "student_only")
PAPER_TOTAL_STEPS = 400


@dataclass
class AlgorithmConfig:
    """Loss, advantage and schedule settings (see module docstring for presets)."""

    preset: str = "sdpg"
    objective: str = "policy_gradient"  # "policy_gradient" (SDPG/GRPO/DAPO) or "opsd" (no reward)
    # False: drop the PPO-clip policy-gradient term and keep the rest of the policy_gradient objective
    # (distillation with its gate and SG[rho], and the reference KL): SDPG without the reward's gradient,
    # the "no policy-gradient term" ablation of OPSD vs SDPG. objective "opsd" has no such term anyway.
    policy_gradient_term: bool = True

    # Rewards and group-relative advantages.
    reward_scheme: str = "zero_one"  # verifier reward 1/0 (paper) or +1/-1 (authors)
    normalize_adv_std: bool = True  # False: Dr.GRPO, mean-centred only
    eps_std: float = 1e-6
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    # When the kept groups leave a data-parallel rank fewer micro-batches than train.mini_batches:
    # sample groups for this many more prompt batches (DAPO), then skip the step's update on every rank.
    max_refill_rounds: int = 0
    overlong_buffer: int = 0  # DAPO soft overlong penalty window in tokens (0 = off)
    overlong_penalty: float = 1.0

    # Outcome term: PPO clipped surrogate.
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None  # for A < 0: loss <= -A * c (c > 1); None = off
    tis_cap: float | None = None  # truncated IS vs rollout log-probs: min(pi_old/pi_rollout, C)

    # Distillation term L_OPD+.
    beta_base: float = 1e-3
    beta_warmup_steps: int = 50  # T_warm; 0 disables the warmup factor
    beta_decay_steps: int = 350  # T_decay; 0 disables the decay factor
    # T; None = train.steps (filled in by load_config); schedule_steps() falls back to the paper's 400.
    total_steps: int | None = None
    distill_gate: bool = True  # m_i = 1[A_i > 0]
    distill_kl_clamp: float | None = 20.0  # per-token l_t <= clamp (reference implementation)
    # Ablation: no distillation on the tokens AFTER the first response token that is not the
    # teacher's greedy choice (the first "wrong" token under the privileged context); that
    # token keeps its term. LEARNING_NOTES: the teacher turns diffuse after it.
    distill_mask_after_divergence: bool = False
    distill_divergence: str = "reverse_kl"  # reverse_kl (SDPG), forward_kl or jsd (OPSD)
    jsd_beta: float = 0.5
    pointwise_clip: float | None = None  # OPSD: clamp each vocabulary entry's term
    teacher_source: str = "current"  # current weights (SDPG) or the frozen initial policy (OPSD)
    teacher_per_microbatch: bool = False  # authors: recompute the teacher per micro-batch
    # Which logits the temperature divides in the distillation divergence: both (p_t = softmax(z_t / T))
    # or student_only (p_t = softmax(z_t), as the authors' code does).
    teacher_temperature_scaling: str = "both"

    # Reference-KL term.
    alpha: float = 1e-3
    ref_kl_mode: str = "urkl"
    ref_kl_in_reward: bool = False  # GRPO baseline: R_i - alpha * sum_t k_t (k = ref_kl_mode, k1/k2/k3) instead of a loss term
    sg_rho_factors: bool = True  # appendix A.3: SG[pi/pi_rollout] on the beta and alpha terms
    # Upper bound on that SG[rho] factor; None = unbounded (the paper). With one update per step rho is
    # pure trainer-vs-engine numerical mismatch and can reach e^20 on rare tokens.
    sg_rho_cap: float | None = None

    # Aggregation and numerics.
    loss_agg: str = "token-mean"
    loss_agg_constant: float | None = None  # Dr.GRPO normaliser per sequence (e.g. max response length)
    # None = rollout.sampling.temperature (1 when greedy), filled in by load_config; 1.0 when built directly.
    temperature: float | None = None
    vocab_chunk_size: int | None = None  # tokens per chunk of the vocab ops; None = device default
    # Reverse-KL kernels: torch (chunked; checked on an H200 against float64), triton (fused; checked
    # in Triton's CPU interpreter and compiled for sm_90, not yet run on a GPU) or auto (triton on
    # CUDA when installed). Make auto the default once tools/device_check.sh has passed on a GPU.
    vocab_backend: str = "torch"
    # Compute the loss's vocabulary terms from the last stage's hidden states and the output layer's
    # shard in token chunks (ops/fused_output.py): no [T, V/tp] logits of the student or the teacher
    # exist, and the teacher passes keep [T, h] hidden states instead of [T, V/tp] logits. Checked
    # against float64 (TP 1/2/4, fp32/bf16, tied/untied, padded vocabulary, temperature) and equal
    # to the logits path in training at 1 rank, TP2 and PP2 for every objective and divergence
    # (tests/dist/test_fused_output_trainer.py). With parallel.sequence_parallel (hidden states
    # split over TP, not supported by the op) the trainer uses the logits path and logs why
    # (SDPGConfig.fused_output_off_reason).
    fused_output: bool = True

    def schedule_steps(self) -> int:
        """T of the beta schedule."""
        return self.total_steps if self.total_steps is not None else PAPER_TOTAL_STEPS

    def logprob_temperature(self) -> float:
        """Temperature of every log-prob and divergence in the loss (the student's side)."""
        return self.temperature if self.temperature is not None else 1.0

    def teacher_temperature(self) -> float:
        """Temperature of the teacher's distribution in the distillation divergence."""
        return self.logprob_temperature() if self.teacher_temperature_scaling == "both" else 1.0

    def validate(self, prefix: str = "algorithm") -> None:
        """Raises ConfigError naming ``prefix.field`` for the first bad value."""

        def f(name: str) -> str:
            return f"{prefix}.{name}"

        require(self.preset in PRESETS, f("preset"), f"unknown preset {self.preset!r}; choose from {sorted(PRESETS)}")
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("reward_scheme", REWARD_SCHEMES),
            ("distill_divergence", DISTILL_DIVERGENCES),
            ("teacher_source", TEACHER_SOURCES),
            ("teacher_temperature_scaling", TEACHER_TEMPERATURE_SCALINGS),
            ("ref_kl_mode", REF_KL_MODES),
            ("loss_agg", LOSS_AGGREGATIONS),
        ):
            value = getattr(self, name)
            require(value in allowed, f(name), f"{value!r} is not one of {list(allowed)}")
        require(self.eps_std > 0, f("eps_std"), f"must be > 0, got {self.eps_std}")
        require(self.max_refill_rounds >= 0, f("max_refill_rounds"), f"must be >= 0, got {self.max_refill_rounds}")
        require(self.overlong_buffer >= 0, f("overlong_buffer"), f"must be >= 0, got {self.overlong_buffer}")
        require(0 <= self.clip_eps_low < 1, f("clip_eps_low"), f"must be in [0, 1), got {self.clip_eps_low}")
        require(self.clip_eps_high >= 0, f("clip_eps_high"), f"must be >= 0, got {self.clip_eps_high}")
        if self.dual_clip_c is not None:
            require(self.dual_clip_c > 1, f("dual_clip_c"), f"must be > 1 or null, got {self.dual_clip_c}")
        if self.sg_rho_cap is not None:
            require(self.sg_rho_cap >= 1, f("sg_rho_cap"), f"must be >= 1 or null, got {self.sg_rho_cap}")
        if self.tis_cap is not None:
            require(self.tis_cap > 0, f("tis_cap"), f"must be > 0 or null, got {self.tis_cap}")
        require(self.beta_base >= 0, f("beta_base"), f"must be >= 0, got {self.beta_base}")
        require(self.beta_warmup_steps >= 0, f("beta_warmup_steps"), f"must be >= 0, got {self.beta_warmup_steps}")
        require(self.beta_decay_steps >= 0, f("beta_decay_steps"), f"must be >= 0, got {self.beta_decay_steps}")
        require(self.total_steps is None or self.total_steps >= 1, f("total_steps"),
                f"must be >= 1 or null, got {self.total_steps}")
        if self.distill_kl_clamp is not None:
            require(self.distill_kl_clamp > 0, f("distill_kl_clamp"), f"must be > 0 or null, got {self.distill_kl_clamp}")
        require(0 <= self.jsd_beta <= 1, f("jsd_beta"), f"must be in [0, 1], got {self.jsd_beta}")
        if self.pointwise_clip is not None:
            require(self.pointwise_clip > 0, f("pointwise_clip"), f"must be > 0 or null, got {self.pointwise_clip}")
        require(self.alpha >= 0, f("alpha"), f"must be >= 0, got {self.alpha}")
        if self.ref_kl_in_reward:
            require(self.ref_kl_mode in ("k1", "k2", "k3"), f("ref_kl_mode"),
                    f"KL in reward needs an estimator k1, k2 or k3, got {self.ref_kl_mode!r}")
        if self.loss_agg == "constant":
            require(
                self.loss_agg_constant is not None and self.loss_agg_constant > 0,
                f("loss_agg_constant"),
                "must be > 0 when loss_agg is 'constant' (e.g. the max response length)",
            )
        require(self.temperature is None or self.temperature > 0, f("temperature"),
                f"must be > 0 or null, got {self.temperature}")
        require(self.vocab_backend in ("auto", "torch", "triton"), f("vocab_backend"),
                f"must be auto, torch or triton, got {self.vocab_backend!r}")
        require(self.vocab_chunk_size is None or self.vocab_chunk_size >= 1, f("vocab_chunk_size"),
                f"must be >= 1 or null, got {self.vocab_chunk_size}")


PRESETS: dict[str, dict] = {
    "sdpg": {},
    "sdpg-authors": dict(
        clip_eps_high=0.28,
        dual_clip_c=10.0,
        beta_warmup_steps=0,
        beta_decay_steps=0,
        distill_gate=False,
        ref_kl_mode="urkl",
        reward_scheme="plus_minus_one",
        sg_rho_factors=False,
        teacher_per_microbatch=True,
    ),
    "grpo": dict(beta_base=0.0, ref_kl_mode="k3", sg_rho_factors=False),
    "dapo": dict(
        beta_base=0.0,
        clip_eps_high=0.28,
        dual_clip_c=10.0,
        alpha=0.0,
        dynamic_sampling=True,
        sg_rho_factors=False,
    ),
    "opsd": dict(
        objective="opsd",
        distill_divergence="jsd",
        jsd_beta=0.5,
        teacher_source="initial",
        beta_base=1.0,
        beta_warmup_steps=0,
        beta_decay_steps=0,
        distill_gate=False,
        distill_kl_clamp=None,
        alpha=0.0,
        sg_rho_factors=False,
    ),
}


def apply_preset(name: str, **overrides) -> AlgorithmConfig:
    """The defaults with preset ``name``'s overrides, then ``overrides``, validated.

    Raises:
        ConfigError: ``algorithm.preset`` for an unknown name, or the first bad field.
    """
    if name not in PRESETS:
        raise ConfigError("algorithm.preset", f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(AlgorithmConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"algorithm.{unknown[0]}", "no such field")
    cfg = AlgorithmConfig(**{**PRESETS[name], **overrides, "preset": name})
    cfg.validate("algorithm")
    return cfg
