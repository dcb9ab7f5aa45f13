"""Weight sync from the trainer to the rollout engines: one strategy per module, chosen here.

Usage::

    sync = make_weight_sync(cfg.rollout, client, config_dir=hf_dir)
    metrics = sync.sync(hf_named_tensors(model), version=step)   # iterator of (hf_name, tensor)

Strategies:

* ``disk`` -> ``DiskSync`` (``disk.py``): atomic HF safetensors dir + ``/update_weights_from_disk``.
* ``tensor`` -> ``TensorPushSync`` (``tensor.py``): buckets through ``/update_weights_from_tensor``.
* ``distributed`` -> ``NcclBroadcastSync`` (``distributed.py``): ``/init_weights_update_group``
  then per bucket ``/update_weights_from_distributed`` + broadcast (NCCL, or gloo on CPU).
"""

from __future__ import annotations

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.config import RolloutConfig
from megatron_sdpg.rollout.sync.base import (  # noqa: F401 - re-exported
    ProbeCheck,
    WeightSync,
    WeightSyncError,
    WeightSyncMismatchError,
    iter_buckets,
)
from megatron_sdpg.rollout.sync.disk import DiskSync, write_hf_checkpoint  # noqa: F401
from megatron_sdpg.rollout.sync.distributed import NcclBroadcastSync  # noqa: F401
from megatron_sdpg.rollout.sync.tensor import TensorPushSync  # noqa: F401


def make_weight_sync(cfg: RolloutConfig, client: RolloutClient, config_dir: str | None = None,
                     master_address: str = "127.0.0.1", master_port: int | None = None) -> WeightSync:
    """The strategy ``cfg.sync_strategy`` names, configured from ``cfg``.

    Args:
        cfg: The rollout section.
        client: Reaches every engine.
        config_dir: HF directory whose config files ``DiskSync`` copies alongside the weights.
        master_address: Address engines reach the trainer at (``distributed``).
        master_port: Free port for the weight-update group (``distributed``; required there).
    """
    bucket = int(cfg.sync_bucket_mb * 2**20)
    if cfg.sync_strategy == "disk":
        return DiskSync(client, cfg.sync_dir, config_dir=config_dir)
    if cfg.sync_strategy == "tensor":
        encoding = "sglang" if cfg.engine == "sglang" else "safetensors"
        return TensorPushSync(client, bucket_bytes=bucket, encoding=encoding, tp_size=cfg.tp_size)
    if master_port is None:
        raise ValueError("master_port: the distributed strategy needs a free port for its process group")
    backend = "gloo" if cfg.engine == "cpu" else cfg.distributed_backend
    return NcclBroadcastSync(client, master_address, master_port, backend=backend,
                             engine_tp_sizes=[cfg.tp_size] * len(client.urls), bucket_bytes=bucket)
