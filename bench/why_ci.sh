#!/usr/bin/env bash
# docs/why-mlfq.md, "with confidence": every seeded grid of the note, one process at a time (the
# machine is shared), each resumable (fastserve.bench.policy_ci skips points already in its JSONL).
#   nice -n 10 bench/why_ci.sh [grid ...]     grids: real noisy synthetic alpaca human tput blind calibrated
#                                              (default) and headline mix tput-synthetic (benchmarks.md's headline,
#                                              section 4's mix, every policy's throughput on the synthetic traces)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
R=docs/results
RUN="$PY -m fastserve.bench.policy_ci run --num-requests 400 --duration 200 --seeds 0,1,2,3,4"
PRED=predicted-srpt,predicted-gittins,predicted-skip-join-mlfq,predicted-order-mlfq
# the trained model's own log-error spread (bench/length_predictor.py: sigma)
SIG=$($PY -c "import json; print(round(json.load(open('$R/length_predictor.json'))['sigma'], 3))")
SIGH=$($PY -c "import json; print(round(json.load(open('$R/length_predictor_human.json'))['sigma'], 3))")
grids=${*:-real noisy synthetic alpaca human tput blind calibrated}
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
    # the same predictions quantile-mapped to the true lengths' spread (bench/calibrate_predictions.py)
    calibrated) $RUN --out $R/ci_calibrated.jsonl --workload sharegpt-real-test-calibrated --prediction-sigma "$SIG" \
                  --rates 3,5 --policies skip-join-mlfq,srpt-oracle,$PRED ;;
    # benchmarks.md's headline sweeps (fcfs vs skip-join, throughput at the SLO) and the size-blind
    # policies of section 3 on the synthetic traces, with seeds
    headline)
      $RUN --out $R/ci_headline.jsonl --workload sharegpt --rates 1.5,2,2.5,3,4,5,6,8 --policies fcfs,skip-join-mlfq
      $RUN --out $R/ci_headline.jsonl --workload alpaca --rates 10,14,17,20,25,30,40,50 --policies fcfs,skip-join-mlfq
      $RUN --out $R/ci_synthetic.jsonl --workload sharegpt --noise 1.05 --rates 2,3 \
        --policies mlfq,gittins,gittins-slowdown,vllm@256
      $RUN --out $R/ci_alpaca.jsonl --workload alpaca --noise 1.0 --rates 14,20 \
        --policies mlfq,gittins,gittins-slowdown,vllm@256 ;;
    # throughput at the SLO of every policy on the synthetic traces (rates beside 2,3 and 14,20)
    tput-synthetic)
      $RUN --out $R/ci_synthetic.jsonl --workload sharegpt --noise 1.05 --rates 1.5,2.5,4,5,6,8 \
        --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED,mlfq,gittins-slowdown
      $RUN --out $R/ci_alpaca.jsonl --workload alpaca --noise 1.0 --rates 10,17,25,30,40,50 \
        --policies fcfs,skip-join-mlfq,srpt-oracle,$PRED,mlfq,gittins-slowdown ;;
    # section 4: skip-join against naive MLFQ where it was best (alpaca + summarize prompts)
    mix) $RUN --out $R/ci_mix.jsonl --workload $R/mix_alpaca_summarize.jsonl --rates 2,4,6,7,8,10 \
           --policies fcfs,mlfq,skip-join-mlfq ;;
    *) echo "unknown grid $g" >&2; exit 2 ;;
  esac
done
