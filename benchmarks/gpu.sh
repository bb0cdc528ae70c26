#!/usr/bin/env bash
# On a machine with a CUDA GPU: throughput benchmark, then the GPU default preset
# (s11-resnet18-onecycle, 20 epochs) and the fast preset, printing s/epoch and accuracy.
#
#   DATA=path/to/cifar10-imagefolder bash benchmarks/gpu.sh        # ImageFolder layout
#   DATA=path/with/cifar-10-batches-py DATASET=cifar10 bash benchmarks/gpu.sh
#
# Results go to benchmarks/results/gpu-<date>/ (JSON + logs); the summary lines are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/datasets/cifar10-jpeg}
DATASET=${DATASET:-imagefolder}
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
make venv >/dev/null
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

$PY benchmarks/throughput.py --data "$DATA" --device cuda --batch-size 512 --windows 5 --steps 20 \
    2> "$OUT/throughput.log" | tail -n 1 | tee "$OUT/throughput.json"

for preset in s11-resnet18-onecycle fast; do
    .venv/bin/cifarlab train --preset "$preset" --dataset "$DATASET" --data "$DATA" --device cuda \
        --out "$OUT/$preset" > "$OUT/$preset.log" 2>&1
    $PY - "$OUT/$preset" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train_s = sorted(r["train_seconds"] for r in rows)
print(json.dumps({"run": sys.argv[1], "epochs": len(rows), "final_test_acc": rows[-1]["test_acc"],
                  "best_test_acc": max(r["test_acc"] for r in rows if r["test_acc"] is not None),
                  "median_train_s_per_epoch": train_s[len(train_s) // 2],
                  "total_s": rows[-1]["elapsed"]}))
PY
done | tee "$OUT/presets.jsonl"
