"""Megatron checkpoints in ``dist_checkpointing`` (torch_dist) format, loadable at any TP/PP.

A checkpoint directory holds megatron's sharded files, the architecture as
``megatron_sdpg_model.json`` (a :class:`ModelConfig`), and ``hf/`` with the HF
config, tokenizer and generation config it came from, so that it converts back
to a complete HF directory.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig, RopeScalingConfig
from megatron_sdpg.weights.hf_io import copy_side_files

MODEL_CONFIG_FILE = "megatron_sdpg_model.json"
HF_SIDE_DIR = "hf"


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def sync_save_strategy():
    """megatron's ``torch_dist`` save strategy, written in this process.

    megatron's own strategy always goes through its async machinery, even for a
    synchronous save: it starts a multiprocessing manager process, forks a writer
    process per file and fsyncs every file (about 4.5 s of a 6 s conversion of a
    300M model). This one hands the same PyTorch-Distributed state dict and
    planner to ``torch.distributed.checkpoint.save`` with a plain in-process
    ``FileSystemWriter`` (one file per rank, no fsync: a conversion publishes its
    output by renaming a staging directory, not by durability of every file). The
    files are the same ``torch_dist`` format, loadable at any TP/PP.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class _SyncTorchDistSaveStrategy(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            dcp.save(mcore_torch.mcore_to_pyt_state_dict(state, False),
                     storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), sync_files=False, thread_count=1),
                     planner=mcore_torch.MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                                          flatten_state_dict=False))

    return _SyncTorchDistSaveStrategy("torch_dist", 1)


def save_megatron_checkpoint(chunks: list, model_cfg: ModelConfig, ckpt_dir: str, hf_side_dir: str | None = None) -> None:
    """Saves this rank's chunks into ``ckpt_dir`` (a collective over all ranks).

    Args:
        chunks: This rank's bare ``GPTModel`` chunks.
        model_cfg: The architecture, written to ``megatron_sdpg_model.json``.
        ckpt_dir: An existing, empty directory.
        hf_side_dir: An HF directory whose config/tokenizer files are copied to ``hf/``.
    """
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded_state_dict(chunks), ckpt_dir, sharded_strategy=sync_save_strategy())
    if dist.get_rank() == 0:
        write_checkpoint_metadata(ckpt_dir, model_cfg, hf_side_dir)
    dist.barrier()


def write_checkpoint_metadata(ckpt_dir: str, model_cfg: ModelConfig, hf_side_dir: str | None) -> None:
    """Writes ``megatron_sdpg_model.json`` and the HF side files (``hf/``) beside a dist checkpoint.

    With them, ``tools/convert_megatron_to_hf.py`` can export the directory (one rank calls this).
    """
    cfg = dataclasses.replace(model_cfg, hf_dir=None, megatron_dir=None)
    with open(os.path.join(ckpt_dir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)
    if hf_side_dir:
        os.makedirs(os.path.join(ckpt_dir, HF_SIDE_DIR), exist_ok=True)
        copy_side_files(hf_side_dir, os.path.join(ckpt_dir, HF_SIDE_DIR))


def read_checkpoint_config(ckpt_dir: str) -> ModelConfig:
    """The :class:`ModelConfig` stored with a checkpoint.

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a checkpoint written by this project.
    """
    path = os.path.join(ckpt_dir, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir!r} has no {MODEL_CONFIG_FILE}: not a megatron_sdpg checkpoint")
    with open(path) as f:
        raw = json.load(f)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown ModelConfig fields {unknown}")
    raw["rope_scaling"] = RopeScalingConfig(**raw.get("rope_scaling", {}))
    return ModelConfig(**raw)


def load_megatron_checkpoint(chunks: list, ckpt_dir: str) -> None:
    """Loads a ``dist_checkpointing`` checkpoint into this rank's chunks (any TP/PP).

    Raises:
        RuntimeError: from megatron when tensors are missing or misshapen.
    """
    from megatron.core import dist_checkpointing

    from megatron_sdpg.weights.checkpoint_read import direct_load_strategy

    state = dist_checkpointing.load(_sharded_state_dict(chunks), ckpt_dir, sharded_strategy=direct_load_strategy())
    for i, chunk in enumerate(chunks):
        _load_unless_in_place(chunk, state["model" if len(chunks) == 1 else f"model{i}"])


def _load_unless_in_place(chunk, loaded: dict) -> None:
    """``chunk.load_state_dict(loaded, strict=True)`` minus the tensors already read in place.

    ``dist_checkpointing`` reads straight into the parameters it was given, so most
    loaded tensors share their parameter's memory; copying them onto themselves
    again would cost a pass over the whole model. Keys are still checked strictly.
    """
    own = chunk.state_dict(keep_vars=True)

    def in_place(k: str, v) -> bool:
        mine = own.get(k)
        return (isinstance(v, torch.Tensor) and isinstance(mine, torch.Tensor) and v.shape == mine.shape
                and v.dtype == mine.dtype and v.stride() == mine.stride() and v.data_ptr() == mine.data_ptr())

    rest = {k: v for k, v in loaded.items() if not in_place(k, v)}
    result = chunk.load_state_dict(rest, strict=False)
    missing = sorted(set(result.missing_keys) - set(loaded))
    if missing or result.unexpected_keys:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:3]}, "
                           f"unexpected {sorted(result.unexpected_keys)[:3]}")
