"""The training-step primitive: Megatron DDP + optimizer + ``forward_backward_func``.

Loss normalisation, written down once
-------------------------------------
A loss function returns ``(loss_sum, num_tokens, metrics)`` for one micro-batch
(megatron's contract with ``calculate_per_token_loss=True``). The schedule
sums ``loss_sum`` gradients over micro-batches, DDP sums them over data-parallel
ranks, and ``finalize_model_grads`` divides by the global sum of ``num_tokens``
(broadcast from the last pipeline stage, all-reduced over DP). So the update
minimises ``sum(loss_sum) / sum(num_tokens)`` over the whole global batch,
whatever the micro-batch split and DP size: that is the layout invariance the
tests check. ``num_tokens`` is the normaliser's unit: tokens for token-mean,
sequences for seq-mean aggregations.

Metrics are ``{name: tensor([sum, count])}``; :func:`reduce_metrics` sums them
over micro-batches and DP ranks and returns ``sum / count``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.models.architecture import ModelConfig
from megatron_sdpg.models.builder import build_model_chunks, mask_padded_vocab
from megatron_sdpg.models.init import init_layout_invariant_
from megatron_sdpg.models.output_hidden import is_last_stage, output_weight
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.train.teacher_memory import TeacherMemory

LossFn = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class OptimizerConfig:
    """AdamW and its schedule (config section ``optimizer``); paper defaults."""

    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_steps: int = 10
    lr_decay_style: str = "constant"

    def validate(self, prefix: str = "optimizer") -> None:
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{prefix}.{name}", f"must be a finite number, got {getattr(self, name)}")
        if not 0 < self.lr <= 1:
            raise ConfigError(f"{prefix}.lr", f"must be > 0 and at most 1, got {self.lr}")
        if not self.adam_eps > 0:
            raise ConfigError(f"{prefix}.adam_eps", f"must be > 0, got {self.adam_eps}")
        if not 0 <= self.weight_decay <= 1:
            raise ConfigError(f"{prefix}.weight_decay", f"must be in [0, 1], got {self.weight_decay}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"{prefix}.min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be in [0, 1), got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ConfigError(f"{prefix}.clip_grad", f"must be >= 0 (0 disables), got {self.clip_grad}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"{prefix}.lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ConfigError(f"{prefix}.lr_decay_style", f"must be constant, linear or cosine, got {self.lr_decay_style!r}")


@dataclass
class StepResult:
    """What one optimizer step reports."""

    updated: bool
    grad_norm: float
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)


def comm_device() -> torch.device:
    """Where tensors for collectives live: the current GPU under NCCL, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(mb: dict, device: torch.device) -> dict:
    """A shallow copy of a micro-batch with its tensors on ``device``."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}


def _pair(value) -> torch.Tensor:
    if isinstance(value, (tuple, list)):
        return torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).cpu() for v in value])
    return value.detach().to(torch.float64).reshape(2).cpu()


def reduce_metrics(per_microbatch: list[dict], groups: ParallelGroups) -> dict[str, float]:
    """Reduces ``{name: (sum, count)}`` over micro-batches and DP ranks; returns ``sum / count``.

    Names ending in ``_max`` hold ``(value, 1)`` and are reduced with max instead.
    Only the last pipeline stage has metrics; the result is broadcast to every
    stage so that any rank can log it. Names must agree across DP ranks.
    """
    names = sorted({k for mb in per_microbatch for k in mb})
    if groups.layout.pp > 1:
        obj = [names]
        src = dist.get_global_rank(groups.pp, groups.layout.pp - 1)
        dist.broadcast_object_list(obj, src=src, group=groups.pp)
        names = obj[0]
    if not names:
        return {}
    is_max = torch.tensor([n.endswith("_max") for n in names])
    sums = torch.zeros(len(names), 2, dtype=torch.float64)
    maxes = torch.full((len(names),), float("-inf"), dtype=torch.float64)
    for mb in per_microbatch:
        for i, name in enumerate(names):
            if name in mb:
                pair = _pair(mb[name])
                if is_max[i]:
                    maxes[i] = torch.maximum(maxes[i], pair[0])
                else:
                    sums[i] += pair
    sums, maxes = sums.to(comm_device()), maxes.to(comm_device())
    if groups.layout.dp > 1:
        dist.all_reduce(sums, group=groups.dp)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=groups.dp)
    if groups.layout.pp > 1:
        src = dist.get_global_rank(groups.pp, groups.layout.pp - 1)
        dist.broadcast(sums, src=src, group=groups.pp)
        dist.broadcast(maxes, src=src, group=groups.pp)
    out = {}
    for i, name in enumerate(names):
        if is_max[i]:
            out[name] = maxes[i].item()
        else:
            out[name] = (sums[i, 0] / sums[i, 1]).item() if sums[i, 1] > 0 else float("nan")
    return out


def _all_finite(chunks: list, groups: ParallelGroups) -> bool:
    """True when every gradient on every rank is finite (one all-reduce)."""
    bad = torch.zeros(1, device=comm_device())
    for chunk in chunks:
        for p in chunk.parameters():
            g = getattr(p, "main_grad", None)
            if g is not None and not torch.isfinite(g).all():
                bad.fill_(1)
                break
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0


class PolicyModel:
    """This rank's model chunks, wrapped for training, with optimizer and LR schedule.

    Args:
        model_cfg: The architecture (resolved).
        groups: Process groups of this rank.
        opt_cfg: Optimizer settings; ``None`` builds a frozen, forward-only model
            (the reference policy).
        use_distributed_optimizer: Shard optimizer state across DP ranks.
        total_steps: Steps for the LR decay schedule.
        seed: Seed for the layout-invariant initialisation.
        weights_loader: Fills the bare chunks' weights (e.g. from an HF or Megatron
            checkpoint) instead of the random initialisation; runs before the
            optimizer copies the parameters.
    """

    def __init__(self, model_cfg: ModelConfig, groups: ParallelGroups, opt_cfg: OptimizerConfig | None = None,
                 use_distributed_optimizer: bool = True, total_steps: int = 1, seed: int = 1234,
                 weights_loader: Callable[[list], None] | None = None):
        self.cfg = model_cfg
        self.groups = groups
        # Output-layer logits only at a micro-batch's ``resp_rows`` (see _forward_step).
        self.select_response_rows = True
        self._teacher, self._teacher_memory = self, None  # set for the span of one schedule call (_run)
        chunks = build_model_chunks(model_cfg, groups)
        if weights_loader is None:
            init_layout_invariant_(chunks, groups, seed, model_cfg.init_std, model_cfg.vocab_size)
        else:
            weights_loader(chunks)
        self.optimizer = None
        self.scheduler = None
        if opt_cfg is None:
            for c in chunks:
                c.requires_grad_(False)
                c.eval()
            self.chunks = chunks
            return
        self.chunks = self._wrap_ddp(chunks, use_distributed_optimizer)
        self.optimizer, self.scheduler = self._build_optimizer(opt_cfg, use_distributed_optimizer, total_steps)

    def _wrap_ddp(self, chunks: list, use_distributed_optimizer: bool) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=use_distributed_optimizer,
            average_in_collective=False,
        )
        wrapped = [
            DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0,
                                    pg_collection=self.groups.pg)
            for i, c in enumerate(chunks)
        ]
        tcfg = chunks[0].config
        tcfg.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=self.groups.pg)
        tcfg.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
        return wrapped

    def _build_optimizer(self, opt: OptimizerConfig, use_distributed_optimizer: bool, total_steps: int):
        from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
        from megatron.core.optimizer import get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        bf16 = self.cfg.params_dtype == "bfloat16"
        mcfg = MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=bf16,
            params_dtype=self.cfg.torch_dtype,
            use_distributed_optimizer=use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(mcfg, self.chunks, use_gloo_process_groups=False,
                                           pg_collection=self.groups.pg)
        self.chunks[0].config.grad_scale_func = optimizer.scale_loss
        warmup = min(opt.lr_warmup_steps, max(total_steps - 1, 0))
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=opt.lr / max(warmup, 1) if warmup else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=max(total_steps, warmup + 1),
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    # ----------------------------------------------------------------- passes

    def _forward_step(self, loss_fn: LossFn, data_iterator, model):
        """One micro-batch through ``model``; the last stage's output goes to ``loss_fn``.

        A micro-batch with ``resp_rows`` (``[T]`` flat rows of ``[b*s]``, see
        :func:`~megatron_sdpg.train.batch.collate`) gets logits only at those rows:
        ``[1, T, V/tp]`` instead of ``[b, s, V/tp]``, and ``mb['rows_selected']``
        says so (False where the rows could not be selected, e.g. sequence
        parallelism); read them with :func:`~megatron_sdpg.train.passes.response_logits`.
        ``self.select_response_rows = False`` computes every position (the old path).
        With ``mb['inline_teacher']`` the teacher view of the micro-batch runs first on
        every stage (:func:`~megatron_sdpg.train.passes.forward_with_teacher`).
        """
        from megatron_sdpg.train.passes import forward_with_teacher, view_forward

        mb = to_device(next(data_iterator), comm_device())
        if mb.get("inline_teacher"):  # the teacher view of this micro-batch first, on every stage
            sp_tp = self.groups.layout.tp if self.chunks[0].config.sequence_parallel else 1
            output = forward_with_teacher(model, self._teacher_chunk(model), mb, self.cfg.vocab_size,
                                          self.groups.tp_rank, sp_tp, self._teacher_memory, self.select_response_rows)
        else:
            rows = mb.get("resp_rows") if self.select_response_rows else None
            output, mb["rows_selected"] = view_forward(model, mb["tokens"], mb["position_ids"],
                                                       bool(mb.get("emit_hidden")), rows, mb.get("attention_mask"))
        if mb.get("emit_hidden") and is_last_stage(model):  # algorithm.fused_output: hidden states
            mb["output_weight"], mb["vocab_size"] = output_weight(model), self.cfg.vocab_size
        return output, partial(self._loss, loss_fn, mb)

    def _teacher_chunk(self, model):
        """The teacher model's chunk at the position of ``model`` among this model's chunks."""
        index = next(i for i, c in enumerate(self.chunks) if c is model)
        return self._teacher.chunks[index]

    def _loss(self, loss_fn: LossFn, mb: dict, logits: torch.Tensor):
        if not mb.get("emit_hidden"):
            mask_padded_vocab(logits, self.cfg.vocab_size, self.groups.tp_rank)
        loss_sum, num_tokens, metrics = loss_fn(mb, logits)
        count = torch.as_tensor(num_tokens)
        if count.is_floating_point():  # megatron sums the normaliser as an int: it must be whole
            if not torch.equal(count, count.round()):
                raise ValueError(f"the loss normaliser {count.item()} is not a whole number; megatron sums it "
                                 "as an int (fold fractional constants into the loss sum)")
            count = count.round()
        return loss_sum, count.to(torch.int), metrics

    def _run(self, microbatches: list[dict], loss_fn: LossFn, forward_only: bool, teacher: PolicyModel | None = None,
             teacher_memory: TeacherMemory | None = None) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            raise ValueError("no micro-batches to run")
        b, s = microbatches[0]["tokens"].shape
        inline = bool(microbatches[0].get("inline_teacher"))
        s_t = microbatches[0]["teacher_tokens"].shape[1] if inline else 0
        one_shape = self.groups.layout.pp > 1  # pipeline p2p buffers have one shape; PP=1 takes any
        for i, mb in enumerate(microbatches):
            if one_shape and mb["tokens"].shape != (b, s):
                raise ValueError(f"micro-batch {i} has shape {tuple(mb['tokens'].shape)}, expected {(b, s)}: "
                                 "pad every micro-batch of a step to one shape under pipeline parallelism")
            if bool(mb.get("inline_teacher")) != inline or (
                    inline and one_shape and mb["teacher_tokens"].shape != (b, s_t)):
                raise ValueError(f"micro-batch {i}: every micro-batch of a call needs the teacher view "
                                 f"inline or none does" + (f", padded to one shape {(b, s_t)}" if one_shape else ""))
        n_chunks = len(self.chunks)
        iterators = [iter(microbatches) for _ in range(n_chunks)]
        fb = get_forward_backward_func(self.groups.layout.pp, self.groups.layout.vpp)
        self._teacher, self._teacher_memory = teacher or self, teacher_memory
        try:
            return fb(
                forward_step_func=partial(self._forward_step, loss_fn),
                data_iterator=iterators if n_chunks > 1 else iterators[0],
                model=self.chunks if n_chunks > 1 else self.chunks[0],
                num_microbatches=len(microbatches),
                seq_length=s + s_t,  # the stages pass [s + s_t, b, h]: student rows, then teacher rows
                micro_batch_size=b,
                forward_only=forward_only,
            )
        finally:
            self._teacher, self._teacher_memory = self, None

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], loss_fn: LossFn, teacher: PolicyModel | None = None,
                     teacher_memory: TeacherMemory | None = None) -> list[dict]:
        """Runs ``loss_fn`` on each micro-batch without gradients.

        ``teacher``/``teacher_memory``: as in :meth:`train_step`.

        Returns:
            The per-micro-batch metrics dicts on the last pipeline stage (an
            empty list elsewhere). ``loss_fn`` may stash tensors in them.
        """
        for c in self.chunks:
            c.eval()
        return self._run(microbatches, loss_fn, True, teacher, teacher_memory)

    def train_step(self, microbatches: list[dict], loss_fn: LossFn, teacher: PolicyModel | None = None,
                   teacher_memory: TeacherMemory | None = None) -> StepResult:
        """One optimizer step over the micro-batches of this DP rank.

        A non-finite gradient anywhere skips the update on every rank (logged by
        the caller from ``StepResult.updated``).

        Micro-batches with ``inline_teacher`` set (all or none) get their teacher
        view inside the schedule, right before their student view, on every
        pipeline stage (:func:`~megatron_sdpg.train.passes.forward_with_teacher`).

        Args:
            microbatches: This rank's micro-batches, one shape.
            loss_fn: The loss contract (see the module docstring).
            teacher: The model whose chunks compute the teacher view (same
                architecture and layout); None = this model's current weights.
            teacher_memory: Counts the teacher data held (for the memory metric).
        """
        if self.optimizer is None:
            raise RuntimeError("this PolicyModel was built without an optimizer (frozen)")
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_mb = self._run(microbatches, loss_fn, False, teacher, teacher_memory)
        metrics = reduce_metrics(per_mb, self.groups)
        lr = self.optimizer.param_groups[0]["lr"]
        if not _all_finite(self.chunks, self.groups):
            return StepResult(updated=False, grad_norm=float("nan"), lr=lr, metrics=metrics)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=1)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        return StepResult(updated=bool(updated) and math.isfinite(grad_norm), grad_norm=grad_norm, lr=lr,
                          metrics=metrics)

    def unwrapped(self) -> list:
        """The bare ``GPTModel`` chunks (inside DDP when training)."""
        return [getattr(c, "module", c) for c in self.chunks]

    def named_parameters(self) -> Iterable[tuple[str, torch.Tensor]]:
        for i, chunk in enumerate(self.unwrapped()):
            for name, p in chunk.named_parameters():
                yield (f"{i}.{name}" if len(self.chunks) > 1 else name), p


def cross_entropy_loss(mb: dict, logits: torch.Tensor, tp_group=None) -> tuple[Any, Any, dict]:
    """A plain next-token cross-entropy on ``mb['loss_mask']`` tokens (tests, warm starts).

    Args:
        mb: ``tokens`` ``[b, s]``, ``labels`` ``[b, s]`` and ``loss_mask`` ``[b, s]``.
        logits: ``[b, s, v/tp]``.
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    losses = vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(), mb["labels"].t().contiguous())
    mask = mb["loss_mask"].t().float()
    loss_sum = (losses * mask).sum()
    n = mask.sum()
    return loss_sum, n.int(), {"ce": torch.stack([loss_sum.detach(), n])}
