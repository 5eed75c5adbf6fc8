#!/usr/bin/env bash
# The GPU checks and figures of docs/benchmarks.md in one call, for a machine lent for a few
# minutes. Runs from the source tree (`python3 -m fthss.cli`, `python3 -m pytest`), so it needs
# torch, transformers, peft, tqdm, matplotlib, pytest and hypothesis on the machine, nothing
# installed. In order, each step under a time limit and never past the deadline:
#   1. the `device` tests (exactness, compiled step, prefill paths) on CUDA in float32 and in
#      bfloat16, the two side by side, with TORCH_LOGS=perf_hints: a "skipping cudagraphs" line
#      in their logs means the compiled decode step did not run as CUDA graphs;
#   2. `fthss bench decode | latency | throughput` on llama3-8b in bf16 with --compile, then
#      without (the compiled runs only if the compiled-step test passed), then `memory`;
#   3. one profiled run (stage B at 3,000 intermediate tokens, eager): OUT/profile.*.
#
#   scripts/bench-gpu.sh [OUT_DIR] [SECONDS]     # defaults: runs/bench-gpu, 540
#
# OUT_DIR gets env.txt, pytest-*.log, one JSON (and PNG) per command with its log, and
# summary.txt: each step's exit status, wall time and table. Through the device tool, whose
# $OUT takes at most 8 files:
#   scripts/bench-gpu.sh /tmp/bench 540; tar czf $OUT/bench-gpu.tgz -C /tmp bench
# A dry run on a CPU, tiny models: BIG="--arch tiny-llama --device cpu" TEST_DEVICE=cpu \
#   scripts/bench-gpu.sh /tmp/bench 400
set -uo pipefail
out=${1:-runs/bench-gpu}
budget=${2:-540}
deadline=$(( $(date +%s) + budget ))
big=${BIG:-"--arch llama3-8b --dtype bfloat16 --device cuda"}
test_device=${TEST_DEVICE:-cuda}
mkdir -p "$out"
: > "$out/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%FT%TZ; git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git)"
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "| transformers",
transformers.__version__, "| peft", peft.__version__, "|",
torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} > "$out/env.txt" 2>&1

# limit WANTED: WANTED seconds, or what is left before the deadline if less (0: skip)
limit() {
  local left=$(( deadline - $(date +%s) - 5 ))
  (( left < $1 )) && echo $(( left < 20 ? 0 : left )) || echo "$1"
}

# the device tests in one dtype, in the background; their exit status in OUT/pytest-DTYPE.rc
device_tests() {
  local dtype=$1 seconds=$2
  ( FTHSS_TEST_DEVICE=$test_device FTHSS_TEST_DTYPE=$dtype TORCH_LOGS=perf_hints \
      timeout "$seconds" python3 -m pytest -q -m device -p no:cacheprovider \
      tests/test_exactness.py tests/test_engine.py > "$out/pytest-$dtype.log" 2>&1
    echo $? > "$out/pytest-$dtype.rc" ) &
}

# bench NAME LIMIT_S ARGS...: `fthss bench ARGS --out OUT/NAME.json`, at most LIMIT_S seconds
bench() {
  local name=$1 seconds; seconds=$(limit "$2"); shift 2
  if (( seconds == 0 )); then
    echo "== $name: skipped, out of time" >> "$out/summary.txt"; return 1
  fi
  local started=$(date +%s)
  timeout "$seconds" python3 -m fthss.cli bench "$@" --out "$out/$name.json" > "$out/$name.log" 2>&1
  local rc=$?
  { echo "== $name: fthss bench $* (rc $rc, $(( $(date +%s) - started )) s of $seconds s)"
    grep -v '^{' "$out/$name.log" | tr '\r' '\n' | grep -v 'it/s\]$\|s/it\]$' | tail -26
  } >> "$out/summary.txt"
  return $rc
}

started=$(date +%s)
seconds=$(limit 150)
device_tests float32 "$seconds"
device_tests bfloat16 "$seconds"
wait
compile=--compile
for dtype in float32 bfloat16; do
  rc=$(cat "$out/pytest-$dtype.rc")
  skips=$(grep -c "skipping cudagraphs" "$out/pytest-$dtype.log")
  { echo "== device tests, $dtype on $test_device (rc $rc, $(( $(date +%s) - started )) s;" \
         "'skipping cudagraphs' in the log: $skips)"
    grep -E "passed|failed|error" "$out/pytest-$dtype.log" | tail -5
    grep -E "^(FAILED|ERROR)" "$out/pytest-$dtype.log"
  } >> "$out/summary.txt"
  grep -q "FAILED.*test_inductor_decode_step" "$out/pytest-$dtype.log" && compile=
done
[[ -z $compile ]] && echo "!! the compiled decode step failed its test: no --compile runs" >> "$out/summary.txt"

if [[ -n $compile ]]; then
  bench decode-compiled 100 decode $big --compile --contexts 250 1000 3000
  bench latency-compiled 120 latency $big --compile
fi
bench decode 45 decode $big --contexts 250 1000 3000
bench latency 70 latency $big
[[ -n $compile ]] && bench throughput-compiled 100 throughput $big --compile
bench memory 30 memory $big
bench profile 45 latency $big --lengths 3000 --repeats 1 --profile
bench throughput 70 throughput $big
cat "$out/summary.txt"
