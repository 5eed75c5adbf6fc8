#!/usr/bin/env bash
# exp25 (docs/experiments.md): prompt vs lora stages on a base pretrained in text mode only
# (world 0, base-v2 recipe: `fthss world build --out runs/world-s0 --seed 0 && fthss base
# pretrain --world runs/world-s0 --out runs/textbase-s0 --steps 1000`).
# usage: [TASK=compress_qa] scripts/exp25.sh KIND (prompt|lora) RECORDS
set -euo pipefail
cd "$(dirname "$0")/../.."
kind=$1; records=${2:-300}
world=runs/world-s0; base=${BASE:-runs/textbase-s0}; task=${TASK:-compress_qa}; out=${OUT:-runs/exp25}/$task-$kind; samples=${SAMPLES:-1024}
data=$world/tasks/$task/train.jsonl
# the demo's recipe: single-round FTHSS on the single-round tasks, one stage per phase at half
# the micro-batch (equal_stage_updates); multi-round jointly on the others
case $task in compress_qa|rewrite_qa) rounds=(--rounds single --micro-batch-size 8);;
  *) rounds=(--rounds multi --micro-batch-size 16);; esac
corpus=(); case $task in rewrite_qa|active_rag) corpus=(--corpus $world/corpus.jsonl);; esac
if [ "$kind" = prompt ]; then
  stage=(--kind prompt --tokens 8 --init vocab --lr 3e-2)
else
  stage=(--kind lora --tokens 0 --lora-rank 8 --lora-alpha 16 --lr 3e-2 --lora-lr 2e-3)
fi
common=(--base "$base" --data "$data" --max-samples "$samples" --epochs 1 --grad-accumulation 1
        --warmup-ratio 0.03 --max-length 4096 "${stage[@]}")
fthss train "${common[@]}" --method chain --micro-batch-size 16 --out "$out/chain"
fthss train "${common[@]}" --method fthss "${rounds[@]}" --out "$out/fthss"
fthss eval --base "$base" --task "$task" --data $world/tasks/$task/test.jsonl "${corpus[@]}" \
  --stages chain="$out/chain" --stages fthss="$out/fthss" --max-records "$records" \
  --batch-size 64 --out "$out/eval"
