"""Builds what the training loop needs from the configuration, and owns its lifetime.

Everything here is assembly: the work lives in the modules it calls (models,
weights, data, rewards, rollout, algo). Engines, the client, the verifier pool
and the metrics log exist on global rank 0 only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.config.schema import SDPGConfig
from megatron_sdpg.models.architecture import ModelConfig, resolve_model_config
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.train.passes import response_logits
from megatron_sdpg.train.rollout_phase import RolloutContext, collect_rollouts, evaluate_through_engine
from megatron_sdpg.train.step import PolicyModel


def weights_loader(model_cfg: ModelConfig, groups: ParallelGroups) -> Callable[[list], None]:
    """Loads the starting weights: a converted Megatron checkpoint if given, else the HF files."""
    if model_cfg.megatron_dir:
        from megatron_sdpg.weights.checkpoint import check_megatron_dir, load_megatron_checkpoint

        check_megatron_dir(model_cfg.megatron_dir, model_cfg)  # one line for a missing/corrupt/other model's dir
        return lambda chunks: load_megatron_checkpoint(chunks, model_cfg.megatron_dir)
    from megatron_sdpg.formats.hf_io import CorruptCheckpointError, SafetensorsReader
    from megatron_sdpg.weights.load import load_hf_weights_into

    try:
        SafetensorsReader(model_cfg.hf_dir)  # the index and headers, so missing/truncated files fail in one line
    except (FileNotFoundError, CorruptCheckpointError) as err:
        raise ConfigError("model.hf_dir", str(err)) from None
    return lambda chunks: load_hf_weights_into(chunks, model_cfg, groups, SafetensorsReader(model_cfg.hf_dir))


def sdpg_loss_fn(cfg: SDPGConfig, groups: ParallelGroups, step: int, mb: dict, logits: torch.Tensor):
    """Megatron loss contract for one micro-batch: ``(loss_sum, num_tokens, metrics)``.

    Args:
        mb: A micro-batch from :func:`~megatron_sdpg.train.batch.plan_microbatches`,
            with the passes' ``ref_log_probs``/``old_log_probs``/``teacher_logits``.
        logits: ``[1, T, V/tp]`` student logits at the response rows (``[b, s, V/tp]`` when
            ``mb['rows_selected']`` is False), padded vocabulary masked.
    """
    from megatron_sdpg.algo.losses import LossInputs, OutputHidden, sdpg_loss

    student = response_logits(logits, mb)
    if mb.get("emit_hidden"):  # algorithm.fused_output: ``logits`` are hidden states
        student = OutputHidden(student, mb.get("teacher_hidden"), mb["output_weight"], mb["vocab_size"],
                               mb.get("teacher_output_weight"))
    inputs = LossInputs(
        target=mb["target"],
        loss_mask=torch.ones_like(mb["target"], dtype=torch.float32),
        advantages=mb["advantages"],
        old_log_probs=mb.get("old_log_probs"),
        ref_log_probs=mb.get("ref_log_probs"),
        rollout_log_probs=mb["rollout_log_probs"],
        seq_index=mb["seq_index"],
        num_sequences=mb["num_sequences"],  # counts trailing empty responses too (Dr.GRPO)
    )
    # ``student`` is the model's selected [T, V/tp] logits (or a private index_select copy of
    # full logits), read by nothing after the loss (the output layer's backward needs its
    # input, not its output): the gradient may overwrite it (one [T, V/tp] buffer fewer at peak).
    return sdpg_loss(student, mb.get("teacher_logits"), inputs, cfg.algorithm, step + 1,
                     tp_group=groups.tp_group_or_none, inplace_backward=True)


@dataclass
class TrainerParts:
    """The assembled components of a run."""

    cfg: SDPGConfig
    groups: ParallelGroups
    model_cfg: ModelConfig
    policy: PolicyModel
    reference: PolicyModel | None
    source: Any
    heldout: list
    pad_id: int
    needs_ref_log_probs: bool
    start_step: int = 0
    resumed_from: str | None = None
    rollout_ctx: RolloutContext | None = None
    sync: Any = None
    launcher: Any = None
    synced_version: int | None = None  # the weight version last synced to the engines (None: initial weights)
    # rollout.off_policy_steps=1: the prompt source's position before the next step's prompts were drawn
    # (checkpoints save it: the prefetched batch is not saved, a resumed run regenerates it)
    source_state_before_prefetch: dict | None = None
    log: Any = None
    closers: list = field(default_factory=list)
    engines_released: bool = False

    def beta(self, step: int) -> float:
        """beta(k) of 0-based ``step`` (the schedule counts k from 1)."""
        from megatron_sdpg.algo.loss_terms import beta_schedule

        a = self.cfg.algorithm
        return beta_schedule(step + 1, a.beta_base, a.schedule_steps(), a.beta_warmup_steps, a.beta_decay_steps)

    def needs_teacher(self, step: int) -> bool:
        return self.cfg.algorithm.objective == "opsd" or self.beta(step) > 0

    def teacher_model(self) -> PolicyModel:
        """The model on the teacher view: the frozen initial policy (OPSD) or the current weights."""
        return self.reference if self.cfg.algorithm.teacher_source == "initial" else self.policy

    def loss_fn(self, step: int):
        return partial(sdpg_loss_fn, self.cfg, self.groups, step)

    def rollout(self, problems: list, seed: int):
        return collect_rollouts(self.rollout_ctx, problems, seed, self.cfg.algorithm)

    def evaluate(self, n: int) -> dict:
        problems = self.heldout[:n]
        max_new = self.cfg.rollout.sampling.max_new_tokens
        return {
            "eval/accuracy": evaluate_through_engine(self.rollout_ctx, problems, False, max_new),
            "eval/accuracy_with_context": evaluate_through_engine(self.rollout_ctx, problems, True, max_new),
        }

    def release_engines(self) -> dict:
        """Colocated engines free their memory for the training passes (rank 0; ``{}`` otherwise).

        Returns ``rollout/release_s`` and, where the engines report it (the CPU server),
        ``rollout/engine_freed_mb`` and ``rollout/engine_rss_released_mb`` (summed over engines).
        """
        if not self.cfg.rollout.colocate or self.rollout_ctx is None or self.engines_released:
            return {}
        client = self.rollout_ctx.client
        t0 = time.perf_counter()
        answers = client.run(client.aclient.release_memory_occupation())
        self.engines_released = True
        return {"rollout/release_s": time.perf_counter() - t0,
                **_memory_metrics(answers, "freed_bytes", "rollout/engine_freed_mb", "rollout/engine_rss_released_mb")}

    def resume_engines(self) -> dict:
        """Released engines take their memory back (before the weight sync refills the weights)."""
        if not self.engines_released:
            return {}
        client = self.rollout_ctx.client
        t0 = time.perf_counter()
        answers = client.run(client.aclient.resume_memory_occupation())
        self.engines_released = False
        return {"rollout/resume_s": time.perf_counter() - t0,
                **_memory_metrics(answers, "allocated_bytes", "rollout/engine_allocated_mb",
                                  "rollout/engine_rss_resumed_mb")}

    def sync_weights(self, version: int) -> dict:
        """Streams the policy's weights (HF names) to the engines; every rank joins the export.
        Released (colocated) engines are resumed first: their weights come back empty until synced."""
        from megatron_sdpg.train.probe import build_probe
        from megatron_sdpg.weights.export import export_hf_weights

        # The post-sync probe (rollout.post_sync_check_threshold): the trainer's log-probs of a fixed sequence.
        probe = build_probe(self.policy, self.groups, self.model_cfg.vocab_size, self.pad_id,
                            self.cfg.rollout.post_sync_check_threshold)
        named = export_hf_weights(self.policy.unwrapped(), self.model_cfg, self.groups,
                                  bucket_bytes=int(self.cfg.rollout.sync_bucket_mb * 2**20))
        self.synced_version = version
        if dist.get_rank() == 0:
            for url in self.launcher.urls if self.launcher is not None else []:
                if self.launcher.restart_if_dead(url) and self.log is not None:  # it gets these full weights
                    self.log.write(f"engine {url} had died; restarted it before syncing weight version {version}")
            resumed = self.resume_engines()
            metrics = {**resumed, **self.sync.sync(named, version=version, probe=probe)}
            self.rollout_ctx.client.aclient.expected_weight_version = str(version)  # stale samples now fail
            return metrics
        for _ in named:  # the collectives of the export run on every rank
            pass
        return {}

    def on_engine_failure(self, url: str) -> None:
        """The rollout client's failure hook (rank 0): restarts a dead launched engine.

        Raises:
            EngineRestartedError: It was restarted after a sync, so it serves the initial
                weights; the trainer syncs again and redoes the batch (``Trainer._on_rank0``).
        """
        from megatron_sdpg.rollout.protocol import EngineRestartedError

        if self.launcher is not None and self.launcher.restart_if_dead(url) and self.synced_version is not None:
            raise EngineRestartedError(f"engine {url} died and was restarted with the initial weights; "
                                       f"weight version {self.synced_version} must be synced to it again")

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception as err:  # keep closing the rest
                print(f"warning: shutdown step failed: {err}", flush=True)


def _check_engine_flags(client, rollout_cfg) -> None:
    """Refuses SGLang engines that lack a flag the config relies on (seeds, memory release)."""
    from megatron_sdpg.rollout.launcher import engine_flag_problems

    for url in client.urls:
        info = client.run(client.aclient.call(url, "GET", "/server_info"))
        for name, message in engine_flag_problems(info, rollout_cfg):
            raise ConfigError(f"rollout.{name}", f"{url}: {message}")


def _memory_metrics(answers: list, bytes_key: str, bytes_name: str, rss_name: str) -> dict:
    """Sums what the engines' release/resume answers report (SGLang's answers are empty)."""
    reported = [a for a in answers if isinstance(a, dict)]
    out = {}
    if reported and all(bytes_key in a for a in reported):
        out[bytes_name] = sum(a[bytes_key] for a in reported) / 2**20
    if reported and all("resident_memory_bytes" in a for a in reported):
        out[rss_name] = sum(a["resident_memory_bytes"] for a in reported) / 2**20
    return out


def _check_fits(cfg: SDPGConfig, model_cfg: ModelConfig, groups: ParallelGroups, max_prompt: int) -> None:
    """Fails before any work when a sequence cannot fit the token budget."""
    longest = max_prompt + cfg.rollout.sampling.max_new_tokens
    budget = cfg.train.max_tokens_per_microbatch
    if budget and longest > budget:
        raise ConfigError("train.max_tokens_per_microbatch",
                          f"{budget} tokens cannot hold one sequence of up to {longest} tokens "
                          f"(prompt {max_prompt} + rollout.sampling.max_new_tokens "
                          f"{cfg.rollout.sampling.max_new_tokens})")
    if longest > model_cfg.max_position_embeddings:
        raise ConfigError("rollout.sampling.max_new_tokens", f"sequences of up to {longest} tokens exceed the "
                          f"model's max_position_embeddings {model_cfg.max_position_embeddings}")
    samples = cfg.train.prompts_per_step * cfg.rollout.n_samples
    if samples < groups.layout.dp:
        raise ConfigError("train.prompts_per_step", f"{samples} samples per step cannot feed {groups.layout.dp} "
                          "data-parallel ranks")
    per_rank = samples // groups.layout.dp
    microbatches = -(-per_rank // cfg.train.micro_batch_size)
    if cfg.train.mini_batches > microbatches:
        raise ConfigError("train.mini_batches", f"{cfg.train.mini_batches} mini-batches need at least as many "
                          f"micro-batches per DP rank, but {per_rank} samples per rank make {microbatches} "
                          f"(train.micro_batch_size={cfg.train.micro_batch_size})")


def build_parts(cfg: SDPGConfig, groups: ParallelGroups) -> TrainerParts:
    """Builds models, data, engines, sync and logging for this rank."""
    from transformers import AutoTokenizer

    from megatron_sdpg.data.build import build_prompt_builder, build_prompt_source
    from megatron_sdpg.data.tasks import build_task

    if not cfg.model.hf_dir:
        raise ConfigError("model.hf_dir", "an HF model directory is needed (tokenizer, architecture, weights)")
    model_cfg = resolve_model_config(cfg.model)
    model_cfg.validate("model", tp=groups.layout.tp, pp=groups.layout.pp, vpp=groups.layout.vpp)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.hf_dir)
    except (OSError, ValueError) as err:
        raise ConfigError("model.hf_dir", f"cannot load the tokenizer of {cfg.model.hf_dir!r}: "
                          f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    builder = build_prompt_builder(tokenizer, cfg.data)
    task = build_task(cfg.data, prompt_length=lambda p: len(builder.student_ids(p)))
    source = build_prompt_source(task, cfg.data, batch_size=cfg.train.prompts_per_step)
    heldout = task.problems("heldout", cfg.train.eval_n if task.generated else None, seed=cfg.data.seed)
    max_prompt = max(len(builder.teacher_ids(p)) for p in source.problems[:256])
    _check_fits(cfg, model_cfg, groups, max_prompt)

    algo = cfg.algorithm
    if algo.ref_kl_in_reward:
        raise ConfigError("algorithm.ref_kl_in_reward", "KL-in-reward is implemented in algo/ but not wired into the "
                          "trainer yet; use the in-loss reference KL (alpha > 0)")
    needs_ref = algo.alpha > 0 and algo.objective != "opsd"
    loader = weights_loader(model_cfg, groups)
    policy = PolicyModel(model_cfg, groups, cfg.optimizer, cfg.parallel.use_distributed_optimizer,
                         total_steps=cfg.train.steps, seed=cfg.train.seed, weights_loader=loader)
    reference = None
    if needs_ref or algo.teacher_source == "initial":
        reference = PolicyModel(model_cfg, groups, None, weights_loader=loader)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    parts = TrainerParts(cfg=cfg, groups=groups, model_cfg=model_cfg, policy=policy, reference=reference,
                         source=source,
                         heldout=heldout, pad_id=pad_id, needs_ref_log_probs=needs_ref)
    if cfg.checkpoint.resume:
        _resume(parts)
    elif dist.get_rank() == 0:
        from megatron_sdpg.train.checkpoint import start_new_run

        start_new_run(cfg.train.run_dir)
    if dist.get_rank() == 0:
        _start_rank0_services(parts, tokenizer, builder, task)
    return parts


def _resume(parts: TrainerParts) -> None:
    """Loads the latest loadable complete checkpoint of the run directory, if any (every rank agrees on it)."""
    from megatron_sdpg.train.checkpoint import resume_latest

    parts.start_step, parts.resumed_from = resume_latest(parts)


def _sync_endpoint(rollout_cfg, urls: list[str]) -> tuple[str, int | None]:
    """Where rank 0 hosts the distributed weight-update group: (address, port).

    The address is ``rollout.sync_master_address`` (the launch passes the node's name),
    else loopback when every engine is on this machine, else this host's name; the port
    is ``rollout.sync_master_port``, else a free one picked here, on rank 0's node.
    ``(…, None)`` for the other strategies.
    """
    if rollout_cfg.sync_strategy != "distributed":
        return rollout_cfg.sync_master_address or "127.0.0.1", None
    import socket
    from urllib.parse import urlparse

    local = {urlparse(u).hostname for u in urls} <= {"127.0.0.1", "localhost", "::1"}
    address = rollout_cfg.sync_master_address or ("127.0.0.1" if local else socket.getfqdn())
    port = rollout_cfg.sync_master_port
    if not port:
        from megatron_sdpg.testing.distributed import free_port

        port = free_port()
    return address, port


def _start_rank0_services(parts: TrainerParts, tokenizer, builder, task) -> None:
    """Engines (launched unless URLs are given), client, verifier pool, weight sync, metrics log."""
    from dataclasses import replace

    from megatron_sdpg.config.loader import save_resolved
    from megatron_sdpg.rewards.pool import VerifierPool
    from megatron_sdpg.rollout.blocking_client import RolloutClient
    from megatron_sdpg.rollout.launcher import EngineLauncher
    from megatron_sdpg.train.metrics_log import MetricsLog
    from megatron_sdpg.rollout.sync import make_weight_sync

    cfg = parts.cfg
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    save_resolved(cfg, cfg.train.run_dir)
    rollout_cfg = cfg.rollout
    urls = list(rollout_cfg.urls)
    if not urls:
        # (rollout.model_path defaults to model.hf_dir: SDPGConfig.fill_derived)
        rollout_cfg = replace(rollout_cfg, log_dir=os.path.join(cfg.train.run_dir, "engines"),
                              sync_dir=os.path.join(cfg.train.run_dir, "weight_sync"))
        parts.launcher = EngineLauncher(rollout_cfg)
        parts.closers.append(parts.launcher.stop_all)
        urls = parts.launcher.start_all()
    client = RolloutClient.from_config(rollout_cfg, urls, on_engine_failure=parts.on_engine_failure)
    parts.closers.append(client.close)
    if rollout_cfg.engine == "sglang":
        _check_engine_flags(client, rollout_cfg)
    verifier = VerifierPool(cfg.reward.verifier or task.default_verifier, cfg.reward)
    parts.closers.append(verifier.close)
    address, port = _sync_endpoint(rollout_cfg, urls)
    parts.sync = make_weight_sync(rollout_cfg, client, config_dir=cfg.model.hf_dir, master_address=address,
                                  master_port=port)
    if hasattr(parts.sync, "close"):  # the distributed strategy's group: engines leave it before the client closes
        parts.closers.append(parts.sync.close)
    parts.rollout_ctx = RolloutContext(client=client, builder=builder, verifier=verifier, tokenizer=tokenizer,
                                       sampling=rollout_cfg.sampling, n_samples=rollout_cfg.n_samples)
    parts.log = MetricsLog(cfg.train.run_dir, cfg.logging, cfg.train.steps, parts.start_step)
    parts.closers.append(parts.log.close)
