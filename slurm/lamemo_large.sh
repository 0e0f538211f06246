#!/bin/bash
# LaMemo large (lamemo_wt103_large: 18 layers, d 1024, 16 x 64 heads, segment and memory 384, attn_type 3) on
# several GPU nodes: bf16, ZeRO-2, one torchrun per node by default.  Submit from the repository root:
#
#   sbatch slurm/lamemo_large.sh                                   # 4 nodes x 8 GPUs, data/wt103, runs/<job name>
#   sbatch --nodes=8 --time=48:00:00 slurm/lamemo_large.sh         # any #SBATCH line can be overridden
#   DATA_PATH=data/wt103 RUN_DIR=runs/lamemo-l LAUNCHER=srun TRAIN_ARGS="--train-iters 200000" sbatch slurm/lamemo_large.sh
#
# Preemption and the time limit: Slurm sends SIGUSR1 to this shell 300 s before the limit; the ranks save and
# stop, and the job requeues itself and resumes from the checkpoint (docs/multinode.md lists every variable).
#SBATCH --job-name=lamemo-large
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

: "${PRESET:=lamemo_wt103_large}"
: "${DATA_PATH:=data/wt103}"
: "${DS_CONFIG:=ds_configs/zero2_bf16.json}"
: "${GLOBAL_BATCH=128}"              # the published batch (set it empty to use the preset's micro batch per rank)
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$REPO_DIR/slurm/common.sh" || { echo "cannot read $REPO_DIR/slurm/common.sh: submit from the repository root or set REPO_DIR" >&2; exit 2; }
memtrain_main
