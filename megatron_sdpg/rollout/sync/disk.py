"""``DiskSync``: write an HF safetensors checkpoint atomically, then ``/update_weights_from_disk``.

The checkpoint goes to ``{sync_dir}/.tmp-v{version}-*`` shard by shard and is
renamed to ``{sync_dir}/v{version}`` once complete, so an engine never sees a
half-written directory. ``sync_dir`` must be visible to the engines (a shared
filesystem on clusters). Older versions beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Iterable

import torch

from megatron_sdpg.rollout.blocking_client import RolloutClient
from megatron_sdpg.rollout.sync.base import ProbeCheck, WeightSync, tensor_bytes
from megatron_sdpg.formats.hf_io import copy_side_files
from megatron_sdpg.formats.safetensors_stream import SafetensorsStream


def write_hf_checkpoint(named: Iterable[tuple[str, torch.Tensor]], final_dir: str, shard_bytes: int,
                        config_dir: str | None = None) -> tuple[int, int]:
    """Writes ``model-0000i-of-0000n.safetensors`` shards + index into ``final_dir`` atomically.

    Args:
        named: ``(hf_name, tensor)`` pairs.
        final_dir: Must not exist yet.
        shard_bytes: Largest shard (a larger tensor gets a shard of its own).
        config_dir: Copy ``config.json``/``generation_config.json``/tokenizer files from here.

    Returns:
        ``(bytes, shards)``.
    """
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_dir)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        shards: list[dict[str, torch.Tensor]] = [{}]
        files: list[str] = []
        size = total = 0
        weight_map: dict[str, str] = {}

        def flush() -> None:
            name = f"shard-{len(files):05d}.safetensors"
            SafetensorsStream(shards[-1].items()).write_file(os.path.join(tmp, name))
            files.append(name)
            for key in shards[-1]:
                weight_map[key] = name
            shards[-1] = {}

        for key, t in named:
            if key in weight_map or key in shards[-1]:
                raise ValueError(f"weight {key!r} given twice")
            t = t.detach().to("cpu").contiguous()  # tied weights need no copy: each entry is written from memory
            n = tensor_bytes(t)
            if shards[-1] and size + n > shard_bytes:
                flush()
                size = 0
            shards[-1][key] = t
            size += n
            total += n
        if shards[-1]:
            flush()
        # Final names follow HF's convention once the shard count is known.
        renamed = {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
        for old, new in renamed.items():
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
        index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
        if config_dir:  # config, tokenizer, chat template: the directory must load on its own
            copy_side_files(config_dir, tmp)
        for name in os.listdir(tmp):  # data on disk before the rename makes it visible
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total, len(files)


class DiskSync(WeightSync):
    """Disk checkpoint + ``POST /update_weights_from_disk`` to every engine.

    Args:
        client: Reaches every engine.
        sync_dir: Where versions are written (visible to the engines).
        config_dir: HF directory whose config/tokenizer files are copied alongside.
        shard_bytes: Largest safetensors shard.
        keep_last: Versions kept on disk.
        probe: Optional post-sync log-prob check.
        timeout_s: Timeout of the update call.
    """

    name = "disk"

    def __init__(self, client: RolloutClient, sync_dir: str, config_dir: str | None = None,
                 shard_bytes: int = 4 * 2**30, keep_last: int = 2, probe: ProbeCheck | None = None,
                 timeout_s: float = 1800.0):
        super().__init__(client, probe)
        self.sync_dir = sync_dir
        self.config_dir = config_dir
        self.shard_bytes = shard_bytes
        self.keep_last = keep_last
        self.timeout_s = timeout_s
        self._written: list[str] = []

    def _push(self, named: Iterable[tuple[str, torch.Tensor]], version: str) -> dict[str, float]:
        final = os.path.join(self.sync_dir, f"v{version}")
        if os.path.exists(final):
            shutil.rmtree(final)
        t0 = time.perf_counter()
        nbytes, shards = write_hf_checkpoint(named, final, self.shard_bytes, self.config_dir)
        t1 = time.perf_counter()
        self.post_all("/update_weights_from_disk", {
            "model_path": os.path.abspath(final), "load_format": None, "flush_cache": True,
            "abort_all_requests": False, "weight_version": version,
        }, timeout_s=self.timeout_s)
        t2 = time.perf_counter()
        self._written.append(final)
        while len(self._written) > self.keep_last:
            shutil.rmtree(self._written.pop(0), ignore_errors=True)
        return {"sync/bytes": float(nbytes), "sync/write_s": t1 - t0, "sync/load_s": t2 - t1, "sync/shards": float(shards)}
