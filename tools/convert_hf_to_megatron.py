"""Converts an HF Llama / Qwen2 / Qwen3 directory into a Megatron dist_checkpointing checkpoint.

The checkpoint loads at any TP/PP (megatron resharding); the layout below is only how the
model is held while converting, so each rank holds its share of a large model.

Usage:
    python tools/convert_hf_to_megatron.py --hf-dir HF --megatron-dir OUT [--dtype bfloat16] [--verify]
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py --hf-dir HF --megatron-dir OUT --tp 2 --pp 2
"""

from __future__ import annotations

import argparse
import sys

from megatron_sdpg.weights.cli import add_common_args, run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    parser.add_argument("--megatron-dir", required=True, help="output checkpoint directory")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored weight dtype")
    add_common_args(parser)
    args = parser.parse_args(argv)

    def convert(groups, verify):
        from megatron_sdpg.weights.convert import hf_to_megatron

        return hf_to_megatron(args.hf_dir, args.megatron_dir, groups, dtype=args.dtype, overwrite=args.overwrite,
                              verify=verify, progress=not args.no_progress)

    def precheck() -> None:
        from megatron_sdpg.weights.convert import hf_model_config
        from megatron_sdpg.formats.hf_io import SafetensorsReader

        hf_model_config(args.hf_dir, args.dtype).validate("model", tp=args.tp)
        reader = SafetensorsReader(args.hf_dir)  # a malformed index or a truncated file fails here, in one line
        for name in reader:
            reader.meta(name)

    return run_cli(args, args.megatron_dir, precheck, convert, lambda: args.dtype, in_dir=args.hf_dir,
                   out_flag="--megatron-dir", in_flag="--hf-dir")


if __name__ == "__main__":
    sys.exit(main())
