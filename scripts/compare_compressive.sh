#!/usr/bin/env bash
# Compressive Transformer against Transformer-XL on real text (docs/results.md, "Compressive Transformer"):
# byte-level tinyshakespeare, 90/10 train/valid split, the tiny presets, the same steps, seed, batch and
# optimiser for each, memory carried from step to step; then the validation bits per byte of each export at
# the training lengths (protocol train, memory carried through the split).
#
#   compressive_tiny  64 memory + 16 compressed slots at rate 4 (reach 128 positions)
#   xl_tiny_mem80     80 uncompressed slots: the same memory budget
#   xl_tiny           64 uncompressed slots: the same uncompressed memory
#
# Usage:
#   scripts/compare_compressive.sh --text input.txt [--iters 4000] [--out runs/compare_compressive]
#   scripts/compare_compressive.sh --data PREFIX ...      (a byte-level PREFIX_train / PREFIX_valid already made)
# Options: --iters N (default 4000), --micro-batch N (16), --lr X (0.001), --warmup N (200), --seed N (1234),
# --eval-streams N (4), --presets "a b c" (the three above). Everything goes under --out; a second run of the
# same --out resumes unfinished trainings (the trainer resumes from the latest checkpoint) and re-evaluates.
# Prints a Markdown table and writes OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} WANDB_MODE=offline PYTHONWARNINGS=ignore
TEXT= DATA= ITERS=4000 MICRO=16 LR=0.001 WARMUP=200 SEED=1234 STREAMS=4 OUT=runs/compare_compressive
PRESETS="compressive_tiny xl_tiny_mem80 xl_tiny"
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --text) TEXT=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --micro-batch) MICRO=$2; shift 2 ;;
    --lr) LR=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --eval-streams) STREAMS=$2; shift 2 ;;
    --presets) PRESETS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) usage ;;
    *) echo "compare_compressive.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$DATA" ]; then
  [ -n "$TEXT" ] || { echo "compare_compressive.sh: give --text FILE (raw text) or --data PREFIX" >&2; exit 2; }
  [ -f "$TEXT" ] || { echo "compare_compressive.sh: --text $TEXT: no such file" >&2; exit 2; }
  DATA=$OUT/data/text
  if [ ! -f "${DATA}_valid.idx" ]; then
    "$PY" data_tools/preprocess.py --input "$TEXT" --input-format bytes --tokenizer bytes --split 90,10 \
        --output-prefix "$DATA" --no-progress
  fi
fi
for split in train valid; do
  [ -f "${DATA}_${split}.idx" ] || { echo "compare_compressive.sh: ${DATA}_${split}.idx missing" >&2; exit 2; }
done

for preset in $PRESETS; do
  printf '\n=== %s: %s steps\n' "$preset" "$ITERS"
  "$PY" pretrain/train.py --config "$preset" --data-path "$DATA" --save "$OUT/$preset" --train-iters "$ITERS" \
      --seed "$SEED" --micro-batch-size "$MICRO" --lr "$LR" --lr-warmup-iters "$WARMUP" --min-lr 0 \
      --data.reset_memory false --eval.final_splits '[]' --checkpoint.interval 1000 --log.interval 50 \
      --log.progress false --log.tensorboard false
  "$PY" pretrain/evaluate.py --model "$OUT/$preset/export" --split valid --protocol train \
      --batch-size "$STREAMS" --output "$OUT/$preset/eval_valid.json"
done

"$PY" - "$OUT" $PRESETS <<'EOF'
import json, os, sys
out, presets = sys.argv[1], sys.argv[2:]
rows = []
for p in presets:
    ev = json.load(open(os.path.join(out, p, "eval_valid.json")))
    aux, last = None, None
    with open(os.path.join(out, p, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            last = rec if rec.get("kind") == "train" and "loss" in rec else last
            aux = next((v for k, v in rec.items() if "aux" in k and isinstance(v, (int, float))), aux)
    import yaml
    model = yaml.safe_load(open(os.path.join(out, p, "config.yaml")))["model"]
    comp = model.get("compressive") or {}
    slots = model["mem_len"] + ((comp.get("cmem_len") or model["mem_len"] // comp.get("cmem_ratio", 4))
                                if model["attn_type"] == 60 else 0)
    rows.append(dict(preset=p, mem_len=model["mem_len"], memory_slots=slots, bpc=ev.get("bpc"),
                     train_loss_last=None if last is None else last["loss"], aux_last=aux,
                     scored_tokens=ev.get("scored_tokens", ev.get("tokens"))))
tmp = os.path.join(out, "summary.json.tmp")
json.dump(rows, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(out, "summary.json"))
print("\n| preset | mem_len | memory slots / layer | valid bpc | last train loss | last aux loss |")
print("|---|---:|---:|---:|---:|---:|")
for r in rows:
    f = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"
    print(f"| {r['preset']} | {r['mem_len']} | {r['memory_slots']} | {f(r['bpc'])} | {f(r['train_loss_last'])} | "
          f"{f(r['aux_last'])} |")
if any(r["preset"].startswith("compressive") and r["aux_last"] is None for r in rows):
    print("\nnote: no auxiliary loss in the compressive run's metrics: the trainer did not add the "
          "reconstruction loss, so the compressor stayed at its initialisation", file=sys.stderr)
EOF
