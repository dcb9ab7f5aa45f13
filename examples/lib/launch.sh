# shellcheck shell=bash
# Shared launch logic of examples/run_sdpg_{8b,32b,70b}.sh (sourced, not executed).
#
# One Slurm job: rollout engines (SGLang, or with ENGINE=cpu the project's CPU
# server) on dedicated rollout nodes (or colocated on the training nodes), and the
# trainer ranks as `srun` -> `torchrun` on the training nodes. The trainer addresses
# every engine itself (no router: the distributed weight sync joins each engine's
# ranks to one group, which a router cannot stand in for). Every background step is an `srun`
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
#   TRAIN_NODES, GPUS_PER_NODE   default: the config's parallel.nodes and
#                   parallel.gpus_per_node (the layout the planner plans). Without
#                   GPUs, GPUS_PER_NODE is the trainer ranks per node (gloo).
#   ROLLOUT_NODES
#   TP, PP          trainer tensor/pipeline parallel sizes (default: the config's
#                   parallel.tp/pp); DP, if set, must equal TRAIN_NODES*GPUS_PER_NODE/(TP*PP)
#   ROLLOUT_TP      tensor-parallel size of each engine (default: rollout.tp_size)
#   ENGINE          sglang (default) or cpu: `python -m megatron_sdpg.rollout.server`,
#                   for trying the cluster path without GPUs (tools/local_cluster.sh)
#   COLOCATE=1      engines on the training nodes' GPUs (ROLLOUT_NODES ignored); they get
#                   --enable-memory-saver and the trainer rollout.colocate=true (release/resume
#                   around the passes); an NCCL `distributed` sync switches to the CUDA-IPC
#                   tensor path on one training node and is refused on several
#   DETERMINISTIC=1 engines get --enable-deterministic-inference and the trainer
#                   rollout.deterministic=true: SGLang honours sampling seeds only with it
#   MEM_FRACTION    SGLang --mem-fraction-static (default 0.85, colocated 0.35)
#   ENGINE_PORT     first engine port on a node (engine i: ENGINE_PORT+i)
#   MASTER_PORT     torchrun rendezvous port on the first training node
#   SYNC_PORT       port of the distributed weight sync's group on the node of trainer
#                   rank 0 (default 0: rank 0 picks a free one); its address is that
#                   node's Slurm name (rollout.sync_master_address)
#   CPUS_PER_TASK   CPUs each srun step asks for per node (default: SLURM_CPUS_ON_NODE)
#   TRAIN_DATA, EVAL_DATA  comma-separated jsonl/parquet files (data.train_files/eval_files)
#   PYTHON          the trainer's interpreter on the nodes (default python)
#   ENGINE_PYTHON   the engines' and router's (default PYTHON: the Dockerfile's image has one
#                   Python, one torch and one NCCL for trainer and engines)
#   CONTAINER_IMAGE, CONTAINER_MOUNTS  run every step in a pyxis/enroot container
#   HEALTH_TIMEOUT_S, HEALTH_POLL_S, STOP_GRACE_S
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

