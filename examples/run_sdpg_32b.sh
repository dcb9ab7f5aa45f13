#!/usr/bin/env bash
# SDPG on a Qwen2.5-32B-style model: 2 training nodes (TP 8 x PP 1 x DP 2 = 16 GPUs)
# and 2 dedicated rollout nodes (4 SGLang engines of TP 4); the trainer addresses
# every engine itself (no router).
#
#   sbatch examples/run_sdpg_32b.sh                                  # from the repository root
#   TRAIN_NODES=4 ROLLOUT_NODES=4 sbatch --nodes=8 examples/run_sdpg_32b.sh train.steps=200
#   DRY_RUN=1 bash examples/run_sdpg_32b.sh                          # print every node's commands
#   python -m megatron_sdpg.plan --config examples/configs/sdpg_32b.yaml            # plans this layout (parallel.nodes)
#
# Settings are environment variables (see examples/lib/launch.sh); arguments are trainer overrides.
# TRAIN_NODES, GPUS_PER_NODE, TP, PP and ROLLOUT_TP default to the config's parallel.nodes,
# parallel.gpus_per_node, parallel.tp, parallel.pp and rollout.tp_size (what the planner plans).
#SBATCH --job-name=sdpg-32b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=1-00:00:00
#SBATCH --output=sdpg-32b-%j.out
set -euo pipefail

if [[ -z ${REPO_DIR:-} ]]; then
    if [[ -n ${SLURM_SUBMIT_DIR:-} && -f $SLURM_SUBMIT_DIR/examples/lib/launch.sh ]]; then
        REPO_DIR=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this file: trust the submit directory
    else
        REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi

MODEL_NAME=sdpg-32b
: "${CONFIG:=$REPO_DIR/examples/configs/sdpg_32b.yaml}"
: "${HF_DIR:=/models/Qwen2.5-32B-Instruct}"
: "${ROLLOUT_NODES:=2}"

# shellcheck source=examples/lib/launch.sh
source "$REPO_DIR/examples/lib/launch.sh"
sdpg_main "$@"
