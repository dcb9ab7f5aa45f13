#!/usr/bin/env bash
# Installs the CPU environment and runs the whole test suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements/cpu.txt -e '.[dev]'
exec python3 -m pytest -q -p no:cacheprovider "$@"
