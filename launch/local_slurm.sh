#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for development and CI: the launch scripts and the
# SLURM-aware code (Lightning's SLURM environment, requeue) are exercised against real slurmctld/slurmd
# daemons, not mocks. A real cluster has its own admins and configuration; nothing here is meant for one.
#
#   launch/local_slurm.sh start  [DIR]   # install SLURM if missing (apt), start it, wait until it runs jobs
#   launch/local_slurm.sh stop   [DIR]   # cancel its jobs, stop the daemons (by their PID files); keeps DIR/log
#   launch/local_slurm.sh status [DIR]   # exit 0 when both daemons run
#   launch/local_slurm.sh env    [DIR]   # eval "$(launch/local_slurm.sh env)" points sbatch/srun/squeue at it
#
# DIR (default ${CSM_SLURM_DIR:-/tmp/csm-slurm}) holds slurm.conf, state, spool, PID files and logs; nothing
# under /etc is touched, so several clusters can run side by side. Their ports come from DIR (a hash) unless
# CSM_SLURM_PORT_BASE is set (slurmctld on the base, slurmd on base+1). CSM_SLURM_CPUS overrides the node's
# CPU count (default: nproc; more than the machine has is allowed). CSM_SLURM_TIMEOUT: seconds start waits for
# the cluster (default 60). Exit codes: 0 ok, 1 failure, 2 usage, 3 not possible on this machine (SLURM missing and
# no apt-get to install it, or no root/passwordless sudo for apt and the daemons).
#
# Facts that matter (Debian bookworm, SLURM 22.05; root or passwordless sudo; no systemd needed):
# * apt packages slurmctld slurmd slurm-client (~10 s; they pull munge, which is not used here).
# * AuthType=auth/none + CredType=cred/none: no munge daemon, key or socket. Fine for one trusted machine; a
#   real cluster uses munge.
# * The daemons run as root (sudo when not root) so that jobs run as the submitting user; SlurmUser=root.
#   Their logs are root's (mode 600) until `stop` hands DIR back to the user.
# * ProctrackType=proctrack/linuxproc + TaskPlugin=task/none: no cgroups needed (containers, CI runners).
# * The hostname is not "localhost": the node is NodeName=localhost and slurmd is started with -N localhost.
# * Clients need SLURM_CONF (see `env`); sudo drops it, so pass it through `env` when needed.
# * "Ready" is more than an idle node in sinfo: slurmctld restores the node's last state from its state files
#   before slurmd registers (so start also waits for slurmd's SlurmdStartTime), and its main scheduler first
#   runs ~3 s after it starts (so start waits for sdiag's first cycle).
# * Speed: SchedulerParameters=batch_sched_delay=0 (else ~3 s between back-to-back jobs) and sched_interval=1
#   (a requeued job is otherwise started by the next full scheduling pass, up to 60 s later); a requeued job
#   first waits AuthInfo's cred_expire + 1 s (default 120; 5 is the minimum, smaller values are ignored);
#   KillWait=10 (SIGTERM to SIGKILL: a training job saves its checkpoint in between). `sbatch --wait` polls
#   with a 2 s+ interval: a job takes >= 2 s with it.
# * No accounting (slurmdbd): no sacct. Finished jobs stay visible to squeue/scontrol for MinJobAge (60 s),
#   then vanish (submitit reads their state as UNKNOWN).
# * slurmd and slurmctld log "can not load PMIx library" errors at start: harmless (MpiDefault=none).
# * stop cancels the cluster's jobs first: their processes would outlive slurmd.
set -euo pipefail

