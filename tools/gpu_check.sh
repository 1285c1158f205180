#!/usr/bin/env bash
# The GPU checks in one call: every CUDA kernel against the NumPy reference
# (tiled schedules and their simple fallbacks, the Winograd variants against
# the direct kernels), the network against NumPy and
# PyTorch, compute-sanitizer's memcheck over a small training step, `vggen
# tune` at B=64 and 256 (its records come back as $OUT/tuning.json and
# $OUT/algorithms-cuda.json: commit them under generated/), `vggen bench` with
# the tuned kernels at B=64 and
# B=256 beside PyTorch, eager and as CUDA graphs (and, at B=64 for comparison,
# the unfused network, the simple schedule, every convolution direct and every
# one F(4×4, 3×3)), and CUDA training on digits at
# width 64.  If a tiled kernel disagrees with the reference, tune is skipped
# and bench and train fall back to the simple build.
# Usage (repository root, on a machine with a GPU): bash tools/gpu_check.sh [PHASE ...]
# with phases among tests, memcheck, tune, bench, train (default: all of them;
# quick: all but train).  A device call is capped (8 minutes): split the phases
# over calls where all of them do not fit, e.g. "tests memcheck bench", then
# "tune bench train".  Each phase prints the seconds elapsed when it starts.
# Logs and JSON go to a work folder, packed after every phase into
# $OUT/gpu_check.tar.gz (a run cut short still returns what it finished); the
# two records to commit are copied to $OUT as they are.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-/tmp/vggen-gpu}"
out=/tmp/vggen-gpu-work
mkdir -p "$dest" "$out"
pack() { tar -czf "$dest/gpu_check.tar.gz.part" -C "$out" . && mv "$dest/gpu_check.tar.gz.part" "$dest/gpu_check.tar.gz"; }
trap pack EXIT
py=python3
phases="${*:-tests memcheck tune bench train}"
[ "$phases" = quick ] && phases="tests memcheck tune bench"
want() { case " $phases " in *" $1 "*) return 0;; *) return 1;; esac; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$py -m vggen.compiler.emit --cuda-contraction simple --out /tmp/vggen-simple > /dev/null

if want tests; then
echo "== [${SECONDS} s] CUDA kernels against the NumPy reference"
$py -m pytest -rs -p no:cacheprovider tests/compiler/test_cuda_compile.py tests/compiler/test_cuda_tiled.py \
    tests/compiler/test_winograd_cuda.py \
    > "$out/tests_kernels.log" 2>&1
kernels_rc=$?
tail -n 4 "$out/tests_kernels.log"
if [ $kernels_rc -ne 0 ]; then
    grep -E "^(FAILED|ERROR)" "$out/tests_kernels.log" | head -n 10
    echo "tiled kernels failed: bench and train use the simple schedule"
    export VGGEN_GENERATED=/tmp/vggen-simple
fi

pack
echo "== [${SECONDS} s] network on CUDA against NumPy and PyTorch"
$py -m pytest -rs -p no:cacheprovider tests/runtime/test_runtime.py tests/model/test_network.py -k "cuda" \
    > "$out/tests_network.log" 2>&1
tail -n 3 "$out/tests_network.log"
pack
echo "== [${SECONDS} s] CUDA-graph steps against eager steps"
$py -m pytest -rs -p no:cacheprovider tests/model/test_step.py > "$out/tests_step.log" 2>&1
tail -n 3 "$out/tests_step.log"
fi

pack
if want memcheck; then
echo "== [${SECONDS} s] compute-sanitizer memcheck: one training step, width 4, batch 4"
compute-sanitizer --tool memcheck --print-limit 20 \
    $py -m vggen bench --target cuda --batch-size 4 --width 4 --steps 1 --warmup 0 --no-torch \
    > "$out/memcheck.log" 2>&1
grep -E "ERROR SUMMARY|========= (Invalid|Error)" "$out/memcheck.log" | head -n 20
fi

pack
if want tune; then
echo "== [${SECONDS} s] vggen tune: B=64 and 256, width 64 (records generated/tuning.json and algorithms-cuda.json, rebuilds)"
if [ "${VGGEN_GENERATED:-}" = "" ]; then
    $py -m vggen tune --batch-size 64 256 --width 64 > "$out/tune.log" 2>&1
    echo "tune exit $?"; tail -n 1 "$out/tune.log"
    cp generated/tuning.json "$dest/tuning.json" 2>/dev/null
    cp generated/algorithms-cuda.json "$dest/algorithms-cuda.json" 2>/dev/null
    grep -E "^\| \`" "$out/tune.log" | head -n 30
fi
fi

summary() {
    $py - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"B={r['batch_size']}: vggen {r['images_per_s']:.0f} img/s, PyTorch {r['torch_images_per_s'] or 0:.0f} img/s, "
      f"ratio {r['ratio'] or 0:.3f} on {r['device']}")
for k in r["kernels"][:8]:
    print(f"   {k['name']:45s} {k['seconds']*1e3:8.3f} ms {k['share']:6.1%} {k['flops']/max(k['seconds'],1e-12)/1e9:8.1f} GFLOP/s")
PY
}
pack
if want bench; then
echo "== [${SECONDS} s] bench, width 64 (eager steps, then CUDA graphs)"
for b in 64 256; do
    $py -m vggen bench --target cuda --batch-size "$b" --width 64 --json > "$out/bench$b.json" \
        2> "$out/bench$b.err" && summary "$out/bench$b.json" || tail -n 5 "$out/bench$b.err"
    $py -m vggen bench --target cuda --batch-size "$b" --width 64 --cuda-graph --json \
        > "$out/bench${b}_graph.json" 2> "$out/bench${b}_graph.err" \
        && summary "$out/bench${b}_graph.json" || tail -n 5 "$out/bench${b}_graph.err"
done
echo "-- unfused BN/ReLU, for comparison"
$py -m vggen bench --target cuda --batch-size 64 --width 64 --no-fuse --no-torch --json \
    > "$out/bench64_unfused.json" 2> "$out/bench64_unfused.err" \
    && summary "$out/bench64_unfused.json" || tail -n 5 "$out/bench64_unfused.err"
echo "-- simple schedule, for comparison"
VGGEN_GENERATED=/tmp/vggen-simple $py -m vggen bench --target cuda --batch-size 64 --width 64 \
    --no-torch --json > "$out/bench64_simple.json" 2> "$out/bench64_simple.err" \
    && summary "$out/bench64_simple.json" || tail -n 5 "$out/bench64_simple.err"

for alg in direct winograd4; do
    echo "-- every convolution $alg, for comparison"
    $py -m vggen bench --target cuda --batch-size 64 --width 64 --conv-algorithm "$alg" --no-torch --json \
        > "$out/bench64_$alg.json" 2> "$out/bench64_$alg.err" \
        && summary "$out/bench64_$alg.json" || tail -n 5 "$out/bench64_$alg.err"
done
fi

pack
want train || exit 0
echo "== [${SECONDS} s] train: cuda, digits, width 64"
$py -m vggen train --target cuda --dataset digits --width 64 --epochs 10 --seed 0 \
    --metrics "$out/digits_cuda_w64.jsonl" > "$out/train.log" 2>&1
echo "train exit $?"
cat "$out/digits_cuda_w64.jsonl"
