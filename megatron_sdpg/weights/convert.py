"""Offline conversions HF <-> Megatron, shared by the two CLIs in ``tools/``.

Both run on every rank of an initialised process group (torchrun with N ranks,
or one plain process) under a model-parallel layout; each rank holds only its
share of the model. Output goes to ``<out>.incomplete`` and is renamed to
``<out>`` only when everything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_sdpg.models.architecture import ModelConfig, model_config_from_hf, read_hf_config
from megatron_sdpg.models.builder import build_model_chunks
from megatron_sdpg.platform.distributed import ParallelGroups
from megatron_sdpg.weights.checkpoint import (HF_SIDE_DIR, load_megatron_checkpoint, read_checkpoint_config,
                                              save_megatron_checkpoint)
from megatron_sdpg.weights.export_files import write_hf_safetensors
from megatron_sdpg.formats.hf_io import SafetensorsReader, copy_side_files
from megatron_sdpg.weights.hf_source import HFParamSource
from megatron_sdpg.weights.verify import PromptReport, compare_with_hf, format_reports

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class OutputExistsError(FileExistsError):
    """The output directory exists and ``overwrite`` was not asked for."""


@dataclass
class VerifyConfig:
    """Greedy-decode comparison with ``transformers`` after a conversion.

    Attributes:
        prompts: Number of random-token prompts.
        prompt_len: Tokens per prompt.
        new_tokens: Greedy tokens decoded per prompt.
        max_abs_tol: Largest allowed ``|logit_hf - logit_megatron|`` (None: 1e-3).
        kl_tol: Largest allowed per-position KL(HF || Megatron) (None: 1e-6).

    Both models compute in float32 on weights rounded to the precision the
    conversion stored (bf16 when either side is bf16), so the tolerances are fp32
    rounding noise whatever the stored dtype: a mapping error shows up far above
    them, and bf16 compute noise (measured: KL up to 5e-2 on a trained tiny model)
    cannot hide one or fail a correct conversion.
    """

    prompts: int = 3
    prompt_len: int = 8
    new_tokens: int = 8
    max_abs_tol: float | None = None
    kl_tol: float | None = None

    def tolerances(self) -> tuple[float, float]:
        """``(max |dlogit|, max KL)`` allowed."""
        return (self.max_abs_tol if self.max_abs_tol is not None else 1e-3,
                self.kl_tol if self.kl_tol is not None else 1e-6)


# Written into every conversion's output: ``--overwrite`` replaces only a directory that has it
# (or a checkpoint's ``megatron_sdpg_model.json``, written by conversions before the marker existed).
CONVERSION_MARKER = ".megatron_sdpg_conversion"


class ConversionPathError(ValueError):
    """The input and output paths of a conversion overlap, or the output is not a conversion's to replace."""


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (both resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_output_dir(path: str, overwrite: bool, input_dir: str | None = None, output_flag: str = "output",
                     input_flag: str = "input") -> None:
    """Refuses an output that would destroy something the conversion did not create.

    Args:
        path: The output directory.
        overwrite: ``--overwrite`` was given.
        input_dir: The conversion's input, which must neither be, enclose nor lie
            inside the output (or its ``.incomplete`` staging directory).
        output_flag, input_flag: How the two paths are named in messages.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is off.
        ConversionPathError: the paths overlap; ``path`` is a file; or ``overwrite``
            would delete a non-empty directory no conversion wrote.
    """
    out = os.path.realpath(path)
    if input_dir is not None:
        inp = os.path.realpath(input_dir)
        staging = out.rstrip(os.sep) + ".incomplete"
        if _inside(inp, out) or _inside(out, inp) or _inside(inp, staging):
            raise ConversionPathError(f"{output_flag}: {path!r} overlaps the input {input_flag} {input_dir!r} "
                                      "(the same directory, or one inside the other); choose a separate output")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConversionPathError(f"{output_flag}: {path!r} is an existing file, not a directory")
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"output directory {path!r} already exists (pass --overwrite to replace it)")
    if os.path.isdir(path) and os.listdir(path) and not _written_by_conversion(path):
        raise ConversionPathError(f"{output_flag}: {path!r} was not written by a conversion (no {CONVERSION_MARKER}); "
                                  "--overwrite replaces only a previous conversion's output: remove it yourself "
                                  "or choose another directory")


