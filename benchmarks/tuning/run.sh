#!/usr/bin/env bash
# Tuning runs on a held-out part of train (5000 images; the test split is never read).
#   bash benchmarks/tuning/run.sh NAME [EPOCHS] [SEED]   e.g.  bash benchmarks/tuning/run.sh X1-muon-1024 6
# The holdout accuracy is the last line of runs/tune/NAME/log.txt and metrics.jsonl.
set -euo pipefail
name=$1; epochs=${2:-6}; seed=${3:-0}
data=${DATA:-../shared/datasets/cifar10-jpeg}
python -m cifarlab train --config "benchmarks/tuning/$name.toml" --dataset imagefolder --data "$data" \
  --holdout 5000 --epochs "$epochs" --seed "$seed" --no-report --out "runs/tune/$name-e$epochs-s$seed"
