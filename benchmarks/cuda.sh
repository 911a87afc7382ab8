#!/usr/bin/env bash
# Every CUDA measurement in one go, for a machine with a GPU (run from the repository root,
# memctl importable):
#   1. exact resume on CUDA: for three recipes, one run straight through against one
#      stopped by SIGTERM part-way and resumed; every metrics.csv value but the timings
#      must be equal;
#   2. the DNC against pytorch-dnc 1.1.0 (when `dnc` is importable), copy training steps/s
#      eager and compiled, and one forward + backward at T = 100 against N with peak GPU
#      memory (benchmarks/dnc_speed.py --device cuda);
#   3. recipe training throughput through the trainer, eager, then a compiled recipe
#      (benchmarks/throughput.py --device cuda).
# Results go to OUT_DIR (default benchmarks/cuda_results).
#
#     bash benchmarks/cuda.sh /tmp/cuda_results
set -u
out=${1:-benchmarks/cuda_results}
mkdir -p "$out"
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
peer=$($python -c "import dnc" 2>/dev/null && echo --peer-here)

runs=$(mktemp -d)
for recipe in ntm_copy_small dnc_copy ham_min8_hard; do
    settings=(--device $device --runs-dir "$runs" --set train.steps=400 --set train.log_every=10
        --set train.checkpoint_every=50 --set train.eval_every=100 --set train.compile=false)
    $python -m memctl train "recipes/$recipe.yaml" "${settings[@]}" --name "$recipe-straight" \
        >/dev/null
    $python -m memctl train "recipes/$recipe.yaml" "${settings[@]}" --name "$recipe-split" \
        >/dev/null &
    sleep 15
    kill -TERM $!
    wait $!
    echo "$recipe: SIGTERM exit code $?"
    $python -m memctl resume "$runs/$recipe-split" >/dev/null
    $python - "$runs/$recipe-straight" "$runs/$recipe-split" <<'EOF' | tee -a "$out/resume_cuda.txt"
import json, sys
from pathlib import Path
import pandas as pd
straight, split = (pd.read_csv(Path(p) / "metrics.csv") for p in sys.argv[1:])
lineage = json.loads((Path(sys.argv[2]) / "run.json").read_text())["lineage"]
timing = ["wall_s", "steps_per_s"]
same = straight.drop(columns=timing).equals(split.drop(columns=timing))
print(f"{Path(sys.argv[1]).name}: rows {len(straight)} / {len(split)}, identical: {same}; "
      f"split run resumed at step {[e['step'] for e in lineage if e['event'] == 'resume']}")
EOF
done

(cd benchmarks && $python dnc_speed.py --device cuda --threads 4 --steps 30 --no-sequence $peer \
    --slots 64,256,1024,4096 --peer-slots 64,256,1024 --out "$(realpath "$out")/dnc_speed_cuda.json")

eager=(recipes/copy_lstm.yaml recipes/ntm_copy.yaml recipes/ntm_associative_recall.yaml
    recipes/dnc_copy.yaml recipes/ham_min8.yaml recipes/fw_assoc.yaml recipes/fw_assoc_lstm.yaml)
$python benchmarks/throughput.py "${eager[@]}" --device cuda --steps 30 --warmup 3 \
    --set train.compile=false --out "$out/throughput_cuda.json"
$python benchmarks/throughput.py recipes/ntm_copy.yaml --device cuda \
    --steps 30 --warmup 3 --set train.compile=true --out "$out/throughput_cuda_compiled.json"