def _written_by_conversion(path: str) -> bool:
    from megatron_sdpg.weights.checkpoint import MODEL_CONFIG_FILE

    return any(os.path.isfile(os.path.join(path, name)) for name in (CONVERSION_MARKER, MODEL_CONFIG_FILE))


def _staging_dir(out_dir: str) -> str:
    """Creates an empty ``<out>.incomplete`` on rank 0; all ranks get its path."""
    staging = os.path.abspath(out_dir).rstrip("/") + ".incomplete"
    if dist.get_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    return staging


def _publish(staging: str, out_dir: str) -> None:
    """Renames the finished staging directory to ``out_dir`` (rank 0), replacing an old one."""
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(staging, CONVERSION_MARKER), "w") as f:
            f.write("written by megatron_sdpg's converters; --overwrite may replace this directory\n")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    dist.barrier()


def hf_model_config(hf_dir: str, dtype: str) -> ModelConfig:
    """The :class:`ModelConfig` of an HF directory in ``dtype`` (validated later for the layout)."""
    return model_config_from_hf(read_hf_config(hf_dir), hf_dir=hf_dir, params_dtype=dtype)


def hf_to_megatron(hf_dir: str, megatron_dir: str, groups: ParallelGroups, dtype: str = "float32",
                   overwrite: bool = False, verify: VerifyConfig | None = None,
                   progress: bool = True) -> list[PromptReport] | None:
    """Converts an HF directory into a ``dist_checkpointing`` checkpoint.

    Args:
        hf_dir: HF model directory (config.json + safetensors).
        megatron_dir: Output directory (must not exist unless ``overwrite``).
        groups: The layout the model is held in while converting (any TP/PP).
        dtype: ``float32`` or ``bfloat16`` for the stored weights.
        overwrite: Replace an existing output directory.
        verify: Compare logits with ``transformers`` after converting.
        progress: tqdm bars on rank 0.

    Returns:
        The verification reports on rank 0 (None without ``verify`` or elsewhere).
    """
    check_output_dir(megatron_dir, overwrite, hf_dir)
    cfg = hf_model_config(hf_dir, dtype)
    cfg.validate("model", tp=groups.layout.tp, pp=groups.layout.pp, vpp=groups.layout.vpp)
    chunks = build_model_chunks(cfg, groups, init_weights=False)
    # The parameters stay unfilled: the save takes each tensor's bytes from the HF files as it writes.
    source = HFParamSource(chunks, cfg, groups, SafetensorsReader(hf_dir), progress=progress and dist.get_rank() == 0)
    staging = _staging_dir(megatron_dir)
    try:
        save_megatron_checkpoint(chunks, cfg, staging, hf_side_dir=hf_dir, values=source)
    finally:
        source.close()
    _publish(staging, megatron_dir)
    return _verify(cfg, groups, hf_dir, megatron_dir, verify)  # what was written, not what was read


def megatron_to_hf(megatron_dir: str, hf_dir: str, groups: ParallelGroups, dtype: str | None = None,
                   overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, verify: VerifyConfig | None = None,
                   progress: bool = True) -> list[PromptReport] | None:
    """Converts a checkpoint written by :func:`hf_to_megatron` (or training) to an HF directory.

    Args:
        megatron_dir: The ``dist_checkpointing`` directory.
        hf_dir: Output HF directory (must not exist unless ``overwrite``).
        groups: The layout the checkpoint is loaded at (any TP/PP).
        dtype: Dtype of the written tensors (default: the checkpoint's).
        overwrite: Replace an existing output directory.
        max_shard_bytes: Size limit of one safetensors shard.
        verify: Compare logits with ``transformers`` after converting.
        progress: tqdm bars on rank 0.

    Returns:
        The verification reports on rank 0 (None without ``verify`` or elsewhere).
    """
    check_output_dir(hf_dir, overwrite, megatron_dir)
    cfg = read_checkpoint_config(megatron_dir)
    cfg.validate("model", tp=groups.layout.tp, pp=groups.layout.pp, vpp=groups.layout.vpp)
    out_dtype = dtype or cfg.params_dtype
    chunks = build_model_chunks(cfg, groups, init_weights=False)
    values = _checkpoint_values(chunks, cfg, groups, megatron_dir)
    if values is None:
        load_megatron_checkpoint(chunks, megatron_dir)
    staging = _staging_dir(hf_dir)
    write_hf_safetensors(chunks, cfg, groups, staging, DTYPES[out_dtype], max_shard_bytes, progress=progress,
                         values=values)
    if dist.get_rank() == 0:
        _write_hf_side_files(os.path.join(megatron_dir, HF_SIDE_DIR), staging, out_dtype)
    _publish(staging, hf_dir)
    return _verify(cfg, groups, hf_dir, megatron_dir, verify)


