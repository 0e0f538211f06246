# Shared logic of the Slurm job scripts (slurm/*.sh); see docs/multinode.md.
#
# Two roles:
#   * sourced by a job script (the batch shell on the first node of the allocation): `memtrain_main` reads the
#     environment variables below, prints what it will run, launches the training with srun, forwards the
#     preemption signal, and requeues the job when the trainer saved because of a signal or the wall-time guard;
#   * executed by every srun task (`bash slurm/common.sh --task -- pretrain/train.py ...`): starts the launcher
#     of this node (torchrun, DeepSpeed's per-node launcher) or the trainer itself (one task per process).
#
# Environment variables (all optional; `VAR=value sbatch slurm/lamemo_large.sh`, sbatch passes them on):
#   REPO_DIR            repository root on the shared filesystem (default: the directory sbatch was run from)
#   PYTHON              interpreter (default: $REPO_DIR/.venv/bin/python when it exists, else python3)
#   PRESET              --config: a preset name in pretrain/configs or a YAML file
#   DATA_PATH           --data-path: the dataset prefix written by data_tools/preprocess.py
#   DS_CONFIG           --ds_config: a DeepSpeed JSON (ds_configs/...)
#   RUN_DIR             --save: checkpoints, metrics.jsonl, config (default: runs/<job name>); a requeued or
#                       resubmitted job with the same RUN_DIR resumes from its latest checkpoint
#   TRAIN_ARGS          more trainer options, split on whitespace and appended last (they win over the above)
#   LAUNCHER            torchrun (default) | srun | deepspeed | deepspeed-nossh
#   TORCHRUN_RDZV       c10d (default: ranks by arrival) | static (--node_rank $SLURM_NODEID: node k holds
#                       ranks k*NPROC_PER_NODE ...)
#   GPUS_PER_NODE       GPUs used per node (default: $SLURM_GPUS_ON_NODE, else `nvidia-smi -L`, else 0);
#                       0 = CPU mode: gloo, DS_ACCELERATOR=cpu, no GPU visible
#   NPROC_PER_NODE      training processes per node (default: GPUS_PER_NODE, or 1 in CPU mode)
#   GLOBAL_BATCH        rows per optimizer step over all data-parallel ranks: sets --micro-batch-size to
#                       GLOBAL_BATCH / data-parallel size (empty: the preset's micro batch per rank)
#   TP                  tensor-parallel size (default 1)
#   MASTER_ADDR         rendezvous host (default: the first host of the allocation)
#   MASTER_PORT         rendezvous port (default: 20000 + job id mod 20000)
#   EXIT_MARGIN_MINS    wall-time guard: save and stop this many minutes before the job's time limit (default 10)
#   EXIT_DURATION_MINS  set the guard directly (minutes of training; 0 = off); wins over EXIT_MARGIN_MINS
#   REQUEUE             1 (default): requeue the job after a save on a signal or the wall-time guard; 0: don't
#   MAX_REQUEUES        stop requeueing after this many restarts of the job (default 50)
#   SRUN_ARGS           more srun options for the training step (split on whitespace)
# NCCL and gloo variables (NCCL_SOCKET_IFNAME, NCCL_IB_*, GLOO_SOCKET_IFNAME, ...) pass through to every rank;
# TORCH_NCCL_ASYNC_ERROR_HANDLING defaults to 1 (a failed or timed-out collective ends the process, and
# srun --kill-on-bad-exit=1 then ends the job).

_ms_log() { echo "[memtrain-slurm] $*"; }
_ms_die() { echo "[memtrain-slurm] error: $*" >&2; exit 2; }

