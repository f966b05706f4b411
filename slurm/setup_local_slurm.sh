#!/usr/bin/env bash
# Install and start a real single-node Slurm cluster on this machine, for
# tests and CI (Debian 12, run as root, no systemd needed).
#
#   bash slurm/setup_local_slurm.sh
#
# What it does, each step skipped when already done (safe to run again):
#   1. apt-get installs Debian's slurm-wlm and munge if they are missing.
#   2. Creates /etc/munge/munge.key if missing, starts munged, checks it with
#      `munge -n | unmunge`.
#   3. Writes /etc/slurm/slurm.conf for one node (`hostname -s`) with the CPU
#      count and memory that `slurmd -C` reports, and a default partition
#      `debug`. No cgroups, no accounting database.
#   4. Starts slurmctld and slurmd as plain daemons (restarting them only if
#      slurm.conf changed), waits until the node is idle, prints `sinfo`.
#
# Environment knobs:
#   SLURM_SETUP_TIMEOUT  seconds to wait for the node to become idle (60)
#   SLURM_CRED_EXPIRE    credential lifetime in seconds; also how long a
#                        requeued job waits before it may start again (10;
#                        Slurm's own default is 120)
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
SLURM_LOG_DIR=/var/log/slurm
CTLD_LOG=$SLURM_LOG_DIR/slurmctld.log
SLURMD_LOG=$SLURM_LOG_DIR/slurmd.log
SPOOL=/var/spool/slurm
STATE_DIR=$SPOOL/ctld
SLURMD_SPOOL=$SPOOL/d
CTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid
MUNGE_KEY=/etc/munge/munge.key
MUNGE_LOG=/var/log/munge/munged.log
WAIT_S=${SLURM_SETUP_TIMEOUT:-60}
CRED_EXPIRE=${SLURM_CRED_EXPIRE:-10}

log() { echo "[setup_local_slurm] $*"; }

dump_logs() {
    local f
    for f in "$CTLD_LOG" "$SLURMD_LOG" "$MUNGE_LOG"; do
        if [[ -f $f ]]; then
            echo "----- last 30 lines of $f -----" >&2
            tail -n 30 "$f" >&2 || true
        fi
    done
}

die() {
    echo "[setup_local_slurm] ERROR: $*" >&2
    dump_logs
    exit 1
}

# True when process PID exists and is not a zombie. (PID 1 here may be a
# minimal init that reaps orphans late, so a stopped daemon can linger as a
# zombie for a few seconds.)
proc_alive() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $st && $st != Z* && $st != X* ]]
}

# pid of a running daemon NAME, from its pid file or else by exact process
# name; prints nothing and fails when it is not running.
daemon_pid() {
    local name=$1 pidfile=$2 pid
    if [[ -s $pidfile ]]; then
        pid=$(<"$pidfile")
        if [[ $pid =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] && proc_alive "$pid"; then
            echo "$pid"
            return 0
        fi
    fi
    for pid in $(pgrep -x "$name" || true); do
        # skip zombies; a daemon's short-lived forks share its name
        if proc_alive "$pid"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

node_state() {
    # e.g. idle, mixed, allocated, down*, drained, idle* (* = not responding)
    sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true
}

node_ok() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

[[ $(id -u) -eq 0 ]] || { echo "[setup_local_slurm] ERROR: must run as root" >&2; exit 1; }
NODE=$(hostname -s)
[[ -n $NODE ]] || die "hostname -s printed nothing"

# ---------------------------------------------------------------- 1. packages
missing=()
for pkg in slurm-wlm munge; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    apt_start=$SECONDS
    apt-get update -q >/dev/null || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    log "installed in $((SECONDS - apt_start)) s"
fi
for bin in munged munge unmunge slurmctld slurmd sinfo scontrol; do
    command -v "$bin" >/dev/null || die "$bin not found after installing slurm-wlm and munge"
done

# ------------------------------------------------------------------- 2. munge
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s $MUNGE_KEY ]]; then
    log "creating $MUNGE_KEY"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile="$MUNGE_KEY"
    else
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
    fi
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
if ! munge_ok; then
    log "starting munged"
    # A stale socket/pid left by a dead munged makes a new one refuse to start.
    if ! daemon_pid munged /run/munge/munged.pid >/dev/null; then
        rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    fi
    runuser -u munge -- /usr/sbin/munged || die "munged failed to start"
    for _ in $(seq 1 20); do
        munge_ok && break
        sleep 0.5
    done
    munge_ok || die "munged is running but 'munge -n | unmunge' fails"
fi
log "munge OK"

# -------------------------------------------------------------- 3. slurm.conf
install -d -m 0755 /etc/slurm "$SLURM_LOG_DIR" "$SPOOL"
install -d -m 0700 "$STATE_DIR" "$SLURMD_SPOOL"

# e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
hw=$(slurmd -C 2>/dev/null | head -n 1) || true
hw_field() { sed -n "s/.*\b$1=\([0-9]\+\).*/\1/p" <<<"$hw"; }
CPUS=$(hw_field CPUs)
SOCKETS=$(hw_field SocketsPerBoard)
CORES=$(hw_field CoresPerSocket)
THREADS=$(hw_field ThreadsPerCore)
MEM=$(hw_field RealMemory)
[[ -n $CPUS && -n $SOCKETS && -n $CORES && -n $THREADS && -n $MEM ]] \
    || die "could not parse 'slurmd -C' output: $hw"

