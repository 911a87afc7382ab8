#!/usr/bin/env bash
# A private single-node SLURM cluster for the sweep tests: munge, MariaDB (private instance
# on 127.0.0.1:3307), slurmdbd (so that sacct works, which submitit needs to see cancelled
# jobs), slurmctld and slurmd, all on 127.0.0.1, run as root without systemd.
#
#   tests/slurm/slurm-local.sh start    install what is missing, configure, start, wait for an idle node
#   tests/slurm/slurm-local.sh stop     stop only the daemons this script started (by pid file)
#   tests/slurm/slurm-local.sh status   say whether the cluster answers
#
# Both start and stop are idempotent. Settings (environment):
#   SLURM_LOCAL_DIR         state, logs, pid files, database  [/var/tmp/memctl-slurm]
#   SLURM_LOCAL_KILLWAIT    seconds between SIGTERM and SIGKILL of a cancelled job  [30]
#   SLURM_LOCAL_CPUS        CPUs the node advertises (default: what slurmd -C detects)
#   SLURM_LOCAL_ACCOUNTING  1: slurmdbd + MariaDB, 0: no accounting (no sacct)  [1]
# Pitfalls this follows are recorded in the project's notes on SLURM: no systemd, munge's
# run dir, proctrack/pgid (linuxproc leaks processes), cred_expire and sched_interval for
# fast requeues, batch_sched_delay=0 for fast starts, zombie daemons checked via /proc.
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/tmp/memctl-slurm}
KILLWAIT=${SLURM_LOCAL_KILLWAIT:-30}
ACCOUNTING=${SLURM_LOCAL_ACCOUNTING:-1}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARKER="# written by memctl tests/slurm/slurm-local.sh"
DB_PORT=3307
HOST=$(hostname -s)

say() { echo "slurm-local: $*"; }
die() {
    echo "slurm-local: ERROR: $*" >&2
    exit 1
}

# A process of this name runs, zombies (a daemon that just exited, not yet reaped) aside.
running_named() {
    local pid state
    for pid in $(pgrep -x "$1"); do
        state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || continue
        [[ -n $state && $state != Z ]] && return 0
    done
    return 1
}

# A pid is ours and alive when its pid file names a process in a state other than zombie.
alive() {
    local pidfile=$1 pid state
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -r /proc/$pid/stat ]] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z && $state != X ]]
}

stop_pidfile() {
    local name=$1 pidfile=$2 waited=0
    alive "$pidfile" || {
        rm -f "$pidfile"
        return 0
    }
    kill -TERM "$(<"$pidfile")" 2>/dev/null || true
    while alive "$pidfile" && ((waited < 200)); do
        sleep 0.1
        waited=$((waited + 1))
    done
    if alive "$pidfile"; then
        kill -KILL "$(<"$pidfile")" 2>/dev/null || true
        say "$name did not stop in 20 s; killed"
    fi
    rm -f "$pidfile"
    say "stopped $name"
}

# Wait for a command to succeed; on timeout show the daemon's log and fail. A daemon
# writes its pid file after it forks: until the file is there it has not died, only not
# yet written it (callers remove a stale one before starting the daemon).
wait_for() {
    local what=$1 pidfile=$2 log=$3 tries=$4
    shift 4
    for ((i = 0; i < tries; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [[ -s $pidfile ]] && ! alive "$pidfile"; then
            tail -n 20 "$log" >&2 || true
            die "$what exited while waiting for it to answer (log: $log)"
        fi
        sleep 0.2
    done
    tail -n 20 "$log" >&2 || true
    die "$what did not answer in $((tries / 5)) s (log: $log)"
}

install_packages() {
    local wanted=(slurmctld slurmd slurm-client munge) missing=()
    [[ $ACCOUNTING == 1 ]] && wanted+=(slurmdbd mariadb-server)
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $EUID == 0 ]] || die "packages missing (${missing[*]}); run as root to install them"
    command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
    say "installing ${missing[*]}"
    # Without systemd a package's postinst would try to start its daemon before it is
    # configured; a policy-rc.d that denies every start keeps apt out of it.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"$DIR/log/apt.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        apt-get update -q >>"$DIR/log/apt.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >>"$DIR/log/apt.log" 2>&1 || rc=$?
    fi
    ((added_policy)) && rm -f "$policy"
    ((rc == 0)) || die "apt-get install failed (log: $DIR/log/apt.log)"
}

node_line() {
    local detected
    detected=$(slurmd -C | head -n 1 | sed -E "s/^NodeName=[^ ]+ //")
    if [[ -n ${SLURM_LOCAL_CPUS:-} ]]; then
        echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$SLURM_LOCAL_CPUS RealMemory=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$detected")"
    else
        echo "NodeName=$HOST NodeAddr=127.0.0.1 $detected"
    fi
}

slurm_conf() {
    cat <<EOF
$MARKER
ClusterName=memctl
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_interval=5
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=$KILLWAIT
EOF
    if [[ $ACCOUNTING == 1 ]]; then
        echo "AccountingStorageType=accounting_storage/slurmdbd"
        echo "AccountingStorageHost=127.0.0.1"
    else
        echo "AccountingStorageType=accounting_storage/none"
    fi
    [[ -n ${SLURM_LOCAL_CPUS:-} ]] && echo "SlurmdParameters=config_overrides"
    node_line
    echo "PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP"
}

slurmdbd_conf() {
    cat <<EOF
$MARKER
AuthType=auth/munge
DbdAddr=127.0.0.1
DbdHost=$HOST
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
}

