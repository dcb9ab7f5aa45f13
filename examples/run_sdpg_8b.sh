#!/usr/bin/env bash
# SDPG on a Llama-3.1-8B-style model on one node: the trainer (TP 4 x DP 2 on 8 GPUs) with
# eight colocated SGLang engines (TP 1, --mem-fraction-static 0.35);
# the trainer addresses every engine itself (no router).
#
#   sbatch examples/run_sdpg_8b.sh                                   # from the repository root
#   TP=2 sbatch examples/run_sdpg_8b.sh train.steps=50
#   COLOCATE=0 TRAIN_NODES=1 ROLLOUT_NODES=1 sbatch --nodes=2 examples/run_sdpg_8b.sh   # dedicated rollout node
#   DRY_RUN=1 bash examples/run_sdpg_8b.sh                           # print every node's commands
#   python -m megatron_sdpg.plan --config examples/configs/sdpg_8b.yaml            # plans this layout (parallel.nodes)
#
# Settings are environment variables (see examples/lib/launch.sh); arguments are trainer overrides.
# TRAIN_NODES, GPUS_PER_NODE, TP, PP and ROLLOUT_TP default to the config's parallel.nodes,
# parallel.gpus_per_node, parallel.tp, parallel.pp and rollout.tp_size (what the planner plans).
#SBATCH --job-name=sdpg-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=1-00:00:00
#SBATCH --output=sdpg-8b-%j.out
set -euo pipefail

if [[ -z ${REPO_DIR:-} ]]; then
    if [[ -n ${SLURM_SUBMIT_DIR:-} && -f $SLURM_SUBMIT_DIR/examples/lib/launch.sh ]]; then
        REPO_DIR=$SLURM_SUBMIT_DIR  # sbatch runs a copy of this file: trust the submit directory
    else
        REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi

MODEL_NAME=sdpg-8b
: "${CONFIG:=$REPO_DIR/examples/configs/sdpg_8b.yaml}"
: "${HF_DIR:=/models/Llama-3.1-8B-Instruct}"
: "${COLOCATE:=1}"

# shellcheck source=examples/lib/launch.sh
source "$REPO_DIR/examples/lib/launch.sh"
sdpg_main "$@"
