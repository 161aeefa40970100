#!/bin/bash
# Every output file of calibrate, compress (weighted/mean/svd, refine, sharded), heal, eval, run (recipe with heal
# and eval) and, with SMOL=1, compress of SmolLM2, written by the kvconvert tree REPO into OUT, with OUT/SUMS
# (sha256 of each). Run it for two trees with the same OUT (records name their paths) and diff the SUMS:
#   SMOL=1 bench/same_outputs.sh /tmp/old /tmp/g && mv /tmp/g /tmp/g-old
#   SMOL=1 bench/same_outputs.sh $PWD /tmp/g && diff /tmp/g-old/SUMS /tmp/g/SUMS
# The tiny models and texts are made once, by REPO's tests/tiny.py, in $IN (default /tmp/kvconvert-same-inputs).
set -e
REPO=${1:?usage: same_outputs.sh REPO OUTDIR}; OUT=${2:?usage: same_outputs.sh REPO OUTDIR}
IN=${IN:-/tmp/kvconvert-same-inputs}
export PYTHONPATH=$REPO OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
PY=/work/main/.venv/bin/python
cd $REPO
if [ ! -d $IN ]; then
  mkdir -p $IN
  $PY -c "
from pathlib import Path
from tests.tiny import make_model, write_text
make_model(Path('$IN/llama'), 'llama'); make_model(Path('$IN/qwen2'), 'qwen2', tied=True)
write_text(Path('$IN/a.txt'), seed=1); write_text(Path('$IN/b.txt'), seed=2); write_text(Path('$IN/big.txt'), n_docs=3000, seed=3)
"
fi
rm -rf $OUT; mkdir -p $OUT
K="$PY -m kvconvert"
$K compress $IN/llama --heads 0.25 --dataset $IN/a.txt --samples 4 --seq-len 32 --device cpu -o $OUT/llama-w > $OUT/log1 2>&1
$K compress $IN/llama --heads 2 --method mean --grouping adjacent --dataset $IN/a.txt --samples 4 --seq-len 32 --device cpu -o $OUT/llama-mean --max-shard-size 100KB >> $OUT/log1 2>&1
$K calibrate $IN/qwen2 --dataset $IN/a.txt --samples 4 --seq-len 32 --batch-size 2 --device cpu -o $OUT/qwen2.stats >> $OUT/log1 2>&1
$K compress $IN/qwen2 --heads 1 --method svd --stats $OUT/qwen2.stats --refine-steps 5 --refine-samples 4 -o $OUT/qwen2-svd-ref >> $OUT/log1 2>&1
cat > $OUT/recipe.yaml <<R
model: $IN/llama
output: $OUT/recipe-out
calibrate: {dataset: $IN/a.txt, samples: 4, seq_len: 32, batch_size: 2, device: cpu, stats: $OUT/recipe.stats}
compress: {heads: 2, refine: {steps: 3, samples: 4}}
heal: {datasets: [$IN/a.txt], steps: 2, seq_len: 32, device: cpu}
eval: {dataset: $IN/b.txt, samples: 2, seq_len: 32, device: cpu}
R
$K run $OUT/recipe.yaml >> $OUT/log1 2>&1
$K heal $OUT/llama-w --teacher $IN/llama --dataset $IN/a.txt --steps 2 --seq-len 32 --device cpu -o $OUT/healed >> $OUT/log1 2>&1
$K eval $OUT/llama-w --baseline $IN/llama --dataset $IN/b.txt --samples 2 --seq-len 32 --device cpu --json > $OUT/eval.json 2>>$OUT/log1
if [ -n "$SMOL" ]; then
$K compress smollm2 --heads 1 --dataset $IN/big.txt --samples 8 --seq-len 256 --batch-size 4 --device cpu --refine-steps 3 --refine-samples 4 -o $OUT/smol >> $OUT/log1 2>&1
fi
cd $OUT && find . -type f ! -name log1 ! -name SUMS | sort | xargs sha256sum > $OUT/SUMS
