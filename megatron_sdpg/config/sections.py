"""Config sections owned by the trainer itself: run, logging, checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_sdpg.config.errors import ConfigError


@dataclass
class TrainConfig:
    """The run (config section ``train``).

    Attributes:
        steps: Optimizer steps (each consumes one rollout batch).
        seed: Base seed for weights, data order and sampling.
        run_dir: Where metrics, the resolved config, plots and checkpoints go.
        prompts_per_step: Prompts sampled per step (each gets ``rollout.n`` responses).
        micro_batch_size: Sequences per micro-batch.
        max_tokens_per_microbatch: Token budget of one micro-batch (0 = no budget).
        pack_sequences: Pack several sequences into each row of a micro-batch (block-diagonal causal
            attention mask, positions restarting per sequence) instead of one padded row each. Only
            where megatron's local attention spec runs (no Transformer Engine: it would ignore the
            mask) at PP1; elsewhere the trainer says so in one line and pads.
        ppo_epochs: Passes over each rollout batch.
        mini_batches: Optimizer steps per epoch (1 = fully on-policy).
        eval_every: Held-out evaluation period in steps (0 = only before and after).
        eval_n: Held-out problems per evaluation.
    """

    steps: int = 10
    seed: int = 1234
    run_dir: str = "runs/default"
    prompts_per_step: int = 8
    micro_batch_size: int = 8
    max_tokens_per_microbatch: int = 0
    pack_sequences: bool = True
    ppo_epochs: int = 1
    mini_batches: int = 1
    eval_every: int = 0
    eval_n: int = 200

    def validate(self, prefix: str = "train") -> None:
        for name in ("steps", "prompts_per_step", "micro_batch_size", "ppo_epochs", "mini_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_tokens_per_microbatch", "eval_every", "eval_n"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if not self.run_dir:
            raise ConfigError(f"{prefix}.run_dir", "must not be empty")


@dataclass
class CheckpointConfig:
    """Checkpoints for exact resume (config section ``checkpoint``).

    Attributes:
        save_every: Save after every this many steps and after the last step (0 = never).
        keep_last: Complete checkpoints kept in ``run_dir/checkpoints`` (older ones are deleted).
        resume: Continue from the latest complete (and not corrupt) checkpoint in ``run_dir/checkpoints``
            if there is one. False starts a new run at step 0: an earlier run's files in ``run_dir`` are
            moved (not deleted) to ``run_dir/previous_runs/<k>/``.
    """

    save_every: int = 0
    keep_last: int = 2
    resume: bool = True

    def validate(self, prefix: str = "checkpoint") -> None:
        if self.save_every < 0:
            raise ConfigError(f"{prefix}.save_every", f"must be >= 0 (0 = off), got {self.save_every}")
        if self.keep_last < 1:
            raise ConfigError(f"{prefix}.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    """Where metrics go (config section ``logging``)."""

    wandb: bool = False
    wandb_project: str = "megatron_sdpg"
    wandb_mode: str = "offline"
    progress_bar: bool = True

    def validate(self, prefix: str = "logging") -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ConfigError(f"{prefix}.wandb_mode", f"must be offline, online or disabled, got {self.wandb_mode!r}")
