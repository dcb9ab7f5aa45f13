"""HF checkpoint files: a lazy safetensors reader and a sharded safetensors writer.

The reader reads a tensor only when it is asked for, so a rank that needs a few
tensors reads only those; a tensor is a copy-on-write view of its pages in the
file (no copy), mapped on demand and unmapped once the tensor is dropped, so no
file pages stay mapped (and resident) after use. The writer collects tensors into
shards of at most ``max_shard_bytes`` and writes ``model.safetensors.index.json``
the way ``transformers`` does (the streaming, pre-planned writer the converters
use is :mod:`megatron_sdpg.formats.safetensors_format`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping

import torch
from safetensors.torch import save_file

from megatron_sdpg.formats.safetensors_format import TensorEntry, read_header, tensor_view

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Everything besides weights that an HF model directory carries across a conversion.
HF_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)


class CorruptCheckpointError(ValueError):
    """A checkpoint's (HF or Megatron) files are missing, truncated or unreadable; the message names the file."""


class SafetensorsReader(Mapping):
    """A read-only ``{name: tensor}`` view of an HF directory's safetensors files.

    Args:
        hf_dir: Directory with ``model.safetensors`` or a sharded set plus
            ``model.safetensors.index.json``.

    Raises:
        FileNotFoundError: no safetensors weights in ``hf_dir``.
        CorruptCheckpointError: a malformed index or a truncated/malformed safetensors header.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._headers: dict[str, tuple[int, dict[str, TensorEntry]]] = {}
        index = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    self.weight_map: dict[str, str] = dict(json.load(f)["weight_map"])
            except (ValueError, KeyError, TypeError) as err:
                raise CorruptCheckpointError(f"{index}: malformed safetensors index ({type(err).__name__}: "
                                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
        elif os.path.isfile(os.path.join(hf_dir, SINGLE_FILE)):
            self.weight_map = {k: SINGLE_FILE for k in self._header(SINGLE_FILE)[1]}
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir!r}")

    def _header(self, file_name: str) -> tuple[int, dict[str, TensorEntry]]:
        if file_name not in self._headers:
            path = os.path.join(self.hf_dir, file_name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path!r} is named by {INDEX_FILE} but does not exist")
            try:
                self._headers[file_name] = read_header(path)
            except ValueError as err:  # names the file (and tensor)
                raise CorruptCheckpointError(str(err)) from None
        return self._headers[file_name]

    def _entry(self, name: str) -> tuple[str, int, TensorEntry]:
        """``(file name, data section offset, entry)`` of tensor ``name`` (headers only)."""
        if name not in self.weight_map:
            raise KeyError(name)
        file_name = self.weight_map[name]
        start, entries = self._header(file_name)
        if name not in entries:
            raise KeyError(f"tensor {name!r} is mapped to {file_name} by {INDEX_FILE} but is not in that file")
        return file_name, start, entries[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        file_name, start, entry = self._entry(name)
        return tensor_view(os.path.join(self.hf_dir, file_name), start, entry)

    def meta(self, name: str) -> torch.Tensor:
        """A ``meta`` tensor of ``name``'s shape and dtype (reads the header only)."""
        entry = self._entry(name)[2]
        return torch.empty(entry.shape, dtype=entry.dtype, device="meta")

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __len__(self) -> int:
        return len(self.weight_map)


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards plus the index.

    Args:
        out_dir: An existing directory.
        max_shard_bytes: A shard is closed before it would exceed this size (a
            single larger tensor gets a shard of its own).
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queues one tensor (moved to CPU); writes a shard when the current one is full."""
        if name in self._pending or any(name in s for s in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp_name = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, os.path.join(self.out_dir, tmp_name), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Writes the last shard, names the shards ``-of-n`` and writes the index.

        Returns:
            The shard file names.
        """
        self._flush()
        n = len(self._shards)
        names, weight_map = [], {}
        for i, tensors in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, f"shard-{i:05d}.tmp"), os.path.join(self.out_dir, final))
            names.append(final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
        return names


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Copies config, tokenizer and generation-config files that exist in ``src_dir``."""
    copied = []
    for name in HF_SIDE_FILES:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copy2(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
