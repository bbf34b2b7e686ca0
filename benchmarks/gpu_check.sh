#!/usr/bin/env bash
# Device checks for the `device` tool, one call each:
#
#   bash benchmarks/gpu_check.sh          GPT-2 small's shape (issue 7), about 8 minutes at most
#       run  command: bash benchmarks/gpu_check.sh          carry: [".whl"]   timeout_s: 540
#   bash benchmarks/gpu_check.sh shapes   Pythia-160m's and Llama-3.2-1B's shapes (issue 13),
#                                         about 6 minutes at most
#       run  command: bash benchmarks/gpu_check.sh shapes   carry: [".whl"]   timeout_s: 400
#
# A dry run of the shapes stage on a CPU, with reduced models (a minute or two):
#   DEVICE=cpu EXTRA="--layers 2 --prompts 2x4" bash benchmarks/gpu_check.sh shapes
#
# The device machine has torch, transformers and numpy but no TransformerLens or jsonschema: the
# wheels for those (cp312; a few MB) are in .whl/, which the `carry` above brings along. To make
# it again:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 --no-deps \
#       -d .whl jsonschema jsonschema-specifications referencing rpds-py attrs \
#       transformer-lens==4.3.0 einops jaxtyping wadler-lindig accelerate
# (TransformerLens also imports datasets and pandas, for utilities the benchmark never calls:
# bench_gpu.py registers empty stand-ins for them where they are missing.)
# Every stage has its own timeout and writes its JSON to $OUT after each of its own stages, and
# the figures are printed as soon as a stage ends, so a stage that fails or runs out of time
# leaves the others' results.
set -u
mode=${1:-gpt2}
device=${DEVICE:-cuda}
read -r -a extra <<< "${EXTRA:-}"
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$out/pip.log" 2>&1 || echo "pip: could not install .whl/ (see pip.log); going on"
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null

summary() {   # the key figures of bench_gpu.py's JSON files, whatever stage they reached
    python3 - "$@" <<'PY'
import json, sys
keep = ("edges_total", "k", "full_run_seconds", "projected_full_run_seconds",
        "forward_equivalents_per_edge", "passes_prefix", "mean_chain_length_prefix",
        "kept_edges", "peak_gpu_memory_gib", "k1_check", "decisions_differing")
for path in sys.argv[1:]:
    try:
        d = json.load(open(path))
    except (OSError, ValueError) as exc:
        print(path, "no results:", exc)
        continue
    for name, shape in (d.get("shapes") or {"": d}).items():
        head = {k: shape[k] for k in ("model", "edges_plain", "bridge_forward_ms",
                                      "engine_forward_ms", "hf_forward_ms",
                                      "estimated_mib_per_hypothesis", "gpu_free_gib_before_runs",
                                      "peak_gpu_memory_gib", "error") if k in shape}
        print(name or path, head)
        for mode, m in (shape.get("modes") or {}).items():
            print("  ", mode, {k: m[k] for k in keep if k in m})
PY
}

if [ "$mode" = shapes ]; then
    # 1. Pythia-160m's shape: the whole plain run (or its projection), its first 2,000 decisions
    #    against K = 1
    timeout 120 python3 benchmarks/bench_gpu.py --shape pythia --device "$device" --modes plain \
        --seconds 45 --segment-seconds 8 --k1-seconds 0 --check-edges 2000 "${extra[@]}" \
        --out "$out/pythia.json" > "$out/pythia.log" 2>&1
    echo "pythia: rc=$?"; summary "$out/pythia.json"; grep -m3 -E "Error|error" "$out/pythia.log"
    # 2. Llama-3.2-1B's shape (GQA 32/8, SwiGLU): the plain run for up to 90 s, then segments
    #    at 4 layers and the projection; the first 1,000 decisions against K = 1
    timeout 240 python3 benchmarks/bench_gpu.py --shape llama --device "$device" --modes plain \
        --seconds 90 --segment-seconds 10 --samples 4 --k1-seconds 0 --check-edges 1000 \
        "${extra[@]}" --out "$out/llama.json" > "$out/llama.log" 2>&1
    echo "llama: rc=$?"; summary "$out/llama.json"; grep -m3 -E "Error|error" "$out/llama.log"
    exit 0
fi

# 1. a tiny model end to end on the GPU, decisions against K = 1 (seconds)
timeout 60 python3 benchmarks/bench_gpu.py --tiny --device cuda --modes plain --check-edges 100 \
    --k1-seconds 0 --out "$out/tiny.json" > "$out/tiny.log" 2>&1
echo "tiny: rc=$?"; tail -n 3 "$out/tiny.log"
# 2. GPT-2 small's shape: the whole unsplit run, its first 3,000 decisions against K = 1, bfloat16
#    flips, the position-split run (projected if it does not finish), then a short profile
python3 benchmarks/bench_gpu.py --device cuda --seconds 90 --positions-seconds 180 --segment-seconds 10 \
    --k1-seconds 0 --check-edges 3000 --flips --profile 2000 --out "$out/gpu.json" > "$out/gpu.log" 2>&1
echo "gpt2: rc=$?"
summary "$out/gpu.json"
