#!/usr/bin/env bash
# docs/why-mlfq.md, "with confidence": every seeded grid of the note, one process at a time (the
# machine is shared), each resumable (bench.policy_ci skips points already in its JSONL).
#   nice -n 10 bench/why_ci.sh [grid ...]     grids: real noisy synthetic alpaca human tput blind
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
R=docs/results
RUN="$PY -m bench.policy_ci run --num-requests 400 --duration 200 --seeds 0,1,2,3,4"
PRED=predicted-srpt,predicted-gittins,predicted-skip-join-mlfq,predicted-order-mlfq
# the trained model's own log-error spread (bench/length_predictor.py: sigma)
SIG=$($PY -c "import json; print(round(json.load(open('$R/length_predictor.json'))['sigma'], 3))")
SIGH=$($PY -c "import json; print(round(json.load(open('$R/length_predictor_human.json'))['sigma'], 3))")
grids=${*:-real noisy synthetic alpaca human tput blind}
for g in $grids; do
  case $g in
    real) $RUN --out $R/ci_real.jsonl --workload sharegpt-real-test --prediction-sigma "$SIG" --rates 3,5 \
            --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED,gittins-slowdown,mlfq ;;
    noisy) $RUN --out $R/ci_noisy.jsonl --workload sharegpt-real-test --rates 3 --noise 0,0.5,1,1.5,2,3 \
             --policies predicted-srpt,predicted-gittins,predicted-order-mlfq ;;
    synthetic) $RUN --out $R/ci_synthetic.jsonl --workload sharegpt --noise 1.05 --rates 2,3 \
                 --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED ;;
    alpaca) $RUN --out $R/ci_alpaca.jsonl --workload alpaca --noise 1.0 --rates 14,20 \
              --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED ;;
    human) $RUN --out $R/ci_human.jsonl --workload sharegpt-real-human-test --prediction-sigma "$SIGH" --rates 3,5 \
             --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED,gittins-slowdown ;;
    tput) $RUN --out $R/ci_real.jsonl --workload sharegpt-real-test --prediction-sigma "$SIG" --rates 2,8 \
            --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED,gittins-slowdown,mlfq ;;
    blind) $RUN --out $R/ci_real.jsonl --workload sharegpt-real-test --rates 3,5 --policies gittins,vllm@256 ;;
    *) echo "unknown grid $g" >&2; exit 2 ;;
  esac
done
