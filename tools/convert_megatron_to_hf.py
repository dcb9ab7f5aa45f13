"""Converts a Megatron dist_checkpointing checkpoint (from this project) back to an HF directory.

Writes sharded safetensors with model.safetensors.index.json plus the config, tokenizer and
generation config stored with the checkpoint; the result loads with
``transformers.AutoModelForCausalLM.from_pretrained``.

Usage:
    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --hf-dir OUT [--dtype bfloat16] [--verify]
    torchrun --nproc-per-node 2 tools/convert_megatron_to_hf.py --megatron-dir CKPT --hf-dir OUT --pp 2
"""

from __future__ import annotations

import argparse
import sys

from megatron_sdpg.weights.cli import add_common_args, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megatron-dir", required=True, help="checkpoint written by convert_hf_to_megatron")
    parser.add_argument("--hf-dir", required=True, help="output HF directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the written tensors (default: the checkpoint's)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="size limit of one safetensors shard")
    add_common_args(parser)
    args = parser.parse_args(argv)

    def convert(groups, verify):
        from megatron_sdpg.weights.convert import megatron_to_hf

        return megatron_to_hf(args.megatron_dir, args.hf_dir, groups, dtype=args.dtype, overwrite=args.overwrite,
                              max_shard_bytes=int(args.max_shard_gb * 2**30), verify=verify,
                              progress=not args.no_progress)

    def dtype_of() -> str:
        from megatron_sdpg.weights.checkpoint import read_checkpoint_config

        return args.dtype or read_checkpoint_config(args.megatron_dir).params_dtype

    def precheck() -> None:
        from megatron_sdpg.weights.checkpoint import check_checkpoint_files, read_checkpoint_config

        read_checkpoint_config(args.megatron_dir).validate("model", tp=args.tp)
        check_checkpoint_files(args.megatron_dir)  # a deleted shard or a truncated .distcp fails here, in one line

    return run_cli(args, args.hf_dir, precheck, convert, dtype_of, in_dir=args.megatron_dir,
                   out_flag="--hf-dir", in_flag="--megatron-dir")


if __name__ == "__main__":
    sys.exit(main())