# Prints the value of SECTION.KEY in a YAML file written as the example configs are:
# `section:` at column 0, `  key: value` two spaces in (no Python needed on the batch host).
sdpg_yaml_value() {  # sdpg_yaml_value FILE SECTION.KEY
    awk -v section="${2%%.*}" -v key="${2#*.}" '
        /^[^ #][^:]*:/ { current = $0; sub(/:.*/, "", current); next }
        current == section && $0 ~ "^  " key ":" {
            value = $0; sub(/^[^:]*:[ \t]*/, "", value); sub(/[ \t]*#.*$/, "", value)
            gsub(/^["\047]|["\047]$/, "", value)
            print value; exit
        }' "$1"
}

# Layout defaults from the config (what the planner reads), where the environment sets none.
sdpg_config_defaults() {
    [[ -n ${CONFIG:-} ]] || sdpg_fail "CONFIG is not set"
    [[ -f $CONFIG ]] || sdpg_fail "CONFIG: no such file: $CONFIG"
    local value
    if [[ -z ${TRAIN_NODES:-} ]]; then
        value=$(sdpg_yaml_value "$CONFIG" parallel.nodes)
        [[ -n $value && $value != 0 ]] || sdpg_fail "TRAIN_NODES is not set and $CONFIG has no parallel.nodes"
        TRAIN_NODES=$value
    fi
    [[ -n ${GPUS_PER_NODE:-} ]] || GPUS_PER_NODE=$(sdpg_yaml_value "$CONFIG" parallel.gpus_per_node)
    [[ -n ${TP:-} ]] || TP=$(sdpg_yaml_value "$CONFIG" parallel.tp)
    [[ -n ${PP:-} ]] || PP=$(sdpg_yaml_value "$CONFIG" parallel.pp)
    [[ -n ${ROLLOUT_TP:-} ]] || ROLLOUT_TP=$(sdpg_yaml_value "$CONFIG" rollout.tp_size)
    CONFIG_SYNC_STRATEGY=$(sdpg_yaml_value "$CONFIG" rollout.sync_strategy)
    : "${GPUS_PER_NODE:=8}" "${TP:=1}" "${PP:=1}" "${ROLLOUT_TP:=1}" "${CONFIG_SYNC_STRATEGY:=disk}"
}

sdpg_defaults() {
    : "${DRY_RUN:=0}"
    sdpg_config_defaults
    : "${ROLLOUT_NODES:=0}"
    : "${COLOCATE:=0}"
    : "${DETERMINISTIC:=0}"
    : "${ENGINE:=sglang}"
    : "${CONVERT:=auto}"
    : "${ENGINE_PORT:=30000}"
    : "${MASTER_PORT:=29500}"
    : "${SYNC_PORT:=0}"
    : "${CPUS_PER_TASK:=${SLURM_CPUS_ON_NODE:-1}}"
    : "${PYTHON:=python}"
    : "${HEALTH_TIMEOUT_S:=1800}"
    : "${HEALTH_POLL_S:=10}"
    : "${STOP_GRACE_S:=30}"
    : "${CONTAINER_IMAGE:=}"
    : "${CONTAINER_MOUNTS:=}"
    : "${TRAIN_DATA:=}"
    : "${EVAL_DATA:=}"
    : "${DP:=}"
    : "${ENGINE_PYTHON:=$PYTHON}"
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
    [[ -n ${HF_DIR:-} ]] || sdpg_fail "HF_DIR is not set"
    [[ $DRY_RUN == 0 || $DRY_RUN == 1 ]] || sdpg_fail "DRY_RUN must be 0 or 1, got '$DRY_RUN'"
    [[ $COLOCATE == 0 || $COLOCATE == 1 ]] || sdpg_fail "COLOCATE must be 0 or 1, got '$COLOCATE'"
    [[ $DETERMINISTIC == 0 || $DETERMINISTIC == 1 ]] || sdpg_fail "DETERMINISTIC must be 0 or 1, got '$DETERMINISTIC'"
    [[ $CONVERT == auto || $CONVERT == 0 || $CONVERT == 1 ]] || sdpg_fail "CONVERT must be auto, 0 or 1, got '$CONVERT'"
    [[ $ENGINE == sglang || $ENGINE == cpu ]] || sdpg_fail "ENGINE must be sglang or cpu, got '$ENGINE'"
    sdpg_require_int TRAIN_NODES 1
    sdpg_require_int ROLLOUT_NODES 0
    sdpg_require_int GPUS_PER_NODE 1
    sdpg_require_int TP 1
    sdpg_require_int PP 1
    sdpg_require_int ROLLOUT_TP 1
    sdpg_require_int CPUS_PER_TASK 1
    sdpg_require_int HEALTH_POLL_S 1
    sdpg_require_int SYNC_PORT 0
    local port
    for port in ENGINE_PORT MASTER_PORT; do sdpg_require_int "$port" 1; done
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
    [[ $ENGINE == sglang || $ROLLOUT_TP == 1 ]] || sdpg_fail "ROLLOUT_TP must be 1 with ENGINE=cpu, got $ROLLOUT_TP"
}

# The weight-sync strategy the trainer will run (the last rollout.sync_strategy= override, else
# the config's). Colocated SGLang engines share GPUs with trainer ranks, and NCCL refuses two ranks
# of one group on one GPU: on one training node the sync switches to the CUDA-IPC tensor path;
# across several it cannot reach the engines of the other nodes that way, and the job stops here.
sdpg_sync_strategy() {  # sdpg_sync_strategy TRAINER_ARGS...
    local arg
    SYNC_STRATEGY=$CONFIG_SYNC_STRATEGY
    SYNC_OVERRIDE=()
    for arg in "$@"; do
        [[ $arg != rollout.sync_strategy=* ]] || SYNC_STRATEGY=${arg#rollout.sync_strategy=}
    done
    if [[ $COLOCATE == 1 && $ENGINE == sglang && $SYNC_STRATEGY == distributed ]]; then
        ((TRAIN_NODES == 1)) ||
            sdpg_fail "rollout.sync_strategy=distributed cannot reach colocated engines over NCCL (each shares a GPU with a trainer rank) on $TRAIN_NODES nodes; set rollout.sync_strategy=disk (or tensor with TRAIN_NODES=1)"
        SYNC_STRATEGY=tensor
        SYNC_OVERRIDE=(rollout.sync_strategy=tensor)
        echo "# weight sync: colocated engines: rollout.sync_strategy=tensor (CUDA-IPC handles) instead of distributed over NCCL"
    fi
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
    # --ntasks explicitly: inside the job, srun would take SLURM_NTASKS (the whole allocation's) as its -n.
    SRUN_ARGV=(srun --overlap --nodes="$1" --ntasks="$1" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --nodelist="$2"
        --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 --output="$3")
    if [[ -n $CONTAINER_IMAGE ]]; then
        # The repository (code, configs) and the run directory (outputs, logs) at the same paths inside.
        local mounts=$REPO_DIR:$REPO_DIR
        [[ $RUN_DIR == "$REPO_DIR"/* ]] || mounts+=,$RUN_DIR:$RUN_DIR
        [[ $LOG_DIR == "$RUN_DIR"/* || $LOG_DIR == "$REPO_DIR"/* ]] || mounts+=,$LOG_DIR:$LOG_DIR
        [[ -z $CONTAINER_MOUNTS ]] || mounts+=,$CONTAINER_MOUNTS
        SRUN_ARGV+=(--container-image="$CONTAINER_IMAGE" --container-workdir="$REPO_DIR" --container-mounts="$mounts")
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
            local -a argv
            if [[ $ENGINE == cpu ]]; then
                # Bound to the node's name: virtual nodes of one machine (tools/local_cluster.sh) share
                # the port space, each on its own loopback address.
                argv=("$PYTHON" -m megatron_sdpg.rollout.server --hf-dir "$HF_DIR" --host "$node" --port "$port")
            else
                argv=("$ENGINE_PYTHON" -m sglang.launch_server --model-path "$HF_DIR" --host 0.0.0.0 --port "$port"
                    --tp-size "$ROLLOUT_TP" --base-gpu-id $((i * ROLLOUT_TP)) --mem-fraction-static "$MEM_FRACTION")
                [[ $COLOCATE == 0 ]] || argv+=(--enable-memory-saver)
                [[ $DETERMINISTIC == 0 ]] || argv+=(--enable-deterministic-inference)
            fi
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
            sleep "$HEALTH_POLL_S"
        done
        echo "healthy: $url"
    done
}

sdpg_run_trainer() {
    local nodelist urls
    nodelist=$(IFS=,; echo "${TRAIN_HOSTS[*]}")
    urls=$(IFS=,; echo "${ENGINE_URLS[*]}")
    # The trainer addresses every engine itself: the distributed weight sync joins each
    # engine's ranks to one group, which a router cannot stand in for. That group lives on
    # the node of trainer rank 0, which the rendezvous picks: each rank resolves the address
    # to its own node's Slurm name (OmegaConf reads SLURMD_NODENAME there), rank 0's is used.
    local -a overrides=(
        "parallel.tp=$TP" "parallel.pp=$PP" "parallel.nodes=$TRAIN_NODES" "parallel.gpus_per_node=$GPUS_PER_NODE"
        "model.hf_dir=$HF_DIR" "model.megatron_dir=$MEGATRON_DIR"
        "rollout.engine=$ENGINE" "rollout.urls=[$urls]" "rollout.tp_size=$ROLLOUT_TP"
        "rollout.sync_master_address=\${oc.env:SLURMD_NODENAME}" "rollout.sync_master_port=$SYNC_PORT"
        "train.run_dir=$RUN_DIR"
    )
    # Colocated engines give their memory back around the training passes (release/resume).
    if [[ $COLOCATE == 1 ]]; then
        overrides+=("rollout.colocate=true")
    else
        overrides+=("rollout.colocate=false")
    fi
    [[ $DETERMINISTIC == 0 ]] || overrides+=("rollout.deterministic=true")
    overrides+=("${SYNC_OVERRIDE[@]}")
    [[ -z $TRAIN_DATA ]] || overrides+=("data.train_files=[$TRAIN_DATA]")
    [[ -z $EVAL_DATA ]] || overrides+=("data.eval_files=[$EVAL_DATA]")
    sdpg_step 0 "$nodelist" "$LOG_DIR/%N/trainer.log" \
        torchrun --nnodes="$TRAIN_NODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$JOB_ID" \
        -m megatron_sdpg.train --config "$CONFIG" "${overrides[@]}" "$@"
}

# srun can exit 0 when its tasks never started (e.g. slurmd could not open the --output file):
# a finished run has written RUN_DIR/summary.json (unless an override moved train.run_dir).
sdpg_check_summary() {  # sdpg_check_summary TRAINER_ARGS...
    local arg
    [[ $DRY_RUN == 0 ]] || return 0
    for arg in "$@"; do [[ $arg != train.run_dir=* ]] || return 0; done
    [[ -f $RUN_DIR/summary.json ]] || sdpg_fail "the trainer step ended without writing $RUN_DIR/summary.json (see $LOG_DIR)"
    echo "# done: $RUN_DIR/summary.json"
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
    echo "# rollout: ${ROLLOUT_HOSTS[*]} ($([[ $COLOCATE == 1 ]] && echo colocated || echo dedicated)), $ENGINE engines of tp $ROLLOUT_TP, mem fraction $MEM_FRACTION"
    echo "# weight sync: $SYNC_STRATEGY; each srun step asks for $CPUS_PER_TASK CPUs per node"
    echo "# logs: $LOG_DIR/<node>/"
}

# The whole job. Arguments are extra trainer overrides.
sdpg_main() {
    sdpg_defaults
    sdpg_validate
    sdpg_resolve_nodes
    sdpg_sync_strategy "$@"
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
    sdpg_run_trainer "$@"
    sdpg_check_summary "$@"
}
