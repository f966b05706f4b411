#!/usr/bin/env bash
# Start an emulated multi-node GPU cluster with real Slurm on this one machine (Debian 12, root).
#
#   bash slurm/setup_emulated_cluster.sh [NODES [GPUS_PER_NODE]]     # default 2 x 4
#   bash slurm/setup_emulated_cluster.sh --stop                      # take it down
#   export SLURM_CONF=/etc/slurm-emu/slurm.conf                      # then sbatch/srun/sinfo use it
#
# Each node is a network + UTS namespace of this machine with its own hostname (emu1, emu2, ...)
# and its own address (10.77.0.11, .12, ...) on a bridge (emubr0, 10.77.0.1 in the root
# namespace, so commands typed here reach the nodes); /etc/hosts names them. One slurmd per node
# runs inside its namespace, so every process of a job step (and everything it starts) sees that
# node's hostname and address: learners rendezvous across hostnames and engines listen on their
# node's address exactly as on a real cluster. The filesystem is shared (same machine).
#
# GPUs: each node declares `Gres=gpu:G`, backed by G per-node character devices
# (/dev/emu-gpu/<node>/nvidia<i>, `mknod c 1 3`, i.e. /dev/null), so Slurm allocates GPUs and sets
# per-job and per-step CUDA_VISIBLE_DEVICES exactly as with real ones (no cgroups: nothing stops a
# process from reading the variable it was given and using another device, and there is no GPU to
# compute on). Its TaskProlog exports JUSTRL_EMULATED_GPUS=1 to every task: the one flag under
# which justrl computes on the CPU for GPUs Slurm hands out (elsewhere its preflight fails).
# CPUs and memory are declared, not real (`SlurmdParameters=config_overrides`): EMU_CPUS_PER_NODE
# (8) and EMU_MEM_PER_NODE_MB (16000) per node, tracked per job (CR_CPU_Memory) as on a real
# cluster, while all nodes share this machine's real cores and memory.
#
# It coexists with the single-node Slurm of setup_local_slurm.sh (CI runs both): its own
# slurm.conf (/etc/slurm-emu/), slurmctld port (6827), state, pid and log files
# (/var/spool/slurm-emu, /run/slurm-emu, /var/log/slurm-emu), cluster name justrl-emu; it never
# touches /etc/slurm/slurm.conf or the daemons started from it. munged is shared.
# Safe to run again: what is up and unchanged is left alone; a different shape rebuilds it.
set -euo pipefail

NODES=${1:-2}
GPUS=${2:-4}
EMU_DIR=/etc/slurm-emu
CONF=$EMU_DIR/slurm.conf
GRES_CONF=$EMU_DIR/gres.conf
LOG_DIR=/var/log/slurm-emu
SPOOL=/var/spool/slurm-emu
RUN_DIR=/run/slurm-emu
DEV_DIR=/dev/emu-gpu
BRIDGE=emubr0
NET=10.77.0
CTLD_PORT=6827
SLURMD_PORT=6818   # one per namespace, so the same number on every node (as on a real cluster)
CPUS=${EMU_CPUS_PER_NODE:-8}
MEM=${EMU_MEM_PER_NODE_MB:-16000}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}
WAIT_S=${SLURM_SETUP_TIMEOUT:-90}
HOSTS_MARK="# justrl-emu"
export SLURM_CONF=$CONF

