#!/bin/bash
# Transformer-XL large presets on several GPU nodes: bf16, ZeRO-2, one torchrun per node by default.
#   xl_wt103_large (default), xl_enwik8_large, xl_text8_large: PRESET=xl_enwik8_large DATA_PATH=data/enwik8 ...
# Submit from the repository root:
#
#   sbatch slurm/xl_large.sh
#   PRESET=xl_enwik8_large DATA_PATH=data/enwik8 GLOBAL_BATCH=64 sbatch --nodes=2 slurm/xl_large.sh
#
# Variables, launch styles, preemption and resuming: docs/multinode.md.
#SBATCH --job-name=xl-large
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

: "${PRESET:=xl_wt103_large}"
: "${DATA_PATH:=data/wt103}"
: "${DS_CONFIG:=ds_configs/zero2_bf16.json}"
: "${GLOBAL_BATCH=128}"              # wt103 large's published batch; enwik8 / text8 large: 64
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}
source "$REPO_DIR/slurm/common.sh" || { echo "cannot read $REPO_DIR/slurm/common.sh: submit from the repository root or set REPO_DIR" >&2; exit 2; }
memtrain_main
