#!/usr/bin/env bash
# Does the memory pay on YOUR corpus? One command for the whole study of docs/experiments.md:
# tables, the allocation U-curve, the memory curve with the capacity-1 control, one ablation
# (orders 2 vs 2-3) and the Engram knockout by bucket.
#
#   bash scripts/study.sh CORPUS... [-- EXTRA]      e.g. bash scripts/study.sh ~/.cache/engram/medium/corpus
#
# Settings through the environment (defaults: the reduced CPU scale of docs/experiments.md):
#   OUT=out/study      where everything goes (each step is skipped when its artifact is complete:
#                      a sweep continues where it stopped, finished runs are never retrained)
#   CONFIG=configs/study.toml  SEEDS=0,1,2  JOBS=2  STEPS=120  EVAL_WINDOWS=200
#   RATIOS=1,0.9,0.75,0.5,0.25     SLOTS=1,1e3,1e4,1e5,3e5     ENGRAM=".venv/bin/engram"  PYTHON=.venv/bin/python
#   SETS="--set model.n_embd=96 ..."  overrides for every run (default: the reduced study model)
#   ENGINE=ray         build the tables and run every sweep on a Ray cluster (docs/scale-out.md;
#                      RAY_ADDRESS=HOST:PORT names it; JOBS is then unused: the cluster's room decides)
# On a GPU machine: SETS="" STEPS=2000 JOBS=1 and add --device cuda via EXTRA after `--`.
set -euo pipefail

corpus=()
extra=()
while (($#)); do
    if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
    corpus+=("$1"); shift
done
if ((${#corpus[@]} == 0)); then
    echo "usage: bash scripts/study.sh CORPUS... [-- EXTRA OPTIONS FOR EVERY SWEEP]" >&2
    exit 1
fi

OUT=${OUT:-out/study}
CONFIG=${CONFIG:-configs/study.toml}
SEEDS=${SEEDS:-0,1,2}
JOBS=${JOBS:-2}
STEPS=${STEPS:-120}
EVAL_WINDOWS=${EVAL_WINDOWS:-200}
RATIOS=${RATIOS:-1,0.9,0.75,0.5,0.25}
SLOTS=${SLOTS:-1,1e3,1e4,1e5,3e5}
read -r -a engram <<< "${ENGRAM:-.venv/bin/engram}"
read -r -a sets <<< "${SETS:---set model.n_embd=96 --set model.moe_expert_hidden=144 --set data.min_count=50}"
sets+=(--set "train.steps=$STEPS" --set "train.warmup_steps=$((STEPS / 10 > 1 ? STEPS / 10 : 1))"
       --set "train.eval_interval=$STEPS")
ENGINE=${ENGINE:-local}
engine=(--engine "$ENGINE")
if [[ $ENGINE == ray ]]; then parallel=(); else parallel=(--jobs "$JOBS"); fi
common=(-c "$CONFIG" "${sets[@]}" --seeds "$SEEDS" "${parallel[@]}" "${engine[@]}" --eval-windows "$EVAL_WINDOWS" "${extra[@]}")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
step() { echo "== $(date +%T) $*" >&2; }

done_artifact() { [[ -f $1/manifest.json ]]; }
if ! done_artifact "$OUT/vocab"; then
    step normalize-vocab
    "${engram[@]}" normalize-vocab -o "$OUT/vocab" -q
fi
if ! done_artifact "$OUT/tables"; then
    step build-tables
    "${engram[@]}" build-tables "${corpus[@]}" --vocab "$OUT/vocab" --out "$OUT/tables" --layers 1 \
        --max-ngram-size 3 --heads-per-ngram 4 --embed-dim-per-head 16 --target-collision-rate 0.25 "${engine[@]}" -q
fi
time_it() { local t0=$SECONDS; "$@"; echo "   took $((SECONDS - t0)) s" >&2; }

step "allocation sweep ($RATIOS)"
time_it "${engram[@]}" sweep allocation "${corpus[@]}" -T "$OUT/tables" --ratios "$RATIOS" -o "$OUT/allocation" "${common[@]}" -q
step "memory sweep ($SLOTS, backbone fixed)"
time_it "${engram[@]}" sweep memory "${corpus[@]}" -T "$OUT/tables" --slots "$SLOTS" -o "$OUT/memory" "${common[@]}" -q
step "ablation: orders 2 vs 2-3 at rho = 0.75"
time_it "${engram[@]}" sweep grid "${corpus[@]}" -T "$OUT/tables" --axis plan.max_ngram_size=2,3 --allocation 0.75 \
    -o "$OUT/ablation" "${common[@]}" -q
step "knockout: every Engram run of the allocation sweep, seed 0"
runs=()
for r in "$OUT"/allocation/runs/rho=*--seed=0; do
    [[ $(basename "$r") == rho=1--* ]] && continue   # the pure MoE has no Engram to knock out
    runs+=("$r")
done
time_it "${engram[@]}" eval "${runs[@]}" --knockout engram --max-windows "$EVAL_WINDOWS" -o "$OUT/knockout" --force -q
"${PYTHON:-.venv/bin/python}" scripts/study_summary.py "$OUT" --out "$OUT/summary.md"
step "done: $OUT/{allocation,memory,ablation,knockout}; the tables: $OUT/summary.md"