def _checkpoint_values(chunks: list, cfg: ModelConfig, groups: ParallelGroups, megatron_dir: str):
    """The export's source of parameter data straight from the checkpoint files, or None to load the model.

    Every rank decides alike (one failing rank sends all to the general load), so
    the export's collectives stay matched.
    """
    from megatron_sdpg.weights import mapping_for
    from megatron_sdpg.weights.checkpoint_source import CheckpointParamSource, CheckpointSourceUnavailable

    try:
        source = CheckpointParamSource(chunks, megatron_dir, mapping_for(cfg).exports, groups.layout.tp, groups.tp_rank)
        reason = ""
    except CheckpointSourceUnavailable as err:
        source, reason = None, str(err)
    usable: list = [None] * dist.get_world_size()
    dist.all_gather_object(usable, source is not None)  # any backend (a CPU tensor would not do for NCCL)
    if not all(usable):
        if reason:
            logger.info("reading %s through dist_checkpointing: %s", megatron_dir, reason)
        return None
    return source.full_blocks


def _write_hf_side_files(side_dir: str, out_dir: str, dtype: str) -> None:
    if os.path.isdir(side_dir):
        copy_side_files(side_dir, out_dir)
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint has no {HF_SIDE_DIR}/config.json to write an HF config from")
    with open(path) as f:
        config = json.load(f)
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    if config.get(key) not in (None, dtype):
        config[key] = dtype
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)


def _verify(cfg: ModelConfig, groups: ParallelGroups, hf_dir: str, megatron_dir: str,
            verify: VerifyConfig | None) -> list[PromptReport] | None:
    """Scores ``transformers``' greedy decodes with the checkpoint, both in float32 (see :class:`VerifyConfig`)."""
    if verify is None:
        return None
    reader = SafetensorsReader(hf_dir)
    hf_dtypes = {reader.meta(n).dtype for n in reader}
    narrow = torch.bfloat16 if cfg.params_dtype == "bfloat16" or torch.bfloat16 in hf_dtypes else torch.float32
    chunks = build_model_chunks(dataclasses.replace(cfg, params_dtype="float32"), groups, init_weights=False)
    load_megatron_checkpoint(chunks, megatron_dir)
    _round_to_(chunks, narrow)
    hf_model = None
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        _round_to_([hf_model], narrow)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (verify.prompt_len,), generator=gen) for _ in range(verify.prompts)]
    with torch.no_grad():
        return compare_with_hf(chunks, groups, hf_model, prompts, verify.new_tokens, cfg.vocab_size)


@torch.no_grad()
def _round_to_(modules: list, dtype: torch.dtype) -> None:
    """Rounds every float32 parameter of ``modules`` to ``dtype``'s precision, in place (stays float32)."""
    if dtype == torch.float32:
        return
    for m in modules:
        for p in m.parameters():
            p.copy_(p.to(dtype))


def verification_passed(reports: list[PromptReport], verify: VerifyConfig) -> bool:
    """True when every prompt is within both tolerances."""
    max_abs, kl = verify.tolerances()
    return all(r.max_abs_diff <= max_abs and r.kl_max <= kl for r in reports)


def print_verification(reports: list[PromptReport], verify: VerifyConfig, dtype: str) -> bool:
    """Prints the table and the verdict; returns whether it passed."""
    max_abs, kl = verify.tolerances()
    ok = verification_passed(reports, verify)
    print(format_reports(reports))
    print(f"verify: {'PASS' if ok else 'FAIL'} (tolerances: max|dlogit| <= {max_abs:g}, KL <= {kl:g}; "
          f"stored {dtype}, compared in float32 on weights rounded alike)")
    return ok
