#!/usr/bin/env bash
# The main job: the whole engram pipeline on the bundled sample data.
#
#   bash scripts/pipeline.sh [OUT_DIR]      (default out/sample; needs scripts/setup.sh first)
#
# Each stage's output directory is the next one's input. Reruns replace earlier outputs (--force).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-out/sample}"
ENGRAM="${ENGRAM_VENV:-.venv}/bin/engram"
mkdir -p "$OUT"

CORPUS=(sample_data/sotu/*.txt sample_data/zh_classics.jsonl)

echo "== 1/5 normalize-vocab: canonicalize the DeepSeek 128k vocabulary" >&2
"$ENGRAM" normalize-vocab --out "$OUT/vocab" --force

echo "== 2/5 build-tables: n-gram statistics, a table plan for a 4-layer model, collisions" >&2
"$ENGRAM" build-tables "${CORPUS[@]}" --vocab "$OUT/vocab" --out "$OUT/tables" \
    --layers 1 --heads-per-ngram 4 --embed-dim-per-head 16 --target-collision-rate 0.25 --sweep --top-ngrams 10 --force

echo "== 3/5 train: the tiny Engram + MoE model (allocation 0.75: a quarter of the inactive expert budget as tables)" >&2
"$ENGRAM" train "${CORPUS[@]}" --tables "$OUT/tables" --out "$OUT/run" --config configs/tiny.toml \
    --allocation 0.75 --force

echo "== 4/5 inspect-gates: where the memory gates open on sample sentences" >&2
"$ENGRAM" inspect-gates --model "$OUT/run" --file sample_data/sentences.txt --out "$OUT/gates" --force

echo "== 5/5 eval: held-out loss, bits per byte, loss by training count of the n-gram, Engram knocked out" >&2
"$ENGRAM" eval "$OUT/run" --knockout engram --out "$OUT/eval" --force

echo >&2
"${ENGRAM_VENV:-.venv}/bin/python" scripts/summarize.py "$OUT"
