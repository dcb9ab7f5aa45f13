#!/usr/bin/env bash
# A real Slurm cluster of N virtual nodes on this machine, for trying (and testing) the
# cluster path of examples/run_sdpg_*.sh without a cluster.
#
#   sudo bash tools/local_cluster.sh up [--nodes N]   # install (apt), configure, start; waits until idle
#   sudo bash tools/local_cluster.sh status           # daemons, sinfo
#   sudo bash tools/local_cluster.sh down             # stop the daemons this script started
#
# What `up` does (root only):
#   - installs Debian's Slurm (slurmctld, slurmd, slurm-client: the parts of slurm-wlm it uses)
#     and munge with apt-get when they are missing;
#   - writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf (refusing to replace files it did
#     not write: they carry the marker line below) and one /etc/hosts line per node:
#     node001 -> 127.0.0.11, node002 -> 127.0.0.12, ... (the whole of 127/8 reaches loopback, so
#     servers on different "nodes" can listen on the same port, as on a real cluster);
#   - starts its own munged (own key and socket under the state directory), one slurmctld
#     and one `slurmd -N nodeNNN` per node, each with its own NodeAddr and Port, in its own UTS
#     namespace whose host name is the node's name (so jobs on "node002" see hostname node002);
#   - waits until every node is idle in partition `sdpg` (the default partition).
# Each node offers CPUS cores (default 4) and 8 GPUs of a GRES that has no devices behind it,
# so that the unchanged `#SBATCH --gpus-per-node=8` headers are accepted; on a machine without
# GPUs the trainer runs on gloo (GPUS_PER_NODE = trainer ranks per node).
#
# It is idempotent: `up` on a running cluster of the same size only checks it (a different
# size restarts it), `down` on a stopped one does nothing. Daemons are stopped by the PIDs in
# their pidfiles (checked against /proc/PID/comm), never by name. State, logs and pidfiles live
# in LOCAL_CLUSTER_DIR (default /var/lib/megatron_sdpg_cluster).
#
# Settings (environment): LOCAL_CLUSTER_DIR, CPUS (per node), SLURMCTLD_PORT (6817),
# SLURMD_BASE_PORT (node i listens on SLURMD_BASE_PORT + i), NODE_ADDR_BASE (11: first
# address 127.0.0.11).
set -euo pipefail

MARKER="# written by megatron_sdpg tools/local_cluster.sh"
STATE=${LOCAL_CLUSTER_DIR:-/var/lib/megatron_sdpg_cluster}
CONF_DIR=/etc/slurm
: "${CPUS:=4}"
: "${SLURMCTLD_PORT:=6817}"
: "${SLURMD_BASE_PORT:=17000}"
: "${NODE_ADDR_BASE:=11}"

fail() {
    echo "local_cluster: error: $*" >&2
    exit 2
}

say() { echo "local_cluster: $*"; }

usage() {
    echo "usage: $0 up [--nodes N] | down | status" >&2
    exit 2
}

node_name() { printf 'node%03d' "$1"; }

# The number of nodes of the configuration written last (0 when none).
configured_nodes() {
    if [[ -f $STATE/nodes ]]; then cat "$STATE/nodes"; else echo 0; fi
}

# pid_alive PIDFILE COMM: the pidfile names a live process whose /proc comm is COMM.
pid_alive() {
    local file=$1 comm=$2 pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$comm" ]]
}

# stop_pid PIDFILE COMM: SIGTERM, then SIGKILL after 20 s, of the pidfile's process.
stop_pid() {
    local file=$1 comm=$2 pid i
    if ! pid_alive "$file" "$comm"; then
        rm -f "$file"
        return 0
    fi
    pid=$(<"$file")
    say "stopping $comm (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 200; i++)); do
        pid_alive "$file" "$comm" || break
        sleep 0.1
    done
    if pid_alive "$file" "$comm"; then
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$file"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null &&
        command -v sbatch >/dev/null; then
        return 0
    fi
    command -v apt-get >/dev/null || fail "slurmctld is not installed and there is no apt-get to install it"
    # The parts of Debian's slurm-wlm this cluster uses (the metapackage adds every plugin's -dev).
    local -a packages=(slurmctld slurmd slurm-client munge)
    say "installing ${packages[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/apt.log" 2>&1 || fail "apt-get update failed (see $STATE/apt.log)"
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >>"$STATE/apt.log" 2>&1 ||
        fail "apt-get install ${packages[*]} failed (see $STATE/apt.log)"
}