new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat >"$new_conf" <<EOF
# Written by slurm/setup_local_slurm.sh: single-node Slurm for tests and CI.
# Regenerated on every run; edit the script, not this file.
ClusterName=justrl-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credential lifetime; a requeued job may start again only after it (default 120 s).
AuthInfo=cred_expire=${CRED_EXPIRE}
MpiDefault=none
# No mail on this machine; silences 'Configured MailProg is invalid'.
MailProg=/bin/true
# No cgroups: plain /proc process tracking, no task containment.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Start batch jobs right at submit time (default batch_sched_delay is 3 s), and
# let the backfill pass (default every 30 s) start requeued or newly eligible
# jobs within ~2 s.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
# Allocate single CPUs (not whole cores), memory not tracked: several 1-CPU
# jobs run side by side.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
# A node whose slurmd comes back registers as usable again by itself.
ReturnToService=2
# Finished jobs stay visible to 'scontrol show job' this long (no sacct here).
MinJobAge=300
KillWait=10
SlurmctldPidFile=${CTLD_PIDFILE}
SlurmdPidFile=${SLURMD_PIDFILE}
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SLURMD_SPOOL}
SlurmctldLogFile=${CTLD_LOG}
SlurmdLogFile=${SLURMD_LOG}
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} SocketsPerBoard=${SOCKETS} CoresPerSocket=${CORES} ThreadsPerCore=${THREADS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF

conf_changed=0
if ! cmp -s "$new_conf" "$SLURM_CONF"; then
    [[ -f $SLURM_CONF ]] && cp -p "$SLURM_CONF" "$SLURM_CONF.bak"
    install -m 0644 "$new_conf" "$SLURM_CONF"
    conf_changed=1
    log "wrote $SLURM_CONF (node $NODE: $CPUS CPUs, $MEM MB)"
fi

# ------------------------------------------------------------ 4. the daemons
ctld_pid=$(daemon_pid slurmctld "$CTLD_PIDFILE" || true)
slurmd_pid=$(daemon_pid slurmd "$SLURMD_PIDFILE" || true)

if ((!conf_changed)) && [[ -n $ctld_pid && -n $slurmd_pid ]] && node_ok; then
    log "slurmctld ($ctld_pid) and slurmd ($slurmd_pid) already running, node $NODE $(node_state)"
    sinfo
    exit 0
fi

if ((conf_changed)) && [[ -n $ctld_pid || -n $slurmd_pid ]]; then
    log "slurm.conf changed: restarting the running Slurm daemons"
    for pid in $ctld_pid $slurmd_pid; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 40); do
        alive=0
        for pid in $ctld_pid $slurmd_pid; do proc_alive "$pid" && alive=1; done
        ((alive)) || break
        sleep 0.5
    done
    ((alive)) && die "old Slurm daemons did not exit"
    ctld_pid=''
    slurmd_pid=''
fi

if [[ -z $ctld_pid ]]; then
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start"
fi
# slurmd registers with slurmctld, so give slurmctld a moment to answer.
for _ in $(seq 1 40); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.5
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
slurmd_started_at=
if [[ -z $slurmd_pid ]]; then
    log "starting slurmd"
    slurmd_started_at=$(date +%s)
    slurmd || die "slurmd failed to start"
fi

# The node counts as up once sinfo calls it idle (or busy) and, when we just
# started slurmd, that slurmd has registered: slurmctld keeps showing the old
# state of a dead slurmd for minutes (SlurmdTimeout).
node_ready() {
    node_ok || return 1
    [[ -z $slurmd_started_at ]] && return 0
    local t ts
    t=$(scontrol show node "$NODE" 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    ts=$(date -d "$t" +%s 2>/dev/null) || return 1
    ((ts >= slurmd_started_at - 1))
}

log "waiting up to ${WAIT_S}s for node $NODE to be idle"
deadline=$((SECONDS + WAIT_S))
resumed=0
while ! node_ready; do
    daemon_pid slurmctld "$CTLD_PIDFILE" >/dev/null || die "slurmctld died"
    daemon_pid slurmd "$SLURMD_PIDFILE" >/dev/null || die "slurmd died"
    state=$(node_state)
    if ((SECONDS >= deadline)); then
        sinfo -N -l >&2 || true
        scontrol show node "$NODE" >&2 || true
        die "node $NODE is '${state:-unknown}' after ${WAIT_S}s, not idle"
    fi
    case "$state" in
        down* | drain* | fail*)
            # Only a responding node (no '*') can be resumed.
            if [[ $state != *'*' ]] && ((resumed < 3)); then
                log "node $NODE is $state: resuming it"
                scontrol update nodename="$NODE" state=resume || true
                resumed=$((resumed + 1))
            fi
            ;;
    esac
    sleep 1
done
daemon_pid slurmctld "$CTLD_PIDFILE" >/dev/null || die "slurmctld died"
daemon_pid slurmd "$SLURMD_PIDFILE" >/dev/null || die "slurmd died"

log "Slurm is up: node $NODE $(node_state)"
sinfo