# "[D-]HH:MM:SS", "MM:SS" or "SS" (squeue's %L) -> seconds; empty for UNLIMITED / NOT_SET / INVALID
_ms_seconds() {
    local t=$1 d=0 a b c
    [[ $t =~ ^[0-9:-]+$ ]] || return 0
    if [[ $t == *-* ]]; then d=${t%%-*}; t=${t#*-}; fi
    IFS=: read -r a b c <<< "$t"
    if [ -n "$c" ]; then echo $(( 10#$d * 86400 + 10#$a * 3600 + 10#$b * 60 + 10#$c ))
    elif [ -n "$b" ]; then echo $(( 10#$d * 86400 + 10#$a * 60 + 10#$b ))
    elif [[ $1 == *-* ]]; then echo $(( 10#$d * 86400 + 10#$a * 3600 ))   # "D-HH"
    else echo $(( 10#$a ))
    fi
}

# The newest complete checkpoint of $RUN_DIR (iter_N with a readable memtrain/meta.json), the one the trainer
# resumes from whatever `latest` names, as "TAG<TAB>REASON<TAB>STEP<TAB>WRITTEN" (WRITTEN: meta.json's mtime in ns,
# which tells a new save of a step from an older one); nothing when there is none.
_ms_latest() {
    "$PYTHON" - "$RUN_DIR" <<'PY'
import json, os, re, sys
d = sys.argv[1]
try:
    tags = [n for n in os.listdir(d) if re.fullmatch(r"iter_\d+", n)]
except OSError:
    sys.exit(0)
for tag in sorted(tags, key=lambda n: int(n[5:]), reverse=True):
    path = os.path.join(d, tag, "memtrain", "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
        written = os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        continue
    print(f"{tag}\t{meta.get('reason', '')}\t{meta.get('step', '')}\t{written}")
    break
PY
}

# Whether a checkpoint's reason asks for a requeue: the trainer stopped on a signal or the wall-time guard.
# A step saves once with every reason that met there, joined by " + " ("interval + signal SIGUSR1"); a part
# "signal ..." or "exit duration ..." asks for a requeue, also with "end" ("end + signal SIGTERM": the last step was
# saved but the stop came before the final evaluation and export, which the requeued job runs without training or
# saving again; its unchanged checkpoint then ends the chain, see "no new checkpoint" below).
_ms_wants_requeue() {
    local rest=$1 part want=1
    while [ -n "$rest" ]; do
        part=${rest%% + *}
        if [ "$part" = "$rest" ]; then rest=""; else rest=${rest#* + }; fi
        case $part in
            signal\ *|exit\ duration\ *) want=0 ;;
        esac
    done
    return $want
}

_ms_on_signal() {
    local sig=$1
    _MS_SIGNAL=$sig
    _ms_log "$(date '+%F %T') batch shell received SIG$sig: forwarding it to the training processes (they save a checkpoint at the end of the current step and exit)"
    # every process of every job step (not the batch step): the trainer ranks, and the launchers that ignore it
    scancel --signal="$sig" "$SLURM_JOB_ID" || _ms_log "scancel --signal=$sig failed"
}

memtrain_main() {
    set -uo pipefail
    [ -n "${SLURM_JOB_ID:-}" ] || _ms_die "not inside a Slurm job: submit with sbatch (see docs/multinode.md)"
    [ -f "$REPO_DIR/pretrain/train.py" ] || _ms_die "REPO_DIR=$REPO_DIR has no pretrain/train.py: submit from the repository root or set REPO_DIR"
    cd "$REPO_DIR" || exit 2
    if [ -z "${PYTHON:-}" ]; then
        if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON=$REPO_DIR/.venv/bin/python; else PYTHON=python3; fi
    fi
    : "${LAUNCHER:=torchrun}" "${TORCHRUN_RDZV:=c10d}" "${TP:=1}" "${EXIT_MARGIN_MINS:=10}"
    : "${REQUEUE:=1}" "${MAX_REQUEUES:=50}" "${RUN_DIR:=runs/${SLURM_JOB_NAME:-memtrain}}"
    : "${PRESET:?set PRESET}" "${DATA_PATH:?set DATA_PATH}" "${DS_CONFIG:?set DS_CONFIG}"
    case $LAUNCHER in torchrun|srun|deepspeed|deepspeed-nossh) ;;
        *) _ms_die "LAUNCHER=$LAUNCHER: expected torchrun, srun, deepspeed or deepspeed-nossh" ;; esac
    case $TORCHRUN_RDZV in c10d|static) ;; *) _ms_die "TORCHRUN_RDZV=$TORCHRUN_RDZV: expected c10d or static" ;; esac
    [ -f "$DS_CONFIG" ] || _ms_die "DS_CONFIG=$DS_CONFIG: no such file"
    local v
    for v in TP MAX_REQUEUES; do
        [[ ${!v} =~ ^[0-9]+$ ]] || _ms_die "$v=${!v}: expected a whole number"
    done
    [ "$TP" -ge 1 ] || _ms_die "TP=$TP: expected a number >= 1"
    [[ ${GLOBAL_BATCH:-1} =~ ^[1-9][0-9]*$ ]] || _ms_die "GLOBAL_BATCH=$GLOBAL_BATCH: expected a number >= 1 (or empty: the preset's micro batch)"
    for v in EXIT_MARGIN_MINS EXIT_DURATION_MINS; do
        [[ ${!v:-0} =~ ^[0-9]+([.][0-9]*)?$ ]] || _ms_die "$v=${!v}: expected minutes (a number >= 0)"
    done

    # devices and processes
    if [ -z "${GPUS_PER_NODE:-}" ]; then
        GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-}
        if [ -z "$GPUS_PER_NODE" ]; then
            GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        fi
        GPUS_PER_NODE=${GPUS_PER_NODE:-0}
    fi
    [[ $GPUS_PER_NODE =~ ^[0-9]+$ ]] || _ms_die "GPUS_PER_NODE=$GPUS_PER_NODE: expected a number (0 = CPU)"
    if [ "$GPUS_PER_NODE" -gt 0 ]; then : "${NPROC_PER_NODE:=$GPUS_PER_NODE}"; DEVICE="GPU (nccl)"
    else
        : "${NPROC_PER_NODE:=1}"; DEVICE="CPU (gloo)"
        export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""
        export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    fi
    [[ $NPROC_PER_NODE =~ ^[1-9][0-9]*$ ]] || _ms_die "NPROC_PER_NODE=$NPROC_PER_NODE: expected a number >= 1"

    # hosts, world, rendezvous
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    [ "${#HOSTS[@]}" -eq "$NNODES" ] || _ms_die "scontrol show hostnames gave ${#HOSTS[@]} hosts for $NNODES nodes"
    WORLD_SIZE=$(( NNODES * NPROC_PER_NODE ))
    (( WORLD_SIZE % TP == 0 )) || _ms_die "world size $WORLD_SIZE is not a multiple of TP=$TP"
    DP_SIZE=$(( WORLD_SIZE / TP ))
    export MASTER_ADDR=${MASTER_ADDR:-${HOSTS[0]}}
    export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    case ":${PYTHONPATH:-}:" in *":$REPO_DIR:"*) ;; *) export PYTHONPATH=$REPO_DIR${PYTHONPATH:+:$PYTHONPATH} ;; esac
    export WANDB_MODE=${WANDB_MODE:-offline}
    RESTART=${SLURM_RESTART_COUNT:-0}

    # trainer arguments
    local -a args extra srun_extra
    args=(pretrain/train.py --config "$PRESET" --ds_config "$DS_CONFIG" --data-path "$DATA_PATH" --save "$RUN_DIR")
    [ "$TP" -gt 1 ] && args+=(--tensor-model-parallel-size "$TP")
    if [ -n "${GLOBAL_BATCH:-}" ]; then
        (( GLOBAL_BATCH % DP_SIZE == 0 )) || _ms_die "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of the data-parallel size $DP_SIZE ($NNODES nodes x $NPROC_PER_NODE processes / TP $TP)"
        args+=(--micro-batch-size $(( GLOBAL_BATCH / DP_SIZE )))
    fi
    # wall-time guard: Megatron's --exit-duration-in-mins, from the time this job has left
    local left left_s guard
    if [ -n "${EXIT_DURATION_MINS:-}" ]; then
        guard=$EXIT_DURATION_MINS; left="(EXIT_DURATION_MINS)"
    else
        left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null | head -n 1)
        left_s=$(_ms_seconds "$left")
        if [ -n "$left_s" ]; then
            guard=$(awk -v t="$left_s" -v m="$EXIT_MARGIN_MINS" 'BEGIN { printf "%.2f", t / 60 - m }')
            awk -v g="$guard" 'BEGIN { exit !(g > 0) }' || _ms_die "the job has $left left, not more than EXIT_MARGIN_MINS=$EXIT_MARGIN_MINS minutes: ask for a longer --time or lower EXIT_MARGIN_MINS"
        else
            guard=0
        fi
    fi
    if awk -v g="$guard" 'BEGIN { exit !(g > 0) }'; then args+=(--exit-duration-in-mins "$guard"); fi
    read -r -a extra <<< "${TRAIN_ARGS:-}"
    args+=("${extra[@]}")
    read -r -a srun_extra <<< "${SRUN_ARGS:-}"

    mkdir -p "$RUN_DIR"
    _ms_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME), restart $RESTART: $NNODES nodes (${HOSTS[*]}), $NPROC_PER_NODE processes per node, world size $WORLD_SIZE (data-parallel $DP_SIZE x tensor-parallel $TP), $DEVICE"
    _ms_log "launcher $LAUNCHER, rendezvous $MASTER_ADDR:$MASTER_PORT, run directory $RUN_DIR"
    _ms_log "wall-time guard: $left left -> --exit-duration-in-mins $guard (0 = off; margin $EXIT_MARGIN_MINS min)"
    local before
    before=$(_ms_latest)
    if [ -n "$before" ]; then _ms_log "resuming: $RUN_DIR has checkpoint $(cut -f1 <<< "$before")"; fi

    export MEMTRAIN_LAUNCHER=$LAUNCHER MEMTRAIN_RDZV=$TORCHRUN_RDZV MEMTRAIN_NPROC=$NPROC_PER_NODE
    export MEMTRAIN_NNODES=$NNODES MEMTRAIN_PYTHON=$PYTHON MEMTRAIN_RDZV_ID="$SLURM_JOB_ID-$RESTART"
    local -a cmd gpu_step=()
    [ "$GPUS_PER_NODE" -gt 0 ] && gpu_step=(--gpus-per-node="$GPUS_PER_NODE")
    local task=(bash "$REPO_DIR/slurm/common.sh" --task --)
    case $LAUNCHER in
        torchrun|deepspeed-nossh)   # one task per node; it starts NPROC_PER_NODE processes
            cmd=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1
                 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" "${gpu_step[@]}" "${srun_extra[@]}" "${task[@]}" "${args[@]}")
            if [ "$LAUNCHER" = deepspeed-nossh ]; then
                local hostfile=$RUN_DIR/hostfile
                printf '%s slots='"$NPROC_PER_NODE"'\n' "${HOSTS[@]}" > "$hostfile.tmp$$" && mv "$hostfile.tmp$$" "$hostfile"
                export MEMTRAIN_HOSTFILE=$hostfile
            fi ;;
        srun)                       # one task per process; dist.py maps SLURM_PROCID/LOCALID/STEP_NUM_TASKS
            cmd=(srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$NPROC_PER_NODE"
                 "${gpu_step[@]}" "${srun_extra[@]}" "${task[@]}" "$PYTHON" -u "${args[@]}") ;;
        deepspeed)                  # DeepSpeed's runner on this node; its slurm launcher calls srun (no ssh)
            local hostfile=$RUN_DIR/hostfile
            printf '%s slots='"$NPROC_PER_NODE"'\n' "${HOSTS[@]}" > "$hostfile.tmp$$" && mv "$hostfile.tmp$$" "$hostfile"
            local largs="--kill-on-bad-exit=1 --nodes=$NNODES --ntasks-per-node=$NPROC_PER_NODE ${gpu_step[*]} ${srun_extra[*]}"
            cmd=(bash -c 'trap "" USR1; exec "$@"' _ "$PYTHON" -m deepspeed.launcher.runner --hostfile "$hostfile"
                 --launcher slurm --launcher_args "$largs" --force_multi --no_ssh_check
                 --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${args[@]}") ;;
    esac
    _ms_log "command: ${cmd[*]}"

    _MS_SIGNAL=""
    trap '_ms_on_signal USR1' USR1
    trap '_ms_on_signal USR2' USR2
    "${cmd[@]}" &
    local pid=$! rc
    while :; do
        wait "$pid"; rc=$?
        kill -0 "$pid" 2>/dev/null || break   # still running: wait was interrupted by a trapped signal
    done
    trap - USR1 USR2
    rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$MASTER_PORT"_* 2>/dev/null   # DeepSpeed's CPU shm buffers

    local latest tag reason step
    latest=$(_ms_latest)
    IFS=$'\t' read -r tag reason step _ <<< "$latest"
    if [ "$rc" -ne 0 ]; then
        _ms_log "training failed with exit status $rc${tag:+ (latest checkpoint $tag, $reason)}; not requeued"
        return "$rc"
    fi
    if [ -n "$tag" ] && [ "$latest" = "$before" ] && _ms_wants_requeue "$reason"; then
        # the run saved nothing (it resumed at or past --train-iters, or its save was refused): the reason is the
        # previous run's, and a requeue would only start the same run again
        _ms_log "no new checkpoint since $tag ($reason); not requeued"
        return 0
    fi
    if ! _ms_wants_requeue "$reason"; then
        _ms_log "done${tag:+: latest checkpoint $tag ($reason)}"
    elif [ "$REQUEUE" != 1 ]; then
        _ms_log "saved $tag ($reason); REQUEUE=$REQUEUE: not requeued, resubmit with RUN_DIR=$RUN_DIR to continue"
    elif [ "$RESTART" -ge "$MAX_REQUEUES" ]; then
        _ms_log "saved $tag ($reason); restart $RESTART reached MAX_REQUEUES=$MAX_REQUEUES: not requeued"
    else
        _ms_log "saved $tag at step $step ($reason): requeueing job $SLURM_JOB_ID (restart $((RESTART + 1))); it resumes from $RUN_DIR/$tag"
        scontrol requeue "$SLURM_JOB_ID" || { _ms_log "scontrol requeue failed"; return 1; }
    fi
    return 0
}