log() { echo "[setup_emulated_cluster] $*"; }
die() {
    echo "[setup_emulated_cluster] ERROR: $*" >&2
    for f in "$LOG_DIR"/*.log; do
        [[ -f $f ]] && { echo "----- last 20 lines of $f -----" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}
proc_alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $st && $st != Z* && $st != X* ]]
}
# pid from a pid file when that process is alive and named $2
pid_of() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] && proc_alive "$pid" && echo "$pid"
}
node_name() { echo "emu$1"; }
ns_name() { echo "emu-$1"; }

stop_all() {
    local pids=() f pid
    for f in "$RUN_DIR"/slurmd-*.pid "$RUN_DIR"/slurmctld.pid; do
        [[ -e $f ]] || continue
        pid=$(pid_of "$f" "$(basename "$f" .pid | sed 's/-.*//')") && pids+=("$pid")
    done
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 40); do
        local alive=0
        for pid in "${pids[@]}"; do proc_alive "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.5
    done
    for pid in "${pids[@]}"; do proc_alive "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
    rm -f "$RUN_DIR"/*.pid
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^emu-' || true); do
        # What jobs left running in a node (slurmstepd, tasks) would keep its namespace alive.
        for pid in $(ip netns pids "$ns" 2>/dev/null || true); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^emuv[0-9]+$' || true); do
        ip link del "$link" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    sed -i "/$HOSTS_MARK\$/d" /etc/hosts
    rm -rf "$DEV_DIR"
}

[[ $(id -u) -eq 0 ]] || { echo "[setup_emulated_cluster] ERROR: must run as root" >&2; exit 1; }
if [[ ${1:-} == --stop ]]; then
    stop_all
    log "stopped"
    exit 0
fi
[[ $NODES =~ ^[1-9][0-9]*$ && $NODES -le 50 ]] || die "NODES must be 1..50, got '$NODES'"
[[ $GPUS =~ ^[0-9]+$ && $GPUS -le 64 ]] || die "GPUS_PER_NODE must be 0..64, got '$GPUS'"

# Slurm and munge: the single-node script installs them and starts munged (idempotent).
if ! command -v slurmd >/dev/null || ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "installing/starting Slurm and munge through setup_local_slurm.sh"
    bash "$(dirname "$0")/setup_local_slurm.sh" >/dev/null || die "setup_local_slurm.sh failed"
fi
for bin in ip unshare slurmctld slurmd scontrol sinfo mknod; do
    command -v "$bin" >/dev/null || die "$bin not found"
done

CTLD_HOST=$(hostname -s)
NODELIST="emu[1-$NODES]"
((NODES == 1)) && NODELIST=emu1

# ------------------------------------------------------------------------------------ config
install -d -m 0755 "$EMU_DIR" "$LOG_DIR" "$RUN_DIR"
install -d -m 0700 "$SPOOL" "$SPOOL/ctld"
# Every task of the emulated cluster is told its GPUs are emulated (JUSTRL_EMULATED_GPUS=1): the
# only place justrl allows CPU compute on GPUs Slurm hands out (justrl.cluster.placement.emulated_gpus).
# A TaskProlog's "export NAME=value" lines enter the task's environment (slurm.conf(5), TaskProlog).
TASK_PROLOG=$EMU_DIR/task_prolog.sh
printf '#!/bin/sh\n# Written by slurm/setup_emulated_cluster.sh: these GPUs are device files, not GPUs.\necho export JUSTRL_EMULATED_GPUS=1\n' \
    >"$TASK_PROLOG.new" && chmod 0755 "$TASK_PROLOG.new" && mv "$TASK_PROLOG.new" "$TASK_PROLOG"
new_conf=$(mktemp)
new_gres=$(mktemp)
trap 'rm -f "$new_conf" "$new_gres"' EXIT
gres_line=""
((GPUS > 0)) && gres_line="Gres=gpu:$GPUS"
cat >"$new_conf" <<EOF
# Written by slurm/setup_emulated_cluster.sh $NODES $GPUS: an emulated $NODES-node x $GPUS-GPU cluster
# on this machine (one network + UTS namespace per node). Use it with SLURM_CONF=$CONF.
# Regenerated on every run; edit the script, not this file.
ClusterName=justrl-emu
SlurmctldHost=${CTLD_HOST}(${NET}.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=${CRED_EXPIRE}
MpiDefault=none
TaskProlog=${TASK_PROLOG}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# Cores and memory are allocated per job, as on a GPU cluster; a job without --mem gets
# DefMemPerCPU per CPU.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
GresTypes=gpu
# The nodes' CPUs and memory are declared here, not detected (all nodes share this machine's).
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
# A node whose slurmd stops answering is marked down after 30 s (Slurm's default: 300), so that the
# lost-node test (tests/test_cluster_emulated.py) sees it within a few minutes; justrl.cluster.requeue waits
# SlurmdTimeout + 60 s for that mark.
SlurmdTimeout=30
MinJobAge=300
KillWait=10
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd-%n.pid
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/%n
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
echo "# Written by slurm/setup_emulated_cluster.sh: per-node fake GPU device files." >"$new_gres"
for i in $(seq 1 "$NODES"); do
    n=$(node_name "$i")
    echo "NodeName=$n NodeAddr=${NET}.$((10 + i)) NodeHostname=$n CPUs=$CPUS RealMemory=$MEM $gres_line State=UNKNOWN" >>"$new_conf"
    ((GPUS > 0)) && echo "NodeName=$n Name=gpu File=$DEV_DIR/$n/nvidia[0-$((GPUS - 1))]" >>"$new_gres"
done
echo "PartitionName=emu Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP" >>"$new_conf"

changed=0
cmp -s "$new_conf" "$CONF" || changed=1
cmp -s "$new_gres" "$GRES_CONF" || changed=1
running=1
pid_of "$RUN_DIR/slurmctld.pid" slurmctld >/dev/null || running=0
for i in $(seq 1 "$NODES"); do
    pid_of "$RUN_DIR/slurmd-$(node_name "$i").pid" slurmd >/dev/null || running=0
    ip netns list 2>/dev/null | grep -q "^$(ns_name "$(node_name "$i")")\b" || running=0
done
all_idle() {
    local states
    states=$(sinfo -h -N -o %T 2>/dev/null) || return 1
    [[ $(grep -c . <<<"$states") -eq $NODES ]] || return 1
    ! grep -qvE '^(idle|mixed|allocated|completing)$' <<<"$states"
}
if ((!changed && running)) && all_idle; then
    log "already up: $NODES node(s) x $GPUS GPU(s) ($NODELIST); use SLURM_CONF=$CONF"
    sinfo
    exit 0
fi
log "(re)building: $NODES node(s) x $GPUS GPU(s)"
stop_all
# A new shape must not inherit the old jobs and node records.
((changed)) && rm -rf "${SPOOL:?}/ctld"/* "$SPOOL"/emu*
install -d -m 0700 "$SPOOL/ctld"
install -m 0644 "$new_conf" "$CONF"
install -m 0644 "$new_gres" "$GRES_CONF"

# ----------------------------------------------------------------------------------- network
ip link add "$BRIDGE" type bridge
ip addr add "${NET}.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in $(seq 1 "$NODES"); do
    n=$(node_name "$i")
    ns=$(ns_name "$n")
    ip netns add "$ns"
    ip link add "emuv$i" type veth peer name "emuv${i}p"
    ip link set "emuv${i}p" netns "$ns"
    ip link set "emuv$i" master "$BRIDGE"
    ip link set "emuv$i" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip link set "emuv${i}p" name eth0
    ip netns exec "$ns" ip addr add "${NET}.$((10 + i))/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip route add default via "${NET}.1"
    echo "${NET}.$((10 + i)) $n $HOSTS_MARK" >>/etc/hosts
    install -d -m 0755 "$DEV_DIR/$n" "$SPOOL/$n"
    for g in $(seq 0 $((GPUS - 1))); do
        mknod -m 0666 "$DEV_DIR/$n/nvidia$g" c 1 3
    done
done

# ----------------------------------------------------------------------------------- daemons
log "starting slurmctld (port $CTLD_PORT)"
slurmctld -i || die "slurmctld failed to start"
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "the emulated slurmctld does not answer 'scontrol ping'"
for i in $(seq 1 "$NODES"); do
    n=$(node_name "$i")
    # The daemon and everything it starts (job steps) live in the node's namespaces. nsenter,
    # not `ip netns exec`: the latter remounts /sys, hiding /sys/fs/cgroup, which slurmd needs.
    nsenter --net="/run/netns/$(ns_name "$n")" unshare --uts sh -c "hostname $n && exec slurmd -N $n" \
        || die "slurmd of $n failed to start"
done

log "waiting up to ${WAIT_S}s for $NODELIST to be idle"
deadline=$((SECONDS + WAIT_S))
until all_idle; do
    ((SECONDS < deadline)) || { sinfo -N -l >&2 || true; die "nodes not idle after ${WAIT_S}s"; }
    for i in $(seq 1 "$NODES"); do
        pid_of "$RUN_DIR/slurmd-$(node_name "$i").pid" slurmd >/dev/null || die "slurmd of $(node_name "$i") died"
    done
    sleep 1
done
log "up: $NODES node(s) x $GPUS GPU(s) ($NODELIST); use SLURM_CONF=$CONF"
sinfo
