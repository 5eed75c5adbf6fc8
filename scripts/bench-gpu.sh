#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one call, for a machine lent for a few minutes:
# a small preset first (does the compiled decode step build on this GPU?), then llama3-8b in
# bf16 (latency, throughput, decode, memory), each command under a time limit so that one slow
# compile cannot take the others' time. Runs from the source tree (`python3 -m fthss.cli`), so
# it needs torch, transformers, peft, tqdm and matplotlib on the machine, nothing installed.
#
#   scripts/bench-gpu.sh [OUT_DIR] [SECONDS]     # defaults: runs/bench-gpu, 540
#
# OUT_DIR gets env.txt, one JSON (and PNG) per command with its log, and summary.txt: each
# command's exit status, wall time and table. Without a working compiled step (the small preset
# fails), the 8B commands run without --compile and summary.txt says so. Through the device
# tool, whose $OUT takes at most 8 files:
#   scripts/bench-gpu.sh /tmp/bench 540; tar czf $OUT/bench-gpu.tgz -C /tmp bench
set -uo pipefail
out=${1:-runs/bench-gpu}
budget=${2:-540}
deadline=$(( $(date +%s) + budget ))
mkdir -p "$out"
: > "$out/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"; nvidia-smi
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "| transformers",
transformers.__version__, "| peft", peft.__version__, "|", torch.cuda.get_device_name())'
} > "$out/env.txt" 2>&1

# run NAME LIMIT_S ARGS...: `fthss bench ARGS --out OUT/NAME.json`, at most LIMIT_S seconds and
# never past the deadline
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( deadline - $(date +%s) - 5 ))
  (( left < limit )) && limit=$left
  if (( limit < 20 )); then
    echo "== $name: skipped, out of time" >> "$out/summary.txt"; return 1
  fi
  local started=$(date +%s)
  timeout "$limit" python3 -m fthss.cli bench "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
  local rc=$?
  { echo "== $name: fthss bench $* (rc $rc, $(( $(date +%s) - started )) s of $limit s)"
    grep -v '^{' "$out/$name.log" | tr '\r' '\n' | grep -v 'it/s\]$\|s/it\]$' | tail -26
  } >> "$out/summary.txt"
  return $rc
}

big="--arch llama3-8b --dtype bfloat16 --device cuda"
compile=--compile
run smoke-small 90 decode --arch small-llama --device cuda --compile --contexts 250 1000 \
  --repeats 1 || { compile=; echo "!! compiled step failed on the small preset: 8B runs eager" >> "$out/summary.txt"; }
run latency 200 latency $big $compile
run throughput 150 throughput $big $compile
run decode 100 decode $big $compile --contexts 250 1000 3000
run memory 45 memory $big
cat "$out/summary.txt"
