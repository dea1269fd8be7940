#!/bin/bash
# Self-test of jobs/demo.sbatch under real Slurm, on this one machine, as root:
#
#   apt-get install -y slurm-wlm munge    # once (Debian's 22.05); no systemd needed
#   bash jobs/slurm_selftest.sh           # about 30 s; SELFTEST_MODE=timelimit: 2-3 minutes
#
# Starts a private munged, slurmctld and slurmd (temp dir, own key, own ports, SLURM_CONF),
# submits demo.sbatch, makes it requeue itself once, and checks that the resumed job's
# final checksum equals that of a failure-free `mpiexec -n 4 ... --no-checkpoint` run.
#   SELFTEST_MODE=signal (default): once the demo has checkpointed, `scancel --batch
#     --signal=USR1` sends the script the same signal that --signal=B:USR1@N sends near the
#     time limit; its trap asks the ranks for a checkpoint, then `scontrol requeue`s the job.
#   SELFTEST_MODE=timelimit: the real thing, --time=2 --signal=B:USR1@60 (Slurm checks
#     time limits every 30 s, so the signal may come up to 30 s early), as many steps as take
#     about 75 s under mpiexec on this machine now (measured first), so the limit hits however busy it is.
#   SELFTEST_MODE=partner: jobs/partner.sbatch on two simulated nodes (HPCCKPT_NODE_OF_RANK,
#     a {node} root); rank 2 is killed on the first attempt and node 1's directory removed,
#     and the second attempt must resume from the partner level.
# Whatever happens, the daemons it started are stopped (by PID) and its temp dirs removed.
set -euo pipefail
mode=${SELFTEST_MODE:-signal}
sbatch_file=$(cd "$(dirname "$0")" && pwd)/$([ "$mode" = partner ] && echo partner.sbatch || echo demo.sbatch)
steps=${SELFTEST_STEPS:-$(case $mode in timelimit) echo calibrate ;; partner) echo 60 ;; *) echo 6000 ;; esac)}
args=(--steps "$steps" --nx 256 --ny 256 --particles 20000 --checkpoint-every 10)
if [ "$steps" = calibrate ]; then  # about 75 s of mpiexec's work now: longer than the 60 s before the signal, so the limit hits, busy or not
    c0=$(date +%s%N)
    mpiexec -n 4 python -m hpcckpt.demo --no-checkpoint --quiet "${args[@]/calibrate/3000}" > /dev/null
    steps=$(( 3000 * 75000000000 / ($(date +%s%N) - c0) ))
    args[1]=$steps
fi
export HPCCKPT_GRACE=${HPCCKPT_GRACE:-1}  # seconds from USR1 to requeue; the demo must outlast it
t0=$(date +%s)
T=$(mktemp -d /tmp/hpcckpt-slurm.XXXXXX) && chmod 711 "$T"  # munged wants the dir traversable
heaps=$(mktemp -d /dev/shm/hpcckpt-slurm.XXXXXX)  # fresh heaps
export HPCCKPT_ROOT=$heaps
export SLURM_CONF=$T/slurm.conf
pids=() jid= result=FAIL

