"""Megatron checkpoints in ``dist_checkpointing`` (torch_dist) format, loadable at any TP/PP.

A checkpoint directory holds megatron's sharded files, the architecture as
``megatron_sdpg_model.json`` (a :class:`ModelConfig`), and ``hf/`` with the HF
config, tokenizer and generation config it came from, so that it converts back
to a complete HF directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig, RopeScalingConfig
from megatron_sdpg.formats.hf_io import CorruptCheckpointError, copy_side_files

MODEL_CONFIG_FILE = "megatron_sdpg_model.json"
HF_SIDE_DIR = "hf"


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def sync_save_strategy(values: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """megatron's ``torch_dist`` save strategy, written in this process.

    megatron's own strategy always goes through its async machinery, even for a
    synchronous save: it starts a multiprocessing manager process, forks a writer
    process per file and fsyncs every file (about 4.5 s of a 6 s conversion of a
    300M model). This one hands the same PyTorch-Distributed state dict and
    planner to ``torch.distributed.checkpoint.save`` with a plain in-process
    ``FileSystemWriter`` (one file per rank, no fsync: a conversion publishes its
    output by renaming a staging directory, not by durability of every file). The
    files are the same ``torch_dist`` format, loadable at any TP/PP.

    Each stored item is a ``torch.save`` record written without its zip CRC-32
    (``torch.load`` does not check it; computing it cost about 0.2 s per GB, a
    third of a conversion's save on this machine type).

    Args:
        values: Where the data of each tensor comes from when it is written:
            called with the tensor in the state dict (a parameter or a view of
            one), returns a tensor of the same shape and dtype to write instead
            (e.g. :class:`~megatron_sdpg.weights.hf_source.HFParamSource`). None
            writes the tensors themselves.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

    class _SyncTorchDistSaveStrategy(mcore_torch.TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            with _no_record_crc32():
                dcp.save(mcore_torch.mcore_to_pyt_state_dict(state, False),
                         storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), sync_files=False, thread_count=1),
                         planner=_Planner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                          flatten_state_dict=False))

    class _Planner(mcore_torch.MCoreSavePlanner):
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            if values is None or not isinstance(data, torch.Tensor):
                return data
            value = values(data)
            if value.shape != data.shape or value.dtype != data.dtype:
                raise RuntimeError(f"{write_item.index.fqn}: the value to save is {tuple(value.shape)} {value.dtype}, "
                                   f"the state dict has {tuple(data.shape)} {data.dtype}")
            return value

    return _SyncTorchDistSaveStrategy("torch_dist", 1)


@contextlib.contextmanager
def _no_record_crc32():
    """``torch.save`` without per-record CRC-32 inside the block (the previous setting restored)."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def save_megatron_checkpoint(chunks: list, model_cfg: ModelConfig, ckpt_dir: str, hf_side_dir: str | None = None,
                             values: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Saves this rank's chunks into ``ckpt_dir`` (a collective over all ranks).

    Args:
        chunks: This rank's bare ``GPTModel`` chunks.
        model_cfg: The architecture, written to ``megatron_sdpg_model.json``.
        ckpt_dir: An existing, empty directory.
        hf_side_dir: An HF directory whose config/tokenizer files are copied to ``hf/``.
        values: Supplies each parameter's data as it is written instead of the
            parameter's memory (see :func:`sync_save_strategy`).
    """
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded_state_dict(chunks), ckpt_dir, sharded_strategy=sync_save_strategy(values))
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


