"""``python -m megatron_sdpg.train --config FILE.yaml [a.b=c ...]`` (also ``megatron-sdpg-train``).

Usable directly (one process), under ``torchrun`` and under ``srun``. A bad
configuration exits with status 2 and one line naming the field, before any
model is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _world_size_from_env() -> int:
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_sdpg.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 train.steps=5")
    args = parser.parse_args(argv)

    from megatron_sdpg.config import ConfigError, load_config

    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(args.config, args.overrides, world_size=_world_size_from_env())
    except ConfigError as err:
        if rank == 0:
            print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2

    from megatron_sdpg.data.files import BadRowError
    from megatron_sdpg.platform.distributed import init_distributed, init_model_parallel, shutdown
    from megatron_sdpg.train.trainer import Trainer
    from megatron_sdpg.rollout.sync.base import WeightSyncError

    init_distributed()
    trainer = None
    try:
        groups = init_model_parallel(cfg.parallel, seed=cfg.train.seed)
        trainer = Trainer(cfg, groups)
        summary = trainer.run()
    except (ConfigError, BadRowError) as err:
        # Raised alike on every rank (the same config and files): rank 0 says it once, every rank exits 2.
        if rank == 0:
            kind = "config error" if isinstance(err, ConfigError) else "data error"
            print(f"{kind}: {err}", file=sys.stderr, flush=True)
        return 2
    except WeightSyncError as err:
        # Rank 0's alone (it drives the engines); the launcher stops the other ranks when it exits.
        print(f"weight sync error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    if rank == 0:
        print(json.dumps(summary), flush=True)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
