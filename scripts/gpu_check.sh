#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (CI has none; run this where one is lent):
#
#   bash scripts/gpu_check.sh [OUT_DIR]      (default out/gpu-check)
#
# 1. the tests marked `gpu` (hash_ngrams on CUDA == NumPy; a store run on CUDA: memory == mmap ==
#    prefetch off, bit for bit, with the working set copied from pinned memory on a side stream);
# 2. training step time on CUDA by table store (benchmarks/bench_table_store.py --part train: the
#    study configuration on the sample data; memory, mmap, mmap without prefetch, module).
# Uses the python on PATH (ENGRAM_PYTHON overrides); engram need not be installed (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/gpu-check}"
PY="${ENGRAM_PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi -L
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== 1/2 tests marked gpu" >&2
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_hashing.py tests/test_store_train.py 2>&1 | tee "$OUT/gpu_tests.log"

echo "== 2/2 step time by table store on CUDA" >&2
CORPUS=(sample_data/sotu/*.txt sample_data/zh_classics.jsonl)
"$PY" -m engram_cli normalize-vocab --out "$OUT/vocab" --force --quiet
"$PY" -m engram_cli build-tables "${CORPUS[@]}" --vocab "$OUT/vocab" --out "$OUT/tables" --layers 1 \
    --max-ngram-size 3 --heads-per-ngram 4 --embed-dim-per-head 16 --target-collision-rate 0.25 --force --quiet
"$PY" benchmarks/bench_table_store.py --part train --corpus "${CORPUS[@]}" --tables "$OUT/tables" \
    --dir "${BENCH_DIR:-/dev/shm/engram-gpu-bench}" --repeats "${REPEATS:-3}" --train-steps "${STEPS:-60}" \
    2>&1 | tee "$OUT/step_time.log"
