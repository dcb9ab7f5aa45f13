"""CPU rollout server: SGLang's HTTP API in front of a ``transformers`` model. NOT for production.

Usage::

    python -m megatron_sdpg.rollout.server --hf-dir runs/tiny_llama --port 30000
    curl -s localhost:30000/generate -d '{"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 8}}'

It binds to 127.0.0.1 unless ``--host`` says otherwise. Sampling is
reproducible per sample with ``sampling_seed``; unseeded samples draw their
seeds from ``--seed`` in arrival order. The decode step runs on ``--threads``
cores (default: all this process may use).
"""

from __future__ import annotations

import argparse
import os
import sys


from megatron_sdpg.rollout.server.openmp import OMP_WAIT_ENV, apply_omp_wait


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_sdpg.rollout.server", description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--seed", type=int, default=0, help="seeds the seeds of unseeded samples")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads of the decode step (0: every core this process may run on, "
                        "whatever OMP_NUM_THREADS it inherited)")
    p.add_argument("--max-batch", type=int, default=256, help="most samples decoded together")
    p.add_argument("--omp-wait", default="spin", choices=sorted(OMP_WAIT_ENV),
                   help="how idle OpenMP threads of the decode step wait: spin (about 0.1 ms, then sleep; the "
                        "default, for a server that has the cores while it decodes) or passive (sleep at once: "
                        "when other processes compete for the cores, e.g. generation overlapping training); "
                        "OMP_WAIT_POLICY / GOMP_SPINCOUNT in the environment win")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="before a batch starts, wait this long after the last /generate arrived for more "
                        "(0: start at once); a trainer's groups arrive as separate requests")
    p.add_argument("--max-body-mb", type=int, default=4096, help="largest accepted request body")
    p.add_argument("--max-n", type=int, default=1024, help="largest sampling_params.n of a request")
    p.add_argument("--max-new-tokens", type=int, default=32768, help="largest sampling_params.max_new_tokens")
    p.add_argument("--max-queued-tokens", type=int, default=1 << 22,
                   help="most prompt + max_new_tokens tokens queued or running at once")
    p.add_argument("--health-timeout-s", type=float, default=20.0, help="how long /health_generate waits")
    p.add_argument("--weight-group-timeout-s", type=float, default=120.0,
                   help="bound on joining a weight-update group and on each of its broadcasts")
    p.add_argument("--weight-version", default="default")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads < 0:
        print(f"--threads: must be >= 0, got {args.threads}", file=sys.stderr)
        sys.exit(2)
    for flag in ("max_n", "max_new_tokens", "max_queued_tokens", "max_batch", "health_timeout_s", "weight_group_timeout_s"):
        if not getattr(args, flag) > 0:  # (also false for NaN)
            print(f"--{flag.replace('_', '-')}: must be > 0, got {getattr(args, flag)}", file=sys.stderr)
            sys.exit(2)
    if not args.batch_wait_ms >= 0:  # (also false for NaN)
        print(f"--batch-wait-ms: must be >= 0, got {args.batch_wait_ms}", file=sys.stderr)
        sys.exit(2)
    if not os.path.isfile(os.path.join(args.hf_dir, "config.json")):
        sys.exit(f"--hf-dir: {args.hf_dir} has no config.json")
    apply_omp_wait(args.omp_wait)  # before torch loads libgomp (rollout/server/openmp.py)
    import torch
    from aiohttp import web
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sdpg.rollout.server.app import ServerState, build_app
    from megatron_sdpg.rollout.server.requests import Limits

    # The trainer launches this server with OMP_NUM_THREADS=1 (torchrun's default for its ranks); the ranks
    # wait while it generates, so by default it takes every core it may run on.
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=getattr(torch, args.dtype)).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
    except (OSError, ValueError):
        tokenizer = None  # input_ids only; responses carry "text": null
    state = ServerState(model, tokenizer, args.hf_dir, seed=args.seed, max_batch=args.max_batch,
                        limits=Limits(max_n=args.max_n, max_new_tokens=args.max_new_tokens),
                        max_queued_tokens=args.max_queued_tokens, weight_group_timeout_s=args.weight_group_timeout_s,
                        batch_wait_s=args.batch_wait_ms / 1000.0)
    state.weight_version = args.weight_version
    app = build_app(state, max_body_bytes=args.max_body_mb * 2**20, health_timeout_s=args.health_timeout_s)
    print(f"cpu rollout server (not for production) on http://{args.host}:{args.port} pid {os.getpid()}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