# ---------------------------------------------------------------------------------------------- srun task
# Runs on every node (or every process with LAUNCHER=srun).  SIGUSR1 is ignored here and by the launcher it
# execs; the trainer installs its own handler, so a preemption signal sent to the whole step reaches the ranks
# and does not kill torchrun / DeepSpeed's launcher on the way.
memtrain_task() {
    trap '' USR1 USR2
    local node=${SLURMD_NODENAME:-$(hostname)}
    if [ "${SLURM_LOCALID:-0}" = 0 ]; then
        _ms_log "node $node: node rank ${SLURM_NODEID:-0} of ${SLURM_NNODES:-1}, $MEMTRAIN_LAUNCHER starts $MEMTRAIN_NPROC processes here"
    fi
    case $MEMTRAIN_LAUNCHER in
        torchrun)
            if [ "$MEMTRAIN_RDZV" = c10d ]; then
                exec "$MEMTRAIN_PYTHON" -m torch.distributed.run --nnodes "$MEMTRAIN_NNODES" --nproc_per_node "$MEMTRAIN_NPROC" \
                    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$MEMTRAIN_RDZV_ID" \
                    --max_restarts 0 "$@"
            else
                exec "$MEMTRAIN_PYTHON" -m torch.distributed.run --nnodes "$MEMTRAIN_NNODES" --nproc_per_node "$MEMTRAIN_NPROC" \
                    --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
                    --max_restarts 0 "$@"
            fi ;;
        deepspeed-nossh)
            exec "$MEMTRAIN_PYTHON" -m deepspeed.launcher.runner --hostfile "$MEMTRAIN_HOSTFILE" --no_ssh \
                --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@" ;;
        srun)
            exec "$@" ;;
        *) _ms_die "memtrain_task: unknown launcher '$MEMTRAIN_LAUNCHER'" ;;
    esac
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then   # executed, not sourced
    [ "${1:-}" = --task ] && [ "${2:-}" = -- ] || _ms_die "usage: bash slurm/common.sh --task -- COMMAND... (inside srun)"
    shift 2
    memtrain_task "$@"
fi
