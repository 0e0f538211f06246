# Sourced from the repository root by the example jobs (quickstart.sh, example_copy_task.sh): the virtualenv that
# setup.sh makes, the environment of DeepSpeed on CPU processes, and free_port (a free TCP port on this machine,
# for a launcher's --master_port).
[ -x .venv/bin/python ] || { echo "run ./scripts/setup.sh first" >&2; exit 1; }
. .venv/bin/activate
export DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" WANDB_MODE=offline PYTHONWARNINGS=ignore
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
