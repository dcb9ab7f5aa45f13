# shellcheck shell=bash
# Shared launch logic of examples/run_sdpg_{8b,32b,70b}.sh (sourced, not executed).
#
# One Slurm job: SGLang engines on dedicated rollout nodes (or colocated on the
# training nodes), an sglang-router in front of them, and the trainer ranks as
# `srun` -> `torchrun` on the training nodes. Every background step is an `srun`
# whose PID this script records; on exit it stops exactly those PIDs (SIGTERM,
# then SIGKILL after STOP_GRACE_S seconds). Slurm forwards the signal to the
# step's processes on their nodes. Nothing is stopped by name.
#
# DRY_RUN=1 needs no Slurm: it invents node names (node001, node002, ...) and
# prints, instead of running them, every command: lines tagged "[batch]" are run
# by this script on the batch host, lines tagged "[<node>]" are what that node
# runs inside its srun step. The tests parse this output.
#
# Settings (environment variables; the run_*.sh scripts set model defaults):
#   CONFIG          training YAML (examples/configs/...)
#   HF_DIR          HF model directory (weights, tokenizer, config.json: the
#                   trainer reads the architecture from it at run time)
#   MEGATRON_DIR    converted checkpoint; converted from HF_DIR when absent
#                   (CONVERT=auto), always (CONVERT=1, replaces an earlier conversion) or never (0)
#   RUN_DIR         outputs; LOG_DIR (default RUN_DIR/logs) gets one folder per node
#   TRAIN_NODES, ROLLOUT_NODES, GPUS_PER_NODE
#   TP, PP          trainer tensor/pipeline parallel sizes; DP, if set, must
#                   equal TRAIN_NODES*GPUS_PER_NODE/(TP*PP)
#   ROLLOUT_TP      tensor-parallel size of each SGLang engine
#   COLOCATE=1      engines on the training nodes' GPUs (ROLLOUT_NODES ignored)
#   MEM_FRACTION    SGLang --mem-fraction-static (default 0.85, colocated 0.35)
#   ENGINE_PORT     first engine port on a node (engine i: ENGINE_PORT+i); ROUTER_PORT;
#   MASTER_PORT     torchrun rendezvous port on the first training node
#   TRAIN_DATA, EVAL_DATA  comma-separated jsonl/parquet files (data.train_files/eval_files)
#   PYTHON          the trainer's interpreter on the nodes (default python)
#   ENGINE_PYTHON   the engines' and router's (default PYTHON; /opt/sglang/bin/python
#                   with CONTAINER_IMAGE: the Dockerfile keeps SGLang in its own venv)
#   CONTAINER_IMAGE, CONTAINER_MOUNTS  run every step in a pyxis/enroot container
#   HEALTH_TIMEOUT_S, STOP_GRACE_S
# Arguments of the run script are passed to the trainer as dotted overrides.

sdpg_fail() {
    echo "error: $*" >&2
    exit 2
}

sdpg_require_int() {  # sdpg_require_int NAME MIN
    local name=$1 min=$2 value=${!1-}
    [[ $value =~ ^[0-9]+$ ]] || sdpg_fail "$name must be an integer, got '${value}'"
    ((value >= min)) || sdpg_fail "$name must be >= $min, got $value"
}

# Prints a command, shell-quoted, tagged with where it runs.
sdpg_show() {  # sdpg_show TAG ARGV...
    local tag=$1
    shift
    local line
    printf -v line ' %q' "$@"
    echo "+ [$tag]$line"
}

sdpg_defaults() {
    : "${DRY_RUN:=0}"
    : "${GPUS_PER_NODE:=8}"
    : "${ROLLOUT_NODES:=0}"
    : "${COLOCATE:=0}"
    : "${ROLLOUT_TP:=1}"
    : "${PP:=1}"
    : "${CONVERT:=auto}"
    : "${ENGINE_PORT:=30000}"
    : "${ROUTER_PORT:=30100}"
    : "${MASTER_PORT:=29500}"
    : "${PYTHON:=python}"
    : "${HEALTH_TIMEOUT_S:=1800}"
    : "${STOP_GRACE_S:=30}"
    : "${CONTAINER_IMAGE:=}"
    : "${CONTAINER_MOUNTS:=}"
    : "${TRAIN_DATA:=}"
    : "${EVAL_DATA:=}"
    : "${DP:=}"
    if [[ -n $CONTAINER_IMAGE ]]; then
        : "${ENGINE_PYTHON:=/opt/sglang/bin/python}"
    else
        : "${ENGINE_PYTHON:=$PYTHON}"
    fi
    JOB_ID=${SLURM_JOB_ID:-dryrun}
    : "${RUN_DIR:=$REPO_DIR/runs/$MODEL_NAME-$JOB_ID}"
    : "${LOG_DIR:=$RUN_DIR/logs}"
    : "${MEGATRON_DIR:=$REPO_DIR/checkpoints/$(basename "$HF_DIR")-megatron}"
    if [[ $COLOCATE == 1 ]]; then
        ROLLOUT_NODES=0
        : "${MEM_FRACTION:=0.35}"
    else
        : "${MEM_FRACTION:=0.85}"
    fi
}

