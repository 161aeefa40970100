#!/usr/bin/env bash
# GPU benchmark: device correctness, 7B-shaped conversion vs floors, KV-cache runtimes, heal curve -> docs/results/gpu.md
#
#   bench/gpu.sh            # on one H100/H200 (480 s; or as two calls of 165 + 315 s, docs/gpu.md); wheels from .whl/
#   bench/gpu.sh --smoke    # tiny sizes on whatever device there is (CPU: a few minutes)
#
# Env: KVC_GPU_PARTS (default: runtime razor scale devices heal), KVC_SMOLLM2_GGUF (SmolLM2-135M-Instruct .gguf;
# default: the built-in `smollm2` alias), PYTHON (default python3), KVC_GPU_BUDGET (seconds for the whole run,
# default 480), KVC_GPU_SCALE_SHARE / KVC_GPU_DEVICES_SHARE (seconds, default 150 / 110), OUT (also copy the
# results there).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
export KVC_GPU_SMOKE=$SMOKE
BUDGET=${KVC_GPU_BUDGET:-$([ "$SMOKE" = 1 ] && echo 1200 || echo 480)}
if [ -z "${KVC_SMOLLM2_GGUF:-}" ] && compgen -G "/tmp/smollm2/*.gguf" >/dev/null; then
  KVC_SMOLLM2_GGUF=$(ls /tmp/smollm2/*.gguf | head -1)
fi
export KVC_SMOLLM2_GGUF=${KVC_SMOLLM2_GGUF:-smollm2}
START=$(date +%s)
export KVC_GPU_DEADLINE=$((START + BUDGET))
export KVC_GPU_WORK=${KVC_GPU_WORK:-/tmp/kvc-gpu}
if [ "$SMOKE" = 1 ]; then  # a smoke run never overwrites the committed results
  export KVC_GPU_RAW=${KVC_GPU_RAW:-$KVC_GPU_WORK/raw} KVC_GPU_REPORT=${KVC_GPU_REPORT:-$KVC_GPU_WORK/gpu.md}
else
  export KVC_GPU_RAW=${KVC_GPU_RAW:-docs/results/gpu} KVC_GPU_REPORT=${KVC_GPU_REPORT:-docs/results/gpu.md}
fi
mkdir -p "$KVC_GPU_RAW" "$KVC_GPU_WORK"
LOGS=$KVC_GPU_WORK/logs
mkdir -p "$LOGS"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed (going on with what is installed)"
  export PYTHONPATH=/tmp/site:$PWD
elif [ -d /tmp/site ]; then  # installed by an earlier call on the same (warm) machine
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
echo "command: bench/gpu.sh $*" | tee "$KVC_GPU_RAW/command.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"; } \
  | tee -a "$KVC_GPU_RAW/command.txt"
$PY - <<'PYEOF' 2>&1 | tee -a "$KVC_GPU_RAW/command.txt"
import importlib.metadata as md
import os
import sys


def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"


names = "torch transformers accelerate datasets pyarrow fsspec huggingface-hub tokenizers regex gguf pydantic peft"
print("python", sys.version.split()[0], "| SmolLM2:", os.environ["KVC_SMOLLM2_GGUF"])
print(" ".join(f"{n}={version(n)}" for n in names.split()))
PYEOF
# Convert the SmolLM2 GGUF once (cached under ~/.cache/kvconvert) before anything is timed.
if [ "${KVC_GPU_PARTS:-all}" != "runtime razor" ]; then  # these two parts use random weights
  timeout 120 $PY -c "from kvconvert.checkpoint import resolve; import os; print('SmolLM2 at', resolve(os.environ['KVC_SMOLLM2_GGUF']).path)" \
    2>&1 | tail -3 || echo "SmolLM2 conversion failed"
fi

# part NAME SHARE: run bench.gpu_NAME with at most SHARE seconds (never past the deadline); a failure is recorded
# and the next part runs.
part() {
  local name=$1 share=$2 now left limit
  now=$(date +%s); left=$((KVC_GPU_DEADLINE - now - 15)); limit=$(( share < left ? share : left ))
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped (no time left)" | tee -a "$LOGS/parts.txt"; return; fi
  echo "== $name (up to ${limit} s)"
  KVC_GPU_DEADLINE=$((now + limit)) timeout -k 10 "$limit" $PY -m "bench.gpu_$name" 2>&1 | tee "$LOGS/$name.log"
  local rc=$?
  echo "== $name: rc $rc after $(( $(date +%s) - now )) s" | tee -a "$LOGS/parts.txt"
}

# KVC_GPU_PARTS picks parts (e.g. "runtime" in one call and "scale devices heal" in the next on the same machine,
# with KVC_GPU_RAW and KVC_GPU_WORK under /tmp, which a warm machine keeps between calls).
PARTS=${KVC_GPU_PARTS:-runtime razor scale devices heal}
for name in $PARTS; do
  case "$SMOKE:$name" in
    1:runtime) part runtime 120 ;; 1:razor) part razor 120 ;; 1:scale) part scale 240 ;; 1:devices) part devices 240 ;; 1:heal) part heal 9999 ;;
    0:runtime) part runtime 100 ;; 0:razor) part razor 50 ;; 0:scale) part scale "${KVC_GPU_SCALE_SHARE:-150}" ;;
    0:devices) part devices "${KVC_GPU_DEVICES_SHARE:-110}" ;; 0:heal) part heal 9999 ;;
    *) echo "unknown part $name" ;;
  esac
done
$PY -m bench.gpu_report || echo "report failed"
echo "total $(( $(date +%s) - START )) s"
if [ -n "${OUT:-}" ]; then
  cp "$KVC_GPU_REPORT" "$OUT/gpu.md" 2>/dev/null
  tar czf "$OUT/gpu-raw.tgz" "$KVC_GPU_RAW" "$LOGS" 2>/dev/null
fi
