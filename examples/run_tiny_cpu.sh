#!/usr/bin/env bash
# The embedded CPU default, end to end on a fresh 2-core machine:
#   install -> build + warm-start the tiny model -> convert HF -> Megatron ->
#   SDPG with DP=2 over gloo against the CPU rollout server -> plots.
# The last line of output is one JSON object (accuracy_before, accuracy_after, steps, run_dir, ...).
#
# Environment overrides: RUN_DIR, MODEL_DIR (reused when it exists), NPROC (2), STEPS, SKIP_INSTALL=1,
# extra dotted overrides as arguments, e.g. `bash examples/run_tiny_cpu.sh algorithm.preset=grpo`.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_DIR=${RUN_DIR:-runs/tiny_cpu}
MODEL_DIR=${MODEL_DIR:-artifacts/tiny_model}
NPROC=${NPROC:-2}
STEPS=${STEPS:-120}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
  python3 -m pip install -q -r requirements/cpu.txt -e . >&2
fi

if [[ ! -f "$MODEL_DIR/config.json" ]]; then
  echo "building the tiny model in $MODEL_DIR (warm start on CPU)" >&2
  python3 tools/make_tiny_model.py --out "$MODEL_DIR" --size tiny --template compact >&2
fi

MEGATRON_DIR="$MODEL_DIR.megatron"
if [[ ! -f "$MEGATRON_DIR/megatron_sdpg_model.json" ]]; then
  echo "converting $MODEL_DIR to Megatron (dist_checkpointing) in $MEGATRON_DIR" >&2
  python3 tools/convert_hf_to_megatron.py --hf-dir "$MODEL_DIR" --megatron-dir "$MEGATRON_DIR" --verify >&2
fi

mkdir -p "$RUN_DIR"
OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nproc_per_node="$NPROC" --master_port="${MASTER_PORT:-29517}" \
  -m megatron_sdpg.train --config examples/configs/tiny_cpu.yaml \
  model.hf_dir="$MODEL_DIR" model.megatron_dir="$MEGATRON_DIR" train.run_dir="$RUN_DIR" train.steps="$STEPS" \
  "$@" | tee "$RUN_DIR/summary.line" >&2

python3 -m megatron_sdpg.plot "$RUN_DIR" >&2
tail -n 1 "$RUN_DIR/summary.line"