def check_checkpoint_files(ckpt_dir: str) -> None:
    """Checks that a ``dist_checkpointing`` directory is whole, reading only its metadata.

    Every stored item named by ``.metadata`` must lie inside its file: a deleted
    shard or a truncated ``.distcp`` is found here, before any rank starts a
    collective load (so every rank reaches the same verdict from the same files).

    Raises:
        CorruptCheckpointError: naming the directory and the first bad file.
    """
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isdir(ckpt_dir):
        raise CorruptCheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    try:
        metadata = FileSystemReader(ckpt_dir).read_metadata()
    except Exception as err:  # a missing, empty or truncated .metadata fails in several ways
        raise CorruptCheckpointError(f"{os.path.join(ckpt_dir, '.metadata')}: unreadable checkpoint metadata "
                                     f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            raise CorruptCheckpointError(f"{path}: missing (named by the checkpoint's .metadata)")
        size = os.path.getsize(path)
        if size < end:
            raise CorruptCheckpointError(f"{path}: truncated ({size} bytes, the checkpoint's .metadata needs {end})")
    common = os.path.join(ckpt_dir, "common.pt")
    if os.path.exists(common):
        try:
            torch.load(common, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CorruptCheckpointError(f"{common}: unreadable ({type(err).__name__})") from None


# The fields that make two checkpoints the same model (dtype and paths may differ).
_ARCHITECTURE_FIELDS = ("arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                        "num_attention_heads", "kv_heads", "kv_channels", "tie_word_embeddings")


def check_megatron_dir(ckpt_dir: str, model_cfg: ModelConfig, field: str = "model.megatron_dir") -> None:
    """Checks before any load that ``ckpt_dir`` is a whole converted checkpoint of ``model_cfg``'s model.

    Raises:
        ConfigError: (``field``) missing directory, not a checkpoint of this project,
            another model's checkpoint (architecture differs from ``model.hf_dir``'s),
            or missing/truncated files.
    """
    from megatron_sdpg.config.errors import ConfigError

    if not os.path.isdir(ckpt_dir):
        raise ConfigError(field, f"{ckpt_dir!r} is not a directory")
    try:
        stored = read_checkpoint_config(ckpt_dir)
        check_checkpoint_files(ckpt_dir)
    except (FileNotFoundError, CorruptCheckpointError) as err:
        raise ConfigError(field, str(err)) from None
    diffs = [f"{name} {getattr(stored, name)} != {getattr(model_cfg, name)}" for name in _ARCHITECTURE_FIELDS
             if getattr(stored, name) != getattr(model_cfg, name)]
    if diffs:
        raise ConfigError(field, f"{ckpt_dir!r} holds another model than model.hf_dir {model_cfg.hf_dir!r} "
                          f"({', '.join(diffs)})")


def read_checkpoint_config(ckpt_dir: str) -> ModelConfig:
    """The :class:`ModelConfig` stored with a checkpoint.

    Raises:
        FileNotFoundError: ``ckpt_dir`` is not a checkpoint written by this project.
        CorruptCheckpointError: the file is not a valid model description.
    """
    path = os.path.join(ckpt_dir, MODEL_CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir!r} has no {MODEL_CONFIG_FILE}: not a megatron_sdpg checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except ValueError as err:  # JSON or UTF-8
        raise CorruptCheckpointError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CorruptCheckpointError(f"{path}: unknown ModelConfig fields {unknown}")
    try:
        raw["rope_scaling"] = RopeScalingConfig(**(raw.get("rope_scaling") or {}))
        return ModelConfig(**raw)
    except TypeError as err:
        raise CorruptCheckpointError(f"{path}: {err}") from None


def load_megatron_checkpoint(chunks: list, ckpt_dir: str) -> None:
    """Loads a ``dist_checkpointing`` checkpoint into this rank's chunks (any TP/PP).

    Raises:
        RuntimeError: from megatron when tensors are missing or misshapen.
    """
    from megatron.core import dist_checkpointing

    from megatron_sdpg.formats.checkpoint_read import direct_load_strategy

    sharded = _sharded_state_dict(chunks)
    _merge_in_place(sharded)
    state = dist_checkpointing.load(sharded, ckpt_dir, sharded_strategy=direct_load_strategy())
    for i, chunk in enumerate(chunks):
        _load_unless_in_place(chunk, state["model" if len(chunks) == 1 else f"model{i}"])


def _merge_in_place(sharded_state_dict: dict) -> None:
    """Makes megatron's split-tensor factories return the parameter itself when loaded in place.

    megatron stores ``linear_fc1`` (gate and up) as two sharded tensors built from
    ``torch.chunk`` views of the parameter; its merge function then ``torch.cat``\ s
    the two loaded halves into a new tensor, which ``load_state_dict`` copies back
    into the parameter: a model-sized half of the load spent allocating and copying.
    When the loaded pieces are exactly the consecutive views of the parameter (the
    checkpoint was read straight into them) the merge returns the parameter, whose
    memory already holds the data; otherwise megatron's own merge runs.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    for factory in nested_values(sharded_state_dict):
        if isinstance(factory, ShardedTensorFactory) and isinstance(factory.data, torch.Tensor):
            factory.merge_fn = _in_place_merge(factory.data, factory.merge_fn)


def _in_place_merge(data: torch.Tensor, merge_fn):
    def merge(pieces):
        if _fill_in_order(pieces, data):
            return data
        return merge_fn(pieces)

    return merge


def _fill_in_order(pieces, data: torch.Tensor) -> bool:
    """Whether ``pieces`` are contiguous views that tile ``data``'s memory in order."""
    if not isinstance(pieces, (list, tuple)) or not data.is_contiguous():
        return False
    ptr = data.data_ptr()
    for t in pieces:
        if not (isinstance(t, torch.Tensor) and t.dtype == data.dtype and t.is_contiguous()
                and t.device == data.device and t.data_ptr() == ptr):
            return False
        ptr += t.numel() * t.element_size()
    return ptr == data.data_ptr() + data.numel() * data.element_size()


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
