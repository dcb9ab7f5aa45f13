"""The SDPG training loop: rollout -> verify -> passes -> update -> sync -> log -> eval.

Global rank 0 drives the rollout engines and the verifier and broadcasts the
samples; every rank then takes its data-parallel share, runs the no-gradient
passes (reference, old policy, teacher) and the update through megatron's
pipeline schedule, and joins the weight export that rank 0 streams to the
engines. With ``rollout.off_policy_steps=1`` the next step's batch is generated
during the passes and the update (``megatron_sdpg/train/overlap.py``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from megatron_sdpg.config.schema import SDPGConfig
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.train import passes
from megatron_sdpg.train.batch import plan_microbatches
from megatron_sdpg.train.checkpoint import save_checkpoint
from megatron_sdpg.train.overlap import BackgroundCall
from megatron_sdpg.train.setup import TrainerParts, build_parts
from megatron_sdpg.train.step import comm_device
from megatron_sdpg.train.teacher_memory import TeacherMemory
from megatron_sdpg.utils.files import write_text_atomic


def _broadcast(obj, src: int = 0):
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class Trainer:
    """Runs ``cfg.train.steps`` SDPG steps (or GRPO/DAPO/OPSD, by preset).

    Args:
        cfg: The validated configuration.
        groups: This rank's process groups.
    """

    def __init__(self, cfg: SDPGConfig, groups: ParallelGroups):
        self.cfg = cfg
        self.groups = groups
        self.rank = dist.get_rank()
        fused_off = cfg.fused_output_off_reason()
        if fused_off:
            cfg.algorithm.fused_output = False
        self.parts: TrainerParts = build_parts(cfg, groups)
        if fused_off:
            self._log_line(fused_off)
        pack_off = self._pack_off_reason() if cfg.train.pack_sequences else None
        self._pack = cfg.train.pack_sequences and pack_off is None
        if pack_off:
            self._log_line(f"train.pack_sequences is off: {pack_off}; micro-batches are padded")
        # rollout.off_policy_steps=1: the next step's batch, as (step, problems, seed) on every rank while
        # rank 0 generates it on a background thread, then as (step, samples, metrics) once it is complete.
        self._next_batch: tuple[int, list, int] | None = None
        self._next_batch_call: BackgroundCall | None = None
        self._prefetched: tuple[int, list, dict] | None = None

    def _pack_off_reason(self) -> str | None:
        """Why packed rows cannot run in this layout (None: they can)."""
        from megatron_sdpg.models.builder import transformer_engine_available

        if self.groups.layout.pp > 1:
            return "pipeline parallelism needs one shape per micro-batch"
        if self.groups.layout.cp > 1:
            return "context parallelism splits each row's sequence over ranks, and the mask with it"
        if transformer_engine_available():
            return "Transformer Engine's causal attention ignores the packed rows' mask (THD is not wired)"
        return None

    # ------------------------------------------------------------------ loop

    def run(self) -> dict:
        """Trains; returns (and on rank 0 prints) the run summary."""
        cfg, parts = self.cfg, self.parts
        if parts.resumed_from is not None:
            # The engines start from the initial weights: give them the checkpoint's before anything is generated.
            parts.sync_weights(version=parts.start_step)
            self._log_line(f"resumed from {parts.resumed_from} at step {parts.start_step}")
        before = self.evaluate()
        self._log_line(f"held-out accuracy before: {json.dumps(before)}")
        for step in range(parts.start_step, cfg.train.steps):
            metrics = self.train_one_step(step)
            if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < cfg.train.steps:
                metrics.update(self.evaluate())
            if parts.log is not None:
                parts.log.log(step, metrics)
            every = cfg.checkpoint.save_every
            if every and ((step + 1) % every == 0 or step + 1 == cfg.train.steps):
                save_checkpoint(parts, step + 1)
        after = self.evaluate()
        summary = {
            "accuracy_before": before.get("eval/accuracy"),
            "accuracy_after": after.get("eval/accuracy"),
            "accuracy_with_context_before": before.get("eval/accuracy_with_context"),
            "accuracy_with_context_after": after.get("eval/accuracy_with_context"),
            "steps": cfg.train.steps,
            "preset": cfg.algorithm.preset,
            "layout": self.groups.layout.describe(),
            "run_dir": os.path.abspath(cfg.train.run_dir),
        }
        if self.rank == 0:
            parts.log.log(cfg.train.steps, {**after, "final": True}, advance=False)
            write_text_atomic(os.path.join(cfg.train.run_dir, "summary.json"), json.dumps(summary, indent=1))
        return summary

    def train_one_step(self, step: int) -> dict:
        """One SDPG step; returns its metrics (meaningful on rank 0)."""
        cfg, parts, algo = self.cfg, self.parts, self.cfg.algorithm
        t_step = time.perf_counter()
        need_teacher = parts.needs_teacher(step)
        mbs, metrics = self._rollout_until_every_rank_is_fed(step, need_teacher)
        if "rollout/weight_version" in metrics:  # v_step trains on samples from this version
            metrics["rollout/staleness"] = step - metrics["rollout/weight_version"]
        if cfg.rollout.off_policy_steps and step + 1 < cfg.train.steps:
            self._start_next_batch(step + 1)  # generated with the engines' weights while this step trains
        if mbs is not None and cfg.rollout.colocate:
            # Colocated engines free their memory before any rank starts the passes (the broadcast holds them).
            metrics.update(_broadcast(parts.release_engines() if self.rank == 0 else None))
        metrics["time/rollout_s"] = time.perf_counter() - t_step
        if mbs is None:
            metrics["skipped_updates"] = cfg.train.ppo_epochs * cfg.train.mini_batches
            metrics.update(self._finish_next_batch())
            return metrics

        beta = parts.beta(step)
        teacher_model = parts.teacher_model()
        t0 = time.perf_counter()
        temperature = algo.logprob_temperature()
        updates = cfg.train.ppo_epochs * cfg.train.mini_batches
        if parts.reference is not None and parts.needs_ref_log_probs:
            passes.log_prob_pass(parts.reference, mbs, "ref_log_probs", temperature)
        if updates > 1:
            passes.log_prob_pass(parts.policy, mbs, "old_log_probs", temperature)
        # The teacher view runs inside the update's schedule, right before the student view of each
        # micro-batch, at any PP (teacher memory: the micro-batches in flight). Only the teacher of the
        # step's starting weights under several updates (the paper; teacher_per_microbatch=False) needs
        # weights that the first update replaces: that case keeps the pre-pass (every micro-batch's
        # teacher data until the step ends). With one update, or the frozen teacher, both are equal.
        teacher_memory = TeacherMemory()
        frozen_teacher = teacher_model is not parts.policy
        in_schedule = need_teacher and (algo.teacher_per_microbatch or updates == 1 or frozen_teacher)
        if need_teacher and not in_schedule:
            passes.teacher_pass(teacher_model, mbs, hidden=algo.fused_output, memory=teacher_memory)
        for mb in mbs:
            mb["emit_hidden"] = algo.fused_output
            mb["inline_teacher"] = in_schedule
        metrics["time/logprob_passes_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        loss_fn = parts.loss_fn(step)
        skipped = 0
        for _ in range(cfg.train.ppo_epochs):
            for subset in _split(mbs, cfg.train.mini_batches):
                result = parts.policy.train_step(subset, loss_fn, teacher=teacher_model if in_schedule else None,
                                                 teacher_memory=teacher_memory)
                skipped += not result.updated
                if not result.updated:
                    self._log_line(f"step {step}: non-finite loss or gradient (grad norm {result.grad_norm}); "
                                   "update skipped")
        metrics["time/update_s"] = time.perf_counter() - t0
        metrics.update(result.metrics)
        metrics.update({"grad_norm": result.grad_norm, "lr": result.lr, "beta": beta, "skipped_updates": skipped})
        # The largest peak over the ranks of teacher data held during the step (last stage: the logits or
        # hidden states kept for the loss; other stages: the teacher half of the pipeline activations).
        metrics["memory/teacher_peak_mb"] = -_fewest_on_any_rank(-teacher_memory.peak) / 2**20

        metrics.update(self._finish_next_batch())  # no weights reach the engines while a batch is in flight
        t0 = time.perf_counter()
        metrics.update(parts.sync_weights(version=step + 1))
        metrics["time/sync_s"] = time.perf_counter() - t0
        metrics["step_s"] = time.perf_counter() - t_step
        return metrics

    def _rollout_until_every_rank_is_fed(self, step: int, with_teacher: bool) -> tuple[list | None, dict]:
        """Rollout (rank 0, broadcast), then this rank's micro-batches once every rank has enough.

        Dynamic sampling can drop so many groups that some data-parallel rank gets fewer
        micro-batches than ``train.mini_batches`` (or none). Every rank learns the fewest
        count from one all-reduce, so all of them take the same branch: sample more groups
        from the next prompts, DAPO style, up to ``algorithm.max_refill_rounds`` times, then
        skip the update with one logged line (a rank that raised alone would leave the
        others waiting in the update's collectives).

        Returns:
            ``(micro_batches, metrics)``: this rank's micro-batches, or None when every
            rank skips the update.
        """
        cfg, parts = self.cfg, self.parts
        samples, metrics, rounds = [], {}, 0
        while True:
            if rounds == 0 and self._prefetched is not None:  # generated during the previous step
                ready, more, more_metrics = self._prefetched
                if ready != step:
                    raise AssertionError(f"the prefetched batch is step {ready}'s, not step {step}'s")
                self._prefetched = None
                parts.source_state_before_prefetch = None
            else:
                problems = parts.source.next_batch()  # on every rank: the prompt sources stay in step
                # Round 0 keeps the step's seed; refills get seeds no other step uses.
                seed = cfg.train.seed * 100_003 + step + rounds * 1_000_003
                more, more_metrics = self._on_rank0(lambda: parts.rollout(problems, seed=seed))
            offset = max((s.group for s in samples), default=-1) + 1
            samples += [replace(s, group=s.group + offset) for s in more]
            dropped = metrics.get("rollout/dropped_groups", 0.0) + more_metrics.get("rollout/dropped_groups", 0.0)
            metrics = {**more_metrics, **metrics, "rollout/dropped_groups": dropped, "rollout/refill_rounds": rounds}
            mbs = []
            if samples:
                mbs = plan_microbatches(samples, self.groups.layout.dp, self.groups.dp_rank,
                                        cfg.train.micro_batch_size, cfg.train.max_tokens_per_microbatch,
                                        parts.pad_id, with_teacher=with_teacher,
                                        # PP=1 takes micro-batches of any shape: packed rows (train.pack_sequences),
                                        # else each padded to its own longest, bucketed by length when one update
                                        # takes them all (same loss)
                                        one_shape=self.groups.layout.pp > 1,
                                        sort_by_length=cfg.train.mini_batches == 1, pack=self._pack)
            fewest = _fewest_on_any_rank(len(mbs))
            if fewest >= cfg.train.mini_batches:
                return mbs, metrics
            if rounds == cfg.algorithm.max_refill_rounds:
                kept = len({s.group for s in samples})
                self._log_line(f"step {step}: dynamic sampling kept {len(samples)} samples ({kept} groups) after "
                               f"{rounds} refill rounds, leaving a data-parallel rank {fewest} micro-batches for "
                               f"train.mini_batches={cfg.train.mini_batches}; update skipped on every rank")
                return None, metrics
            rounds += 1

    def _start_next_batch(self, step: int) -> None:
        """Draws ``step``'s prompts (every rank) and starts generating them on rank 0, in the background.

        The prompt source's position before the draw is what a checkpoint saved before
        ``step`` records, so a resumed run draws these prompts again (and regenerates them).
        """
        parts = self.parts
        parts.source_state_before_prefetch = parts.source.state_dict()
        problems = parts.source.next_batch()
        seed = self.cfg.train.seed * 100_003 + step  # the seed step's round 0 has on-policy too
        self._next_batch = (step, problems, seed)
        if self.rank == 0:
            self._next_batch_call = BackgroundCall(lambda: parts.rollout(problems, seed=seed),
                                                   name=f"rollout-step{step}")

    def _finish_next_batch(self) -> dict:
        """Waits for the batch started by :meth:`_start_next_batch` and broadcasts it (every rank).

        Called before the weight sync, so the engines never receive weights mid-batch. A
        restarted engine (``EngineRestartedError``) is handled as on-policy: every rank syncs
        the current engine weights again and rank 0 regenerates the batch with them.

        Returns:
            ``time/next_batch_wait_s``: how long generation outlasted this step's work.
        """
        if self._next_batch is None:
            return {}
        step, problems, seed = self._next_batch
        pending = [self._next_batch_call]
        self._next_batch, self._next_batch_call = None, None
        t0 = time.perf_counter()

        def result():
            if pending:
                return pending.pop().result()
            return self.parts.rollout(problems, seed=seed)

        samples, metrics = self._on_rank0(result)
        self._prefetched = (step, samples, metrics)
        return {"time/next_batch_wait_s": time.perf_counter() - t0}

    def evaluate(self) -> dict:
        """Held-out greedy accuracy without and with the privileged context (rank 0)."""
        return self._on_rank0(lambda: self.parts.evaluate(self.cfg.train.eval_n))

    def _on_rank0(self, fn, attempts: int = 3):
        """``fn()`` on rank 0 (it drives the engines), broadcast to every rank.

        An engine that died and was restarted with its initial weights fails the call
        (``EngineRestartedError``); every rank then joins a sync of the current weights
        and ``fn`` runs again from scratch, so no sample is lost, duplicated or drawn
        from the wrong weights.
        """
        from megatron_sdpg.rollout.protocol import EngineRestartedError

        for attempt in range(attempts):
            result, restarted = None, None
            if self.rank == 0:
                try:
                    result = fn()
                except EngineRestartedError as err:
                    if attempt + 1 == attempts:
                        raise
                    restarted = str(err)
            restarted = _broadcast(restarted)
            if restarted is None:
                return _broadcast(result)
            self._log_line(f"{restarted}; syncing it and redoing the batch")
            self.parts.sync_weights(version=self.parts.synced_version)
        raise AssertionError("unreachable")

    def _log_line(self, message: str) -> None:
        if self.rank == 0:
            self.parts.log.write(message)

    def close(self) -> None:
        self.parts.close()


def _fewest_on_any_rank(count: int) -> int:
    """The minimum of ``count`` over every rank (one all-reduce on the default group)."""
    t = torch.tensor([count], dtype=torch.int64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _split(items: list, n: int) -> list[list]:
    """``items`` in ``n`` consecutive, near-equal, non-empty slices."""
    if n > len(items):
        raise ValueError(f"train.mini_batches={n} exceeds this rank's {len(items)} micro-batches; "
                         "lower train.mini_batches or train.micro_batch_size")
    bounds = [round(i * len(items) / n) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]
