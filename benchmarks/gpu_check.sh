#!/usr/bin/env bash
# The device check of issue 7, prepared for the `device` tool (one call, about 8 minutes at most):
#
#   run  command: bash benchmarks/gpu_check.sh   carry: [".whl"]   timeout_s: 540
#
# The device machine has torch, transformers and numpy but no TransformerLens or jsonschema: the
# wheels for the latter (cp312) are in .whl/, which git ignores; to make it again:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#       -d .whl jsonschema jsonschema-specifications referencing rpds-py
# Results go to
# $OUT/gpu.json after every stage, so a timeout still returns what was measured.
set -u
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
# 1. a tiny model end to end on the GPU, decisions against K = 1 (seconds)
timeout 60 python3 benchmarks/bench_gpu.py --tiny --device cuda --modes plain --check-edges 100 \
    --k1-seconds 0 --out "$out/tiny.json" > "$out/tiny.log" 2>&1
echo "tiny: rc=$?"; tail -n 3 "$out/tiny.log"
# 2. GPT-2 small's shape: the whole unsplit run, its first 3,000 decisions against K = 1, bfloat16
#    flips, the position-split run (projected if it does not finish), then a short profile
python3 benchmarks/bench_gpu.py --device cuda --seconds 90 --positions-seconds 180 --segment-seconds 10 \
    --k1-seconds 0 --check-edges 3000 --flips --profile 2000 --out "$out/gpu.json" > "$out/gpu.log" 2>&1
echo "gpt2: rc=$?"
python3 - "$out/gpu.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for name, m in d["modes"].items():
    keep = ("edges_total", "k", "full_run_seconds", "projected_full_run_seconds", "forward_equivalents_per_edge",
            "passes_prefix", "mean_chain_length_prefix", "peak_gpu_memory_gib", "k1_check", "decisions_differing")
    print(name, {k: m[k] for k in keep if k in m})
PY
