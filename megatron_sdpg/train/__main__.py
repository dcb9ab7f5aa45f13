"""Entry point: ``python -m megatron_sdpg.train``."""

import sys

from megatron_sdpg.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
