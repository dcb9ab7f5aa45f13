"""The weight-update process group shared by a trainer and its rollout engines.

SGLang's ``/init_weights_update_group`` makes every engine rank join a fresh
process group, separate from any default group: a TCP rendezvous at
``tcp://master_address:master_port`` (the trainer, rank 0, hosts the store),
keys under ``PrefixStore(group_name)``, engine rank = ``rank_offset + tp_rank``.
The trainer must build its side the same way or the rendezvous never meets, so
this module builds it with the same torch calls (``rendezvous`` and the private
``_new_process_group_helper``; torch has no public API for a group outside the
default world), except that rank 0 creates the ``TCPStore`` it hosts directly:
under torchrun ``rendezvous`` would connect to it as a client instead. Used by the trainer's ``DistributedSync`` and by the CPU server.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def init_weight_update_group(
    master_address: str,
    master_port: int,
    rank: int,
    world_size: int,
    group_name: str,
    backend: str,
    timeout_s: float = 300.0,
) -> dist.ProcessGroup:
    """Joins (rank 0: hosts) the weight-update group; blocks until all ranks join.

    Args:
        master_address: Host of rank 0's TCP store.
        master_port: Port of rank 0's TCP store.
        rank: This process's rank; the trainer is 0, engine ranks start at 1.
        world_size: 1 + the number of engine ranks.
        group_name: The group's name (must match on every rank).
        backend: ``nccl`` (GPU engines) or ``gloo`` (CPU).
        timeout_s: Rendezvous and collective timeout.

    Returns:
        The new process group; pass it to ``dist.broadcast(..., group=pg)``.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        # The host creates the store itself: under torchrun (TORCHELASTIC_USE_AGENT_STORE=True)
        # ``rendezvous`` would only connect to master_port as a client, and nobody would host it.
        store = dist.TCPStore(master_address, master_port, world_size, is_master=True, timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    else:
        store, rank, world_size = next(
            rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size, timeout=timeout)
        )
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(
        world_size, rank, [], Backend(backend), store, group_name=group_name, backend_options=None, timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def destroy_weight_update_group(pg: dist.ProcessGroup) -> None:
    """Tears the group down (its store and connections)."""
    dist.destroy_process_group(pg)


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` (SGLang's dtype strings) or ``"torch.bfloat16"`` -> ``torch.bfloat16``."""
    attr = name.removeprefix("torch.")
    dtype = getattr(torch, attr, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtypes: {name!r} is not a torch dtype")
    return dtype
