#!/usr/bin/env bash
# Example: a memory model learns the copy task (RMT's X <s> X X), on 2 CPU processes (a few minutes on 2 cores):
#   1. generate a corpus: the copy task, as JSON lines with a prompt and an answer per example
#   2. preprocess it into Megatron .bin/.idx files (word tokenizer; answer tokens marked for scoring)
#   3. train a tiny LaMemo with the deepspeed launcher: 2 processes, ZeRO-2, memory carried across steps
#   4. evaluate the exported model on the test split; 5. generate a sample; 6. plot the loss curve
# The 32-token examples are read in 8-token segments, so copying X needs the memory (docs/synthetic.md).
# Everything goes under $OUT (default runs/copy_task); a second run starts afresh. ITERS=N trains N steps instead
# of the preset's 1000.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/job_env.sh
OUT=${OUT:-runs/copy_task}
PORT=${MASTER_PORT:-$(free_port)}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/6 generate the copy task corpus (JSON lines: 20000 train, 500 valid, 500 test examples)"
python data_tools/synthetic.py copy --length 8 --train-size 20000 --valid-size 500 --test-size 500 --seed 1 \
    --format jsonl --output-prefix "$OUT/corpus/copy"
head -n 2 "$OUT/corpus/copy_train.jsonl"

step "2/6 preprocess into Megatron .bin/.idx (answers are the scored tokens)"
python data_tools/preprocess.py --input train="$OUT/corpus/copy_train.jsonl" valid="$OUT/corpus/copy_valid.jsonl" \
    test="$OUT/corpus/copy_test.jsonl" --json-key problem --answer-key answer --tokenizer words --min-count 1 \
    --output-prefix "$OUT/data/copy"
python data_tools/summarize.py "$OUT/data/copy_train"

step "3/6 train LaMemo: deepspeed launcher, 2 CPU processes, ZeRO-2 (pretrain/configs/copy_task.yaml)"
cleanup() { rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$PORT"_* 2>/dev/null || true; }
trap cleanup EXIT
deepspeed --num_gpus 2 --master_port "$PORT" pretrain/train.py --ds_config ds_configs/zero2_fp32.json \
    --config copy_task --data-path "$OUT/data/copy" --save "$OUT/run" ${ITERS:+--train-iters "$ITERS"}

step "4/6 evaluate the exported model on the test split"
python pretrain/evaluate.py --model "$OUT/run/export" --split test --protocol train --batch-size 8 \
    --output "$OUT/eval_test.json"

step "5/6 generate: the model continues a copy prompt from the test set, memory carried segment by segment as in training"
PROMPT=$(python -c "import json, sys; print(json.loads(open(sys.argv[1]).readline())['problem'])" "$OUT/corpus/copy_test.jsonl")
python pretrain/generate.py --model "$OUT/run/export" --prompt "$PROMPT" --max-new-tokens 16 --temperature 0

step "6/6 plot the loss curves"
python pretrain/plot.py "$OUT/run" -o "$OUT/loss.png"

cat <<EOF

Done. Where things are:
  data         $OUT/data/copy_{train,valid,test}.{bin,idx,json} (+ .mask: the scored answer tokens)
  logs         $OUT/run/metrics.jsonl, TensorBoard: tensorboard --logdir $OUT/run/tensorboard
  checkpoints  $OUT/run/iter_*   (resume: run the same train command again with more --train-iters)
  model        $OUT/run/export   (consolidated fp32 safetensors + config + tokenizer)
  evaluation   $OUT/eval_test.json
  plot         $OUT/loss.png
EOF