usage() {
  sed -n '6,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}
CMD=${1:-}
DIR=${2:-${CSM_SLURM_DIR:-/tmp/csm-slurm}}
[[ $DIR = /* ]] || DIR="$PWD/$DIR"
DIR=${DIR%/}
CONF=$DIR/slurm.conf
TIMEOUT=${CSM_SLURM_TIMEOUT:-60}
export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live in /usr/sbin, not on a normal user's PATH
SUDO=()
[ "$(id -u)" = 0 ] || SUDO=(sudo -n)
DAEMONS=(slurmctld slurmd)

log() { echo "local_slurm: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# The PID of a live daemon of *this* cluster (its command line names our slurm.conf), or nothing.
live_pid() {
  local file=$DIR/run/$1.pid pid
  [ -s "$file" ] || return 0
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- " $CONF " && echo "$pid"
  return 0
}

running() { [ -r "/proc/$1/stat" ] && [ "$(sed 's/.*) //' "/proc/$1/stat" | cut -c1)" != Z ]; }  # zombies: gone

logs_tail() {  # the daemons' logs are root's, mode 600
  local f
  for f in "$DIR"/log/*; do
    [ -s "$f" ] || continue
    echo "----- $f (last 15 lines)"
    "${SUDO[@]}" tail -n 15 "$f"
  done >&2
  ! "${SUDO[@]}" grep -qs "Address already in use" "$DIR"/log/* || log "a port is taken: set CSM_SLURM_PORT_BASE"
}

install_slurm() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null && return 0
  local fix="install SLURM yourself (Debian/Ubuntu: apt-get install slurmctld slurmd slurm-client) and run again"
  command -v apt-get >/dev/null || {
    log "SLURM is not installed and apt-get is unavailable: $fix"
    exit 3
  }
  if [ ${#SUDO[@]} -gt 0 ] && ! sudo -n true 2>/dev/null; then
    log "SLURM is not installed and installing it needs root (passwordless sudo is unavailable): $fix"
    exit 3
  fi
  log "installing SLURM (apt-get install slurmctld slurmd slurm-client) ..."
  local apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
    slurmctld slurmd slurm-client)
  "${apt[@]}" >/dev/null 2>&1 || { "${SUDO[@]}" apt-get update -qq >/dev/null 2>&1 && "${apt[@]}" >/dev/null; } || {
    log "apt-get could not install SLURM: $fix"
    exit 3
  }
}

port_base() {
  if [ -n "${CSM_SLURM_PORT_BASE:-}" ]; then
    echo "$CSM_SLURM_PORT_BASE"
  else  # 20000..29998, below the ephemeral range; two DIRs collide with a probability of 1/5000
    echo $((20000 + ($(printf %s "$DIR" | cksum | cut -d' ' -f1) % 5000) * 2))
  fi
}

write_conf() {
  local cpus mem port
  cpus=${CSM_SLURM_CPUS:-$(nproc)}
  mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)  # MiB; slurmd drains a node that has less
  port=$(port_base)
  mkdir -p "$DIR"/{state,spool,run,log}
  cat >"$CONF" <<EOF
# written by launch/local_slurm.sh: a single-node cluster for development and CI
ClusterName=csm
SlurmctldHost=localhost
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# a requeued job waits cred_expire seconds before it runs again (default 120)
AuthInfo=cred_expire=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=10
MinJobAge=60
InactiveLimit=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { SLURM_CONF=$CONF sinfo -h -N -n localhost -o %T 2>/dev/null || true; }
# When slurmd last registered with slurmctld (epoch seconds; 0 when unknown). slurmctld restores the node's last
# state ("idle") from its state files, so an idle node alone does not prove that a new slurmd is up.
slurmd_registered() {
  local t
  t=$(SLURM_CONF=$CONF scontrol show node localhost -o 2>/dev/null | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
  date -d "${t:-@0}" +%s 2>/dev/null || echo 0
}
# Whether slurmctld's main scheduler has run (it first does ~3 s after start; jobs submitted earlier wait for it).
# Yes also when sdiag is not allowed here.
scheduler_ran() {
  local out
  out=$(SLURM_CONF=$CONF sdiag 2>/dev/null) || return 0
  [ "$(awk '/^Main schedule/ {m = 1} m && /Total cycles/ {print $3; exit}' <<<"$out")" != 0 ]
}

start() {
  local d pid alive=() dead=()
  for d in "${DAEMONS[@]}"; do
    if [ -n "$(live_pid "$d")" ]; then alive+=("$d"); else dead+=("$d"); fi
  done
  if [ ${#dead[@]} -eq 0 ]; then
    log "already running in $DIR (slurmctld $(live_pid slurmctld), slurmd $(live_pid slurmd)): nothing to do"
    return 0
  fi
  install_slurm
  [ ${#SUDO[@]} -eq 0 ] || sudo -n true 2>/dev/null || {
    log "the daemons run as root: run this as root or with passwordless sudo"
    exit 3
  }
  if [ ${#alive[@]} -eq 0 ]; then
    rm -f "$DIR"/run/*.pid  # stale
    write_conf
  fi
  local t0
  t0=$(date +%s)
  if [ "${dead[*]}" = slurmd ] && [ "$(slurmd_registered)" -ge "$t0" ]; then
    sleep 1  # a slurmd registered this very second: make the next registration tell apart
    t0=$(date +%s)
  fi
  for d in "${dead[@]}"; do
    rm -f "$DIR/run/$d.pid"
    case $d in
      slurmctld) "${SUDO[@]}" slurmctld -f "$CONF" -i 2>>"$DIR/log/slurmctld.stderr" ;;
      slurmd) "${SUDO[@]}" slurmd -f "$CONF" -N localhost 2>>"$DIR/log/slurmd.stderr" ;;
    esac || {
      logs_tail
      die "$d did not start (logs above, all under $DIR/log)"
    }
  done
  local deadline=$((SECONDS + TIMEOUT)) state='' waiting=''
  while :; do
    state=$(node_state)
    case $state in
      idle | mixed | allocated | completing)
        if [[ " ${dead[*]} " = *" slurmd "* ]] && [ "$(slurmd_registered)" -lt "$t0" ]; then
          waiting="slurmd to register"
        elif [[ " ${dead[*]} " = *" slurmctld "* ]] && ! scheduler_ran; then
          waiting="the scheduler's first pass"
        else
          break
        fi
        ;;
      *) waiting="the node to be idle (sinfo: '${state:-no answer}')" ;;
    esac
    for d in "${DAEMONS[@]}"; do  # daemonized: a PID file within seconds, then a live process
      [ -n "$(live_pid "$d")" ] || { [ ! -s "$DIR/run/$d.pid" ] && [ $SECONDS -lt $((deadline - TIMEOUT + 5)) ]; } || {
        logs_tail
        die "$d is not running (logs above, all under $DIR/log)"
      }
    done
    [ $SECONDS -lt $deadline ] || {
      logs_tail
      die "not ready after ${TIMEOUT}s: still waiting for $waiting (logs above, all under $DIR/log)"
    }
    sleep 0.2
  done
  log "running in $DIR (slurmctld $(live_pid slurmctld), slurmd $(live_pid slurmd), node $state);" \
    "use it with: eval \"\$($0 env $DIR)\""
}

stop() {
  local d pid jobs i j
  if [ -n "$(live_pid slurmctld)" ]; then  # jobs' processes outlive slurmd: cancel them first
    jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086  # one job id a word
      "${SUDO[@]}" env SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do
        [ -z "$(SLURM_CONF=$CONF squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && break
        sleep 0.2
      done
    fi
  fi
  local pids=() names=()
  for d in "${DAEMONS[@]}"; do
    pid=$(live_pid "$d")
    [ -n "$pid" ] || continue
    "${SUDO[@]}" kill "$pid" 2>/dev/null || true
    pids+=("$pid")
    names+=("$d")
  done
  for i in "${!pids[@]}"; do  # slurmctld saves its state first: ~2 s
    pid=${pids[$i]}
    for ((j = 0; j < 150; j++)); do
      running "$pid" || break
      sleep 0.1
    done
    ! running "$pid" || "${SUDO[@]}" kill -9 "$pid" 2>/dev/null || true
    log "stopped ${names[$i]} ($pid)"
  done
  [ ${#pids[@]} -gt 0 ] || log "not running in $DIR: nothing to stop"
  "${SUDO[@]}" rm -f "$DIR"/run/*.pid
  # the daemons ran as root (sudo): hand their files (logs, state) back, so that the user can read and delete them
  [ ${#SUDO[@]} -eq 0 ] || [ ! -d "$DIR" ] || "${SUDO[@]}" chown -R "$(id -u):$(id -g)" "$DIR"
}

status() {
  local d pid rc=0
  for d in "${DAEMONS[@]}"; do
    pid=$(live_pid "$d")
    if [ -n "$pid" ]; then echo "$d: running ($pid)"; else
      echo "$d: not running"
      rc=1
    fi
  done
  [ $rc -ne 0 ] || echo "node localhost: $(node_state)"
  return $rc
}

case $CMD in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$(printf %q "$CONF")" ;;
  *) usage ;;
esac