fnv1a() {  # 32-bit FNV-1a of $1 in hex, as MPICH hashes its PMI job id
    local h=2166136261 i c
    for ((i = 0; i < ${#1}; i++)); do printf -v c %d "'${1:i:1}"; h=$(( ((h ^ c) * 16777619) & 0xffffffff )); done
    printf %x "$h"
}
finish() {
    set +e
    [ -n "$jid" ] && scancel "$jid" 2>/dev/null && for _ in $(seq 20); do  # let its steps end
        squeue -h -j "$jid" 2>/dev/null | grep -q . || break; sleep 1; done
    for s in 0 1 2 3; do  # MPICH segments a killed step of our job left (see demo.sbatch)
        [ -n "$jid" ] && h=$(fnv1a "$jid.$s") && rm -f /dev/shm/mpich_{shm,vci}_"$h"_*; done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do  # slurmd, slurmctld, then munged
        kill "${pids[i]}" 2>/dev/null; wait "${pids[i]}" 2>/dev/null; done
    if [ "$result" != PASS ]; then
        for f in "$T"/demo.out "$T"/*.log "$T"/*.err; do [ -s "$f" ] && { echo "== $f"; tail -n 6 "$f"; }; done
    fi
    rm -rf "$T" "$heaps"
    echo "$result: jobs/$(basename "$sbatch_file") under Slurm ($mode mode, $(( $(date +%s) - t0 )) s)"
    [ "$result" = PASS ] && exit 0 || exit 1
}
trap finish EXIT
trap 'exit 1' INT TERM HUP  # so that the EXIT trap also cleans up after ^C or kill
die() { echo "selftest: $*" >&2; exit 1; }

# munge with a key of its own, on a socket of its own
dd if=/dev/urandom of="$T/munge.key" bs=1024 count=1 status=none && chmod 400 "$T/munge.key"
munged -F --force --socket="$T/munge.sock" --key-file="$T/munge.key" --pid-file="$T/munged.pid" \
    --seed-file="$T/munge.seed" --log-file="$T/munged.log" 2>"$T/munged.err" & pids+=($!)

H=$(hostname -s) port=$(( 20000 + RANDOM % 20000 ))
mkdir "$T/state" "$T/spool"
cat > "$SLURM_CONF" <<EOF
ClusterName=selftest
SlurmctldHost=$H
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
SlurmdPort=$(( port + 1 ))
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s; minimum 5)
AuthInfo=socket=$T/munge.sock,cred_expire=10
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
# random first job id: MPICH's /dev/shm segments are named after the job id (see demo.sbatch)
FirstJobId=$(( 100000 + RANDOM * 100 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
NodeName=$H CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
for _ in $(seq 50); do [ -S "$T/munge.sock" ] && break; sleep 0.2; done
slurmctld -D 2>"$T/slurmctld.err" & pids+=($!)  # in the foreground, so that $! is its PID
slurmd -D 2>"$T/slurmd.err" & pids+=($!)
for _ in $(seq 60); do [ "$(sinfo -h -n "$H" -o %t 2>/dev/null)" = idle ] && break; sleep 0.5; done
[ "$(sinfo -h -n "$H" -o %t)" = idle ] || die "node $H is not idle: $(sinfo -h -n "$H" -o '%t %E')"
echo "selftest: Slurm up on $H after $(( $(date +%s) - t0 )) s"

# 4 ranks on however few CPUs: --overcommit. Output goes to one file over both attempts.
opts=(--parsable --overcommit --chdir="$T" --output="$T/demo.out")
[ "$mode" = timelimit ] && opts+=(--time=2 --signal=B:USR1@60)
if [ "$mode" = partner ]; then  # two simulated nodes on this one: the node count of the script is overridden
    opts+=(--nodes=1)
    export HPCCKPT_NODE_OF_RANK=0,0,1,1 HPCCKPT_ROOT="$heaps/node{node}" HPCCKPT_LOSE_NODE=1
    args+=(--kill-rank 2 --kill-at-step 25)
fi
jid=$(sbatch "${opts[@]}" "$sbatch_file" "${args[@]}")
echo "selftest: submitted job $jid: demo.sbatch ${args[*]}"
if [ "$mode" = signal ]; then  # (partner mode needs nothing from here: it fails and recovers by itself)
    for _ in $(seq 300); do grep -q ' epoch ' "$T/demo.out" 2>/dev/null && break; sleep 0.2; done
    grep -q ' epoch ' "$T/demo.out" || die "the demo took no checkpoint"
    scancel --batch --signal=USR1 "$jid"
fi
state=
for _ in $(seq 600); do  # until the job has finished, however many attempts it took
    state=$(scontrol show job "$jid" -o | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
    case $state in PENDING | RUNNING | REQUEUE* | COMPLETING | CONFIGURING | RESIZING) sleep 1 ;; *) break ;; esac
done
echo "selftest: job $jid ${state:-?} after $(( $(date +%s) - t0 )) s; its output:"
{ grep -v '^step ' "$T/demo.out" || true; } | sed 's/^/    /'

cd "$T"  # outside the source tree: import the installed hpcckpt
[ "$mode" = partner ] && args=("${args[@]:0:${#args[@]}-4}")  # the failure-free run kills nobody
want=$(env -u HPCCKPT_NODE_OF_RANK mpiexec -n 4 python -m hpcckpt.demo --no-checkpoint --quiet "${args[@]}" | tail -n 1)
got=$(grep '^checksum:' "$T/demo.out" | tail -n 1 || true)
[ "$state" = COMPLETED ] || die "job ended $state"
if [ "$mode" = partner ]; then
    grep -q 'attempt 1 failed' "$T/demo.out" || die "the first attempt did not fail"
    grep -q 'losing node 1' "$T/demo.out" || die "node 1 was not lost"
    grep -q '(partner level)' "$T/demo.out" || die "the second attempt did not resume from the partner level"
    [ "$got" = "$want" ] || die "checksum after losing a node '$got', failure-free '$want'"
    echo "selftest: after losing node 1, $got = failure-free run"
    result=PASS
    exit 0
fi
grep -q '(asked by SIGUSR1)' "$T/demo.out" || die "no checkpoint was asked for by SIGUSR1"
grep -q '^job .* attempt 2 ' "$T/demo.out" || die "the job was not requeued"
grep -q 'resumed from epoch' "$T/demo.out" || die "the requeued job did not resume from a checkpoint"
[ "$got" = "$want" ] || die "checksum after requeue '$got', failure-free '$want'"
echo "selftest: after the requeue, $got = failure-free run"
result=PASS