# Write a config file if its content changed; refuse to replace one this script did not write.
write_conf() {
    local path=$1 text=$2 mode=$3
    if [[ -e $path ]] && ! grep -qxF "$MARKER" "$path"; then
        die "$path exists and was not written by this script; not touching a real cluster's configuration"
    fi
    if [[ -e $path ]] && [[ "$(<"$path")" == "$text" ]]; then return 1; fi
    mkdir -p "$(dirname "$path")"
    printf '%s\n' "$text" >"$path"
    chmod "$mode" "$path"
    return 0
}

start_munge() {
    if alive "$DIR/munge/munged.pid"; then return 0; fi
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0 # a munged not started by us answers: use it, never stop it
    fi
    # systemd's RuntimeDirectory would create /run/munge; without systemd nobody does.
    # munged runs as munge, so its pid and log files live in a folder munge owns.
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 "$DIR/munge"
    runuser -u munge -- munged --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for munged "" "$DIR/munge/munged.log" 50 bash -c "munge -n </dev/null | unmunge"
    say "started munged"
}

start_mariadb() {
    # mariadbd runs as mysql: its data, socket, pid and log files live in a folder mysql owns.
    local home=$DIR/mariadb sock=$DIR/mariadb/mysql.sock
    if alive "$home/mariadbd.pid"; then return 0; fi
    install -d -o mysql -g mysql "$home"
    if [[ ! -d $home/data/mysql ]]; then
        install -d -o mysql -g mysql "$home/data"
        mariadb-install-db --no-defaults --datadir="$home/data" --user=mysql \
            --auth-root-authentication-method=socket >"$DIR/log/mariadb-install.log" 2>&1 ||
            die "mariadb-install-db failed (log: $DIR/log/mariadb-install.log)"
    fi
    mariadbd --no-defaults --user=mysql --datadir="$home/data" --socket="$sock" \
        --port=$DB_PORT --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$home/mariadbd.pid" --log-error="$home/mariadb.log" \
        </dev/null >/dev/null 2>&1 &
    disown
    wait_for mariadbd "" "$home/mariadb.log" 100 mariadb --no-defaults --socket="$sock" -e "SELECT 1"
    mariadb --no-defaults --socket="$sock" -e "
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
    say "started mariadbd on 127.0.0.1:$DB_PORT"
}

node_state() {
    local state
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null) || return 1
    echo "$state"
}

wait_node_idle() {
    local state
    for ((i = 0; i < 150; i++)); do
        state=$(node_state || true)
        case $state in
        idle | mixed | allocated) return 0 ;;
        down* | drain* | drained*)
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
            ;;
        esac
        sleep 0.2
    done
    tail -n 20 "$DIR/log/slurmd.log" >&2 || true
    die "node $HOST did not become idle in 30 s (state: ${state:-unknown})"
}

start() {
    mkdir -p "$DIR"/{log,run,state,spool}
    install_packages
    local changed=0
    write_conf "$CONF" "$(slurm_conf)" 644 && changed=1
    start_munge
    if [[ $ACCOUNTING == 1 ]]; then
        write_conf "$DBD_CONF" "$(slurmdbd_conf)" 600 && changed=1
        start_mariadb
        if ((changed)); then stop_pidfile slurmdbd "$DIR/run/slurmdbd.pid"; fi
        if ! alive "$DIR/run/slurmdbd.pid"; then
            rm -f "$DIR/run/slurmdbd.pid"
            slurmdbd
            wait_for slurmdbd "$DIR/run/slurmdbd.pid" "$DIR/log/slurmdbd.log" 100 \
                bash -c "exec 3<>/dev/tcp/127.0.0.1/6819"
            say "started slurmdbd"
        fi
    fi
    # slurmctld and slurmd must share one configuration (its hash is checked): restart both.
    if ((changed)); then
        stop_pidfile slurmd "$DIR/run/slurmd.pid"
        stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    fi
    if ! alive "$DIR/run/slurmctld.pid"; then
        running_named slurmctld && die "a slurmctld not started by this script is running"
        rm -f "$DIR/run/slurmctld.pid"
        slurmctld
        wait_for slurmctld "$DIR/run/slurmctld.pid" "$DIR/log/slurmctld.log" 100 scontrol ping
        say "started slurmctld"
    fi
    if ! alive "$DIR/run/slurmd.pid"; then
        running_named slurmd && die "a slurmd not started by this script is running"
        slurmd
        say "started slurmd"
    fi
    wait_node_idle
    say "cluster up: node $HOST $(node_state), KillWait=$KILLWAIT s, accounting=$ACCOUNTING"
}

stop() {
    local jobs waited=0
    if alive "$DIR/run/slurmctld.pid"; then
        # Jobs outlive slurmd (their slurmstepd runs on): cancel them and let them end.
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            while [[ -n $(squeue -h -o %A 2>/dev/null || true) ]] && ((waited < (KILLWAIT + 15) * 5)); do
                sleep 0.2
                waited=$((waited + 1))
            done
            say "cancelled jobs $(tr '\n' ' ' <<<"$jobs")"
        fi
    fi
    stop_pidfile slurmd "$DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
    stop_pidfile slurmdbd "$DIR/run/slurmdbd.pid"
    stop_pidfile mariadbd "$DIR/mariadb/mariadbd.pid"
    stop_pidfile munged "$DIR/munge/munged.pid"
}

status() {
    if scontrol ping >/dev/null 2>&1; then
        say "up: node $HOST $(node_state || echo unknown)"
    else
        say "down"
        return 1
    fi
}

case ${1:-} in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
