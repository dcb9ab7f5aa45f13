"""What the two converter CLIs share: layout and verify flags, start-up, one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from megatron_sdpg.config.errors import ConfigError
from megatron_sdpg.weights.convert import (ConversionPathError, OutputExistsError, VerifyConfig, check_output_dir,
                                           print_verification)
from megatron_sdpg.formats.hf_io import CorruptCheckpointError
from megatron_sdpg.weights.mapping_base import WeightMappingError

# Errors the user can fix; printed as one line with exit status 2 (others keep their traceback).
USER_ERRORS = (ConfigError, WeightMappingError, OutputExistsError, FileNotFoundError, ConversionPathError,
               CorruptCheckpointError, NotADirectoryError)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size used while converting")
    parser.add_argument("--pp", type=int, default=None,
                        help="pipeline-parallel size used while converting (default: world size / tp)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--verify", action="store_true",
                        help="greedy-decode prompts and compare logits with transformers; exit 1 above tolerance")
    parser.add_argument("--verify-prompts", type=int, default=3)
    parser.add_argument("--verify-tokens", type=int, default=8, help="greedy tokens per prompt")
    parser.add_argument("--max-abs-tol", type=float, default=None, help="default 1e-3 (fp32 compute on both sides, any stored dtype)")
    parser.add_argument("--kl-tol", type=float, default=None, help="default 1e-6 (fp32 compute on both sides, any stored dtype)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_cli(args: argparse.Namespace, out_dir: str, precheck: Callable[[], None], convert: Callable,
            dtype_of: Callable[[], str], in_dir: str | None = None, out_flag: str = "output",
            in_flag: str = "input") -> int:
    """Checks the inputs, starts distributed, runs ``convert(groups, verify_cfg)``, prints the verdict.

    ``precheck`` validates what can be validated without processes (config,
    architecture, TP against the heads, the input files) so bad input fails fast.
    ``in_dir`` is the input, which the output may neither be, enclose nor lie in
    (``out_flag``/``in_flag`` name the two in messages).

    Returns:
        0 on success, 1 when verification fails, 2 for a user error (printed as one line).
    """
    import torch.distributed as dist

    from megatron_sdpg.platform.distributed import init_distributed, init_model_parallel, shutdown
    from megatron_sdpg.platform.layout import ParallelConfig

    verify = None
    if args.verify:
        verify = VerifyConfig(prompts=args.verify_prompts, new_tokens=args.verify_tokens,
                              max_abs_tol=args.max_abs_tol, kl_tol=args.kl_tol)
    started = False
    try:
        for flag in ("tp", "pp"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ConfigError(f"--{flag}", f"must be >= 1, got {value}")
        check_output_dir(out_dir, args.overwrite, in_dir, out_flag, in_flag)
        precheck()
        _, world = init_distributed()
        started = True
        pp = args.pp if args.pp is not None else max(world // max(args.tp, 1), 1)
        groups = init_model_parallel(ParallelConfig(tp=args.tp, pp=pp, use_distributed_optimizer=False), seed=0)
        reports = convert(groups, verify)
    except USER_ERRORS as err:
        # Checks before the processes start are the same on every rank: rank 0 says it once.
        if started or os.environ.get("RANK", "0") == "0":
            print(f"error: {err}", file=sys.stderr)
        if dist.is_initialized():
            shutdown()
        return 2
    code = 0
    if reports is not None:
        code = 0 if print_verification(reports, verify, dtype_of()) else 1
    if verify is not None:
        # Every rank leaves with rank 0's verdict.
        import torch

        box = torch.tensor([code])
        dist.broadcast(box, src=0)
        code = int(box.item())
    shutdown()
    return code