# write_owned PATH CONTENT: writes PATH atomically unless it exists without our marker.
write_owned() {
    local path=$1 content=$2
    if [[ -e $path ]] && ! grep -qxF "$MARKER" "$path"; then
        fail "$path exists and was not written by this script; move it away (or use that cluster)"
    fi
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$content" >"$path.tmp.$$"
    mv -f "$path.tmp.$$" "$path"
}

remove_owned() {
    local path=$1
    [[ -f $path ]] && grep -qxF "$MARKER" "$path" && rm -f "$path"
    return 0
}

# The /etc/hosts lines of this cluster, with the marker as a trailing comment.
hosts_without_ours() { grep -vF "$MARKER" /etc/hosts || true; }

write_hosts() {
    local n=$1 i content
    content=$(hosts_without_ours)
    for ((i = 1; i <= n; i++)); do
        content+=$'\n'"127.0.0.$((NODE_ADDR_BASE + i - 1)) $(node_name "$i") $MARKER"
    done
    # /etc/hosts may be a bind mount (containers): rewrite it in place instead of renaming over it.
    printf '%s\n' "$content" >/etc/hosts
}

remove_hosts() {
    grep -qF "$MARKER" /etc/hosts || return 0
    local content
    content=$(hosts_without_ours)
    printf '%s\n' "$content" >/etc/hosts
}

write_configs() {
    local n=$1 i last host
    host=$(hostname -s)
    last=$(node_name "$n")
    local conf="$MARKER
# A local test cluster: $n virtual nodes on $host (see tools/local_cluster.sh).
ClusterName=sdpglocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$SLURMCTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
SlurmdTimeout=300
InactiveLimit=0
KillWait=30
MinJobAge=600
"
    for ((i = 1; i <= n; i++)); do
        conf+="NodeName=$(node_name "$i") NodeAddr=127.0.0.$((NODE_ADDR_BASE + i - 1)) NodeHostname=$(node_name "$i") Port=$((SLURMD_BASE_PORT + i)) CPUs=$CPUS Gres=gpu:8 State=UNKNOWN"$'\n'
    done
    conf+="PartitionName=sdpg Nodes=node[001-${last#node}] Default=YES MaxTime=INFINITE State=UP"
    write_owned "$CONF_DIR/slurm.conf" "$conf"
    # GPUs the scheduler counts, backed by empty files (task/none binds nothing; no GPU here).
    mkdir -p "$STATE/fake_gpu"
    for ((i = 0; i < 8; i++)); do : >"$STATE/fake_gpu/gpu$i"; done
    write_owned "$CONF_DIR/gres.conf" "$MARKER
NodeName=node[001-${last#node}] Name=gpu File=$STATE/fake_gpu/gpu[0-7]"
    echo "$n" >"$STATE/nodes"
}

start_munge() {
    local dir=$STATE/munge
    if pid_alive "$STATE/run/munged.pid" munged; then return 0; fi
    mkdir -p "$dir"
    chmod 0755 "$dir"  # the socket must be reachable; the key itself is 0400
    if [[ ! -s $dir/munge.key ]]; then
        dd if=/dev/urandom of="$dir/munge.key.tmp" bs=1024 count=1 status=none
        chmod 0400 "$dir/munge.key.tmp"
        mv -f "$dir/munge.key.tmp" "$dir/munge.key"
    fi
    say "starting munged"
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$STATE/run/munged.pid" \
        --log-file="$STATE/log/munged.log" --seed-file="$dir/munged.seed" ||
        fail "munged did not start (see $STATE/log/munged.log)"
}

start_slurmctld() {
    if pid_alive "$STATE/run/slurmctld.pid" slurmctld; then return 0; fi
    say "starting slurmctld"
    # -c: a fresh controller forgets the jobs of an earlier cluster.
    slurmctld -c -f "$CONF_DIR/slurm.conf" || fail "slurmctld did not start (see $STATE/log/slurmctld.log)"
}

start_slurmds() {
    local n=$1 i name
    for ((i = 1; i <= n; i++)); do
        name=$(node_name "$i")
        pid_alive "$STATE/run/slurmd.$name.pid" slurmd && continue
        mkdir -p "$STATE/slurmd/$name"
        say "starting slurmd -N $name (127.0.0.$((NODE_ADDR_BASE + i - 1)), port $((SLURMD_BASE_PORT + i)))"
        # Its own UTS namespace, host name = node name: the node's steps see `hostname` = nodeNNN (which
        # /etc/hosts maps to its address), and srun's %N output patterns name the node, as on a cluster.
        # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
        unshare --uts sh -c 'hostname "$1" && exec slurmd -N "$1" -f "$2"' slurmd-launch "$name" "$CONF_DIR/slurm.conf" ||
            fail "slurmd -N $name did not start (see $STATE/log/slurmd.$name.log)"
    done
}

# Waits (60 s) until every node answers and is idle or allocated.
wait_ready() {
    local n=$1 i states deadline=$((SECONDS + 90))
    while :; do
        states=$(sinfo -h -N -p sdpg -o '%N %T' 2>/dev/null || true)
        if [[ $(grep -cE ' (idle|allocated|mixed)$' <<<"$states") -ge $n ]]; then
            say "ready: $n nodes"
            return 0
        fi
        if ((SECONDS > deadline)); then
            echo "$states" >&2
            fail "the nodes did not become idle in 90 s (see $STATE/log/)"
        fi
        # A node that registered as down (e.g. after an unclean stop) is returned to service.
        for ((i = 1; i <= n; i++)); do
            if grep -qE "^$(node_name "$i") (down|drained)" <<<"$states"; then
                scontrol update nodename="$(node_name "$i")" state=resume >/dev/null 2>&1 || true
            fi
        done
        sleep 1
    done
}

daemons_down() {
    local n i
    n=$(configured_nodes)
    for ((i = n; i >= 1; i--)); do stop_pid "$STATE/run/slurmd.$(node_name "$i").pid" slurmd; done
    stop_pid "$STATE/run/slurmctld.pid" slurmctld
    stop_pid "$STATE/run/munged.pid" munged
}

cmd_up() {
    local n=3
    while (($#)); do
        case $1 in
            --nodes) n=${2:-}; shift 2 || usage ;;
            --nodes=*) n=${1#--nodes=}; shift ;;
            *) usage ;;
        esac
    done
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1 || n > 99)); then fail "--nodes must be an integer in 1..99, got '$n'"; fi
    [[ $(id -u) == 0 ]] || fail "must run as root (it installs packages and starts slurmd)"
    if ! [[ $CPUS =~ ^[0-9]+$ ]] || ((CPUS < 1)); then fail "CPUS must be an integer >= 1, got '$CPUS'"; fi
    mkdir -p "$STATE/run" "$STATE/log" "$STATE/slurmctld" "$STATE/slurmd"
    install_packages
    command -v unshare >/dev/null || fail "unshare (util-linux) is needed to give each node its own host name"
    local before
    before=$(configured_nodes)
    if ((before != 0 && before != n)); then
        say "resizing from $before to $n nodes: restarting"
        daemons_down
    fi
    write_configs "$n"
    write_hosts "$n"
    start_munge
    start_slurmctld
    start_slurmds "$n"
    wait_ready "$n"
}