sdpg_validate() {
    [[ -n ${CONFIG:-} ]] || sdpg_fail "CONFIG is not set"
    [[ -f $CONFIG ]] || sdpg_fail "CONFIG: no such file: $CONFIG"
    [[ -n ${HF_DIR:-} ]] || sdpg_fail "HF_DIR is not set"
    [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || sdpg_fail "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
    [[ $COLOCATE == 0 || $COLOCATE == 1 ]] || sdpg_fail "COLOCATE must be 0 or 1, got '$COLOCATE'"
    [[ $CONVERT == auto || $CONVERT == 0 || $CONVERT == 1 ]] || sdpg_fail "CONVERT must be auto, 0 or 1, got '$CONVERT'"
    sdpg_require_int TRAIN_NODES 1
    sdpg_require_int ROLLOUT_NODES 0
    sdpg_require_int GPUS_PER_NODE 1
    sdpg_require_int TP 1
    sdpg_require_int PP 1
    sdpg_require_int ROLLOUT_TP 1
    local port
    for port in ENGINE_PORT ROUTER_PORT MASTER_PORT; do sdpg_require_int "$port" 1; done
    WORLD_SIZE=$((TRAIN_NODES * GPUS_PER_NODE))
    ((WORLD_SIZE % (TP * PP) == 0)) ||
        sdpg_fail "TP*PP=$((TP * PP)) does not divide the $WORLD_SIZE training GPUs ($TRAIN_NODES nodes x $GPUS_PER_NODE)"
    local dp=$((WORLD_SIZE / (TP * PP)))
    if [[ -n $DP ]]; then
        sdpg_require_int DP 1
        ((DP == dp)) || sdpg_fail "DP=$DP but $TRAIN_NODES nodes x $GPUS_PER_NODE GPUs / (TP=$TP x PP=$PP) gives $dp"
    fi
    DP=$dp
    ((GPUS_PER_NODE % ROLLOUT_TP == 0)) || sdpg_fail "ROLLOUT_TP=$ROLLOUT_TP does not divide GPUS_PER_NODE=$GPUS_PER_NODE"
    ((COLOCATE == 1 || ROLLOUT_NODES >= 1)) || sdpg_fail "ROLLOUT_NODES must be >= 1 unless COLOCATE=1"
}

# Fills NODES, TRAIN_HOSTS and ROLLOUT_HOSTS from the allocation (or invents them).
sdpg_resolve_nodes() {
    local needed=$((TRAIN_NODES + ROLLOUT_NODES)) i
    NODES=()
    if [[ $DRY_RUN == 1 ]]; then
        for ((i = 1; i <= needed; i++)); do NODES+=("$(printf 'node%03d' "$i")"); done
    else
        [[ -n ${SLURM_JOB_NODELIST:-} ]] || sdpg_fail "not inside a Slurm job (submit with sbatch, or set DRY_RUN=1)"
        mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    fi
    ((${#NODES[@]} >= needed)) ||
        sdpg_fail "the job has ${#NODES[@]} nodes but TRAIN_NODES=$TRAIN_NODES + ROLLOUT_NODES=$ROLLOUT_NODES = $needed are needed (sbatch --nodes=$needed)"
    TRAIN_HOSTS=("${NODES[@]:0:TRAIN_NODES}")
    if [[ $COLOCATE == 1 ]]; then
        ROLLOUT_HOSTS=("${TRAIN_HOSTS[@]}")
    else
        ROLLOUT_HOSTS=("${NODES[@]:TRAIN_NODES:ROLLOUT_NODES}")
    fi
    MASTER_ADDR=${TRAIN_HOSTS[0]}
}

# The srun prefix of a step on NODELIST (comma-separated) with NTASKS tasks.
sdpg_srun_argv() {  # sdpg_srun_argv NNODES NODELIST OUTPUT
    SRUN_ARGV=(srun --overlap --nodes="$1" --ntasks-per-node=1 --nodelist="$2" --gpus-per-node="$GPUS_PER_NODE"
        --kill-on-bad-exit=1 --output="$3")
    if [[ -n $CONTAINER_IMAGE ]]; then
        SRUN_ARGV+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR")
        [[ -z $CONTAINER_MOUNTS ]] || SRUN_ARGV+=(--container-mounts="$CONTAINER_MOUNTS")
    fi
}

# Runs (or prints) an srun step; with BG=1 in the background, its PID recorded.
sdpg_step() {  # sdpg_step BG NODELIST OUTPUT ARGV...
    local bg=$1 nodelist=$2 output=$3 node
    shift 3
    local -a hosts
    IFS=, read -r -a hosts <<<"$nodelist"
    sdpg_srun_argv "${#hosts[@]}" "$nodelist" "$output"
    if [[ $DRY_RUN == 1 ]]; then
        sdpg_show batch "${SRUN_ARGV[@]}" "$@"
        for node in "${hosts[@]}"; do sdpg_show "$node" "$@"; done
        return 0
    fi
    if [[ $bg == 1 ]]; then
        "${SRUN_ARGV[@]}" "$@" &
        STEP_PIDS+=("$!")
        echo "started pid $! on $nodelist: $* (log $output)"
    else
        "${SRUN_ARGV[@]}" "$@"
    fi
}

sdpg_make_log_dirs() {
    local node
    if [[ $DRY_RUN == 1 ]]; then
        sdpg_show batch mkdir -p "$LOG_DIR/<node>"
        return 0
    fi
    for node in "${NODES[@]}"; do mkdir -p "$LOG_DIR/$node"; done
}

# Converts HF_DIR into MEGATRON_DIR on the first training node when needed.
sdpg_convert() {
    local marker=$MEGATRON_DIR/megatron_sdpg_model.json
    local -a argv=(torchrun --nnodes=1 --nproc-per-node="$GPUS_PER_NODE" tools/convert_hf_to_megatron.py
        --hf-dir "$HF_DIR" --megatron-dir "$MEGATRON_DIR" --dtype bfloat16 --tp "$GPUS_PER_NODE" --no-progress)
    case $CONVERT in
        0) return 0 ;;
        1) argv+=(--overwrite) ;;
        auto)
            if [[ -f $marker ]]; then
                echo "# weights: using the converted checkpoint $MEGATRON_DIR"
                return 0
            fi
            [[ ! -e $MEGATRON_DIR ]] ||
                sdpg_fail "MEGATRON_DIR=$MEGATRON_DIR exists but has no megatron_sdpg_model.json (not a converted checkpoint; the converter replaces only its own output: remove it or choose another MEGATRON_DIR)"
            ;;
    esac
    echo "# weights: converting $HF_DIR -> $MEGATRON_DIR"
    sdpg_step 0 "${TRAIN_HOSTS[0]}" "$LOG_DIR/${TRAIN_HOSTS[0]}/convert.log" "${argv[@]}"
}

# Starts GPUS_PER_NODE/ROLLOUT_TP engines per rollout node; fills ENGINE_URLS.
sdpg_start_engines() {
    local per_node=$((GPUS_PER_NODE / ROLLOUT_TP)) node i port
    ENGINE_URLS=()
    for node in "${ROLLOUT_HOSTS[@]}"; do
        for ((i = 0; i < per_node; i++)); do
            port=$((ENGINE_PORT + i))
            local -a argv=("$ENGINE_PYTHON" -m sglang.launch_server --model-path "$HF_DIR" --host 0.0.0.0 --port "$port"
                --tp-size "$ROLLOUT_TP" --base-gpu-id $((i * ROLLOUT_TP)) --mem-fraction-static "$MEM_FRACTION")
            [[ $COLOCATE == 0 ]] || argv+=(--enable-memory-saver)
            sdpg_step 1 "$node" "$LOG_DIR/$node/engine${i}_port$port.log" "${argv[@]}"
            ENGINE_URLS+=("http://$node:$port")
        done
    done
}

# Polls /health of every URL until each answers or HEALTH_TIMEOUT_S passes.
sdpg_wait_healthy() {  # sdpg_wait_healthy URL...
    local url deadline=$((SECONDS + HEALTH_TIMEOUT_S)) pid
    for url in "$@"; do
        if [[ $DRY_RUN == 1 ]]; then
            sdpg_show batch curl --silent --fail --max-time 5 "$url/health"
            continue
        fi
        until curl --silent --fail --max-time 5 "$url/health" >/dev/null; do
            for pid in "${STEP_PIDS[@]}"; do
                kill -0 "$pid" 2>/dev/null || sdpg_fail "step pid $pid exited while waiting for $url (see $LOG_DIR)"
            done
            ((SECONDS < deadline)) || sdpg_fail "$url not healthy after ${HEALTH_TIMEOUT_S}s (see $LOG_DIR)"
            sleep 10
        done
        echo "healthy: $url"
    done
}

sdpg_start_router() {
    local node=${ROLLOUT_HOSTS[0]}
    ROUTER_URL=http://$node:$ROUTER_PORT
    sdpg_step 1 "$node" "$LOG_DIR/$node/router.log" \
        "$ENGINE_PYTHON" -m sglang_router.launch_router --worker-urls "${ENGINE_URLS[@]}" --host 0.0.0.0 --port "$ROUTER_PORT"
}

sdpg_run_trainer() {
    local nodelist urls
    nodelist=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
    urls=$(IFS=,; echo "${ENGINE_URLS[*]}")
    # The trainer addresses every engine itself: the distributed weight sync joins each
    # engine's ranks to one NCCL group, which a router cannot stand in for.
    local -a overrides=(
        "parallel.tp=$TP" "parallel.pp=$PP"
        "model.hf_dir=$HF_DIR" "model.megatron_dir=$MEGATRON_DIR"
        "rollout.engine=sglang" "rollout.urls=[$urls]" "rollout.tp_size=$ROLLOUT_TP"
        "train.run_dir=$RUN_DIR"
    )
    [[ -z $TRAIN_DATA ]] || overrides+=("data.train_files=[$TRAIN_DATA]")
    [[ -z $EVAL_DATA ]] || overrides+=("data.eval_files=[$EVAL_DATA]")
    sdpg_step 0 "$nodelist" "$LOG_DIR/%N/trainer.log" \
        torchrun --nnodes="$TRAIN_NODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID" \
        -m megatron_sdpg.train --config "$CONFIG" "${overrides[@]}" "$@"
}

# Stops the recorded steps by PID, newest first: SIGTERM, SIGKILL after the grace period.
sdpg_stop_steps() {
    local i pid deadline
    for ((i = ${#STEP_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STEP_PIDS[i]}
        kill -0 "$pid" 2>/dev/null || continue
        echo "stopping pid $pid"
        kill -TERM "$pid" 2>/dev/null || true
        deadline=$((SECONDS + STOP_GRACE_S))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    done
    STEP_PIDS=()
}

sdpg_summary() {
    echo "# job $JOB_ID: $MODEL_NAME, config $CONFIG"
    echo "# train: ${TRAIN_HOSTS[*]} ($TRAIN_NODES nodes x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks): tp $TP pp $PP dp $DP"
    echo "# rollout: ${ROLLOUT_HOSTS[*]} ($([[ $COLOCATE == 1 ]] && echo colocated || echo dedicated)), engines of tp $ROLLOUT_TP, mem fraction $MEM_FRACTION"
    echo "# logs: $LOG_DIR/<node>/"
}

# The whole job. Arguments are extra trainer overrides.
sdpg_main() {
    sdpg_defaults
    sdpg_validate
    sdpg_resolve_nodes
    STEP_PIDS=()
    trap sdpg_stop_steps EXIT
    trap 'exit 143' TERM INT
    export CUDA_DEVICE_MAX_CONNECTIONS=1 WANDB_MODE=${WANDB_MODE:-offline}
    sdpg_summary
    cd "$REPO_DIR" || sdpg_fail "cannot enter REPO_DIR=$REPO_DIR"
    [[ $DRY_RUN == 1 ]] || mkdir -p "$RUN_DIR"
    sdpg_make_log_dirs
    sdpg_convert
    sdpg_start_engines
    sdpg_wait_healthy "${ENGINE_URLS[@]}"
    sdpg_start_router
    sdpg_wait_healthy "$ROUTER_URL"
    echo "# router: $ROUTER_URL"
    sdpg_run_trainer "$@"
}
