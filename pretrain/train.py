"""Train a memory-augmented transformer LM.

    deepspeed --num_gpus 2 pretrain/train.py --ds_config ds_configs/zero2_bf16.json --config lamemo_tiny \
        --data-path data/copy --save runs/lamemo --train-iters 200
    torchrun --nproc_per_node 2 pretrain/train.py ...        (same options)
    python pretrain/train.py ...                              (one process)
    srun python pretrain/train.py ...                         (Slurm, one task per GPU)

Options: --config (preset or YAML), --ds_config (DeepSpeed JSON), Megatron-style names (--train-iters,
--data-path, --save, --load, ...), and any config field as --section.field VALUE. See --help for all of them
with their defaults, docs/training.md for the guide.
"""
if __name__ == "__main__" and not __package__:
    import os, sys
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import os
import sys

os.environ.setdefault("WANDB_MODE", "offline")


def main(argv=None) -> int:
    from pretrain.runtime import clear_stale_build_locks, tune_cpu_allocator
    tune_cpu_allocator()
    clear_stale_build_locks()      # DeepSpeed builds its CPU ops on first use: a killed build must not hang us
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick it too, with a warning per rank
    from pretrain.engine.trainer import run
    return run(argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)