cmd_down() {
    [[ $(id -u) == 0 ]] || fail "must run as root"
    [[ -d $STATE ]] || { say "not set up (no $STATE)"; return 0; }
    daemons_down
    remove_owned "$CONF_DIR/slurm.conf"
    remove_owned "$CONF_DIR/gres.conf"
    remove_hosts
    rm -f "$STATE/nodes"
    say "down"
}

cmd_status() {
    local n i name rc=0
    n=$(configured_nodes)
    if ((n == 0)); then
        say "not configured"
        return 3
    fi
    for pair in "munged:munged" "slurmctld:slurmctld"; do
        if pid_alive "$STATE/run/${pair%%:*}.pid" "${pair##*:}"; then
            echo "${pair%%:*}: running (pid $(<"$STATE/run/${pair%%:*}.pid"))"
        else
            echo "${pair%%:*}: stopped"
            rc=3
        fi
    done
    for ((i = 1; i <= n; i++)); do
        name=$(node_name "$i")
        if pid_alive "$STATE/run/slurmd.$name.pid" slurmd; then
            echo "slurmd $name: running (pid $(<"$STATE/run/slurmd.$name.pid"))"
        else
            echo "slurmd $name: stopped"
            rc=3
        fi
    done
    ((rc == 0)) && sinfo -p sdpg
    return $rc
}

case ${1:-} in
    up) shift; cmd_up "$@" ;;
    down) shift; (($# == 0)) || usage; cmd_down ;;
    status) shift; (($# == 0)) || usage; cmd_status ;;
    *) usage ;;
esac
