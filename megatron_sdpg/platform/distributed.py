"""Distributed start-up: the one module that owns megatron's ``parallel_state``.

Everything below it receives a :class:`ParallelGroups` object explicitly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sdpg.platform import cpu_redirect
from megatron_sdpg.platform.layout import ParallelConfig, ParallelLayout


@dataclass
class ParallelGroups:
    """The process groups and this rank's coordinates in them.

    Attributes:
        layout: The resolved degrees.
        pg: megatron-core's ``ProcessGroupCollection`` (tp, pp, dp, cp, embd, ...),
            passed to megatron models and schedules.
        tp, pp, dp, cp, mp: The groups most code needs, for convenience.
        tp_rank, pp_rank, dp_rank, cp_rank: This rank's index in each group.
    """

    layout: ParallelLayout
    pg: object
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    cp: dist.ProcessGroup
    mp: dist.ProcessGroup
    tp_rank: int
    pp_rank: int
    dp_rank: int
    cp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    @property
    def tp_group_or_none(self) -> dist.ProcessGroup | None:
        """The TP group, or None when tp == 1 (the ops' "no TP" convention)."""
        return self.tp if self.layout.tp > 1 else None


def backend_for_device() -> str:
    """``nccl`` when CUDA is present, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialises ``torch.distributed`` from torchrun/srun environment variables.

    Works for a single process without a launcher (world size 1, a local
    file store). Picks nccl on GPU, gloo on CPU, and switches the CPU redirect
    on when there is no CUDA.

    Returns:
        ``(rank, world_size)``.
    """
    cpu_redirect.enable()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=backend_for_device(), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    from megatron_sdpg.testing.distributed import free_port

    return free_port()


def init_model_parallel(cfg: ParallelConfig, seed: int, prefix: str = "parallel") -> ParallelGroups:
    """Creates megatron's process groups for ``cfg`` and seeds its RNG tracker.

    ``torch.distributed`` must be initialised (see :func:`init_distributed`).

    Args:
        cfg: Parallel degrees; validated against the world size here.
        seed: Base seed. Data-parallel ranks share streams, tensor-parallel ranks
            get distinct model-parallel streams (megatron's convention).
        prefix: Config path used in error messages.

    Raises:
        ConfigError: the layout does not fit the world size.
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.process_groups_config import ProcessGroupCollection

    cpu_redirect.enable()
    layout = ParallelLayout.resolve(cfg, dist.get_world_size(), prefix)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    pg = ProcessGroupCollection.use_mpu_process_groups()
    return ParallelGroups(
        layout=layout,
        pg=pg,
        tp=pg.tp,
        pp=pg.pp,
        dp=pg.dp,
        cp=pg.cp,
        mp=pg.mp,
        tp_rank=dist.get_rank(pg.tp),
        pp_rank=dist.get_rank(pg.pp),
        dp_rank=dist.get_rank(pg.dp),
        cp_rank=dist.get_rank(pg.cp),
    )


def shutdown() -> None:
    """Destroys megatron's groups and the default process group, if present."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
