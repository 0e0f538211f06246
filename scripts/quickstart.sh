#!/usr/bin/env bash
# The main job: pretrain a tiny memory-augmented language model on real text, and measure what the memory buys.
#   1. preprocess the embedded Tiny Shakespeare (corpora/tinyshakespeare, public domain) into Megatron .bin/.idx
#      files: characters (65 symbols), nanoGPT's split (first 90% train, last 10% validation)
#   2. train a tiny Transformer-XL (4 layers, d 128; segments of 32 characters, 64 characters of memory carried
#      from step to step) with the deepspeed launcher on 2 CPU processes (ZeRO-2)
#   3. train the baseline: the same model on the same data without memory (--model.mem_len 0)
#   4. evaluate both exported models on the validation split in bits per character (the protocol is printed)
#   5. generate a sample from the memory model, the memory carried from segment to segment as in training
#   6. plot both loss curves in one picture, and print a table: bpc with and without memory, tokens/s, files
# 630 s on a 2-core VM shared with other work (docs/results.md: times, bpc, seeds). Everything goes under $OUT
# (default runs/quickstart); a second run starts afresh. ITERS=N trains N steps instead of the preset's 500 (a
# quick look at the pipeline: ITERS=10).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/job_env.sh
OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-}
CORPUS=corpora/tinyshakespeare/input.txt.xz
DATA="$OUT/data/shakespeare"
PORTS=()
cleanup() {  # DeepSpeed's CPU communication buffers, named after the port
  for p in ${PORTS[@]+"${PORTS[@]}"}; do rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$p"_* 2>/dev/null || true; done
}
trap cleanup EXIT
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== %s (%d s so far)\n' "$1" "$SECONDS"; }

step "1/6 preprocess Tiny Shakespeare: characters, first 90% train, last 10% validation"
python data_tools/preprocess.py --input "$CORPUS" --tokenizer chars --split 90,10 --output-prefix "$DATA"
python data_tools/summarize.py "${DATA}_valid" --tokens 60

train() {  # NAME, then extra options: one training run with the deepspeed launcher, 2 CPU processes, ZeRO-2
  local name=$1 port
  shift
  port=$(free_port)
  PORTS+=("$port")
  deepspeed --num_gpus 2 --master_port "$port" pretrain/train.py --ds_config ds_configs/zero2_fp32.json \
      --config quickstart --data-path "$DATA" --save "$OUT/$name" ${ITERS:+--train-iters "$ITERS"} "$@"
}

step "2/6 train Transformer-XL with memory: 2 CPU processes, ZeRO-2 (pretrain/configs/quickstart.yaml)"
train memory

step "3/6 train the baseline: the same model without memory (--model.mem_len 0)"
train no_memory --model.mem_len 0

step "4/6 evaluate both on the validation split, bits per character"
for name in memory no_memory; do
  python pretrain/evaluate.py --model "$OUT/$name/export" --split valid --protocol train --batch-size 16 \
      --output "$OUT/eval_$name.json"
done

step "5/6 generate: the memory model continues the first speeches of the validation split"
PROMPT=$(python - "${DATA}_valid" <<'EOF'
import sys
from data_tools.indexed import IndexedDataset
from data_tools.tokenization import load_tokenizer
text = load_tokenizer(sys.argv[1]).decode(IndexedDataset(sys.argv[1]).tokens[:1000])
speeches = text.split("\n\n")[1:4]       # after the partial line where the split cuts
speaker = text.split("\n\n")[4].split("\n")[0]
print("\n\n".join(speeches) + "\n\n" + speaker)
EOF
)
python pretrain/generate.py --model "$OUT/memory/export" --prompt "$PROMPT"$'\n' --max-new-tokens 400 \
    --temperature 0.8 --top-p 0.95 --seed 1 --output "$OUT/sample.jsonl"

step "6/6 plot both loss curves in one picture"
python pretrain/plot.py "$OUT/memory" "$OUT/no_memory" --labels "memory (mem_len 64)" "no memory (mem_len 0)" \
    --title "Tiny Shakespeare, characters: Transformer-XL tiny, 2 CPU processes" -o "$OUT/loss.png"

python - "$OUT" "$SECONDS" <<'EOF'
import json, os, statistics, sys
out, seconds = sys.argv[1], int(sys.argv[2])
rows = []
for name, label in (("memory", "memory (mem_len 64)"), ("no_memory", "no memory (mem_len 0)")):
    ev = json.load(open(os.path.join(out, f"eval_{name}.json")))
    recs = [json.loads(line) for line in open(os.path.join(out, name, "metrics.jsonl"))]
    speeds = [r["tokens_per_s"] for r in recs if r.get("kind") == "train" and r.get("tokens_per_s")]
    steps = max((r["step"] for r in recs if r.get("kind") == "train"), default=0)
    rows.append((label, ev["bpc"], statistics.median(speeds) if speeds else float("nan"), steps, ev["scored_tokens"]))
gain = rows[1][1] - rows[0][1]
print(f"\nResults: validation split of Tiny Shakespeare ({rows[0][4]:,} characters scored; protocol train: segments of 32,"
      f" memory as trained, 16 streams)")
print(f"  {'model':<24}{'valid bpc':>10}{'train tokens/s':>16}{'steps':>7}")
for label, bpc, speed, steps, _ in rows:
    print(f"  {label:<24}{bpc:>10.4f}{speed:>16,.0f}{steps:>7}")
print(f"  memory gain: {gain:+.4f} bpc ({100 * gain / rows[1][1]:.1f}% fewer bits per character); whole job {seconds} s")
print(f"""
Where things are:
  data         {out}/data/shakespeare_{{train,valid}}.{{bin,idx,json}} + shakespeare.vocab.json
  logs         {out}/{{memory,no_memory}}/metrics.jsonl, TensorBoard: tensorboard --logdir {out}
  checkpoints  {out}/{{memory,no_memory}}/iter_*  (resume: rerun the train command with more --train-iters)
  models       {out}/{{memory,no_memory}}/export  (consolidated fp32 safetensors + config + tokenizer)
  evaluation   {out}/eval_memory.json, {out}/eval_no_memory.json
  plot         {out}/loss.png
  sample       {out}/sample.jsonl""")
EOF
